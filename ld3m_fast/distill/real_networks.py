"""Networks trained on the real data, and classifiers read from files: the teachers of
soft-label evaluation, the feature space of the coreset baselines and the "train" scorer of
pruning, each trained once and cached.

A real-data network is a function of (the data, its `RealNetworkSpec`): it is trained with
the evaluation recipe (`ld3m_fast.distill.evaluation.train_network`: SGD momentum 0.9,
weight decay 5e-4, warm-up then cosine, DSA, the bias-corrected weight EMA) from the stream
`stream_generator(spec.seed, "real-network:<arch>")`, and stored as safetensors under
`user_cache_dir("networks")` (or `<cache_dir>/networks`), keyed to the data's fingerprint
and every field of the spec, so several evaluations (and runs) share it.

Files a user gives (`--teacher PATH`): an ld3m-fast network file (what the cache holds;
metadata "format": "ld3m-fast-network"), or a torchvision-layout ResNet-18 state dict
(`ld3m_fast.networks.load_torchvision_resnet18`), whose ImageNet logits are restricted to the
data's classes (the subset's ImageNet indices) and which sees the images resized to 224x224.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._files import save_tensors_atomic, user_cache_dir
from ..errors import LD3MError

logger = logging.getLogger(__name__)

NETWORK_FORMAT = "ld3m-fast-network"
RECIPE_VERSION = 1  # bump when the training recipe changes: cached networks are then retrained
REAL_NETWORK_EPOCHS = 20
IMAGENET_SIDE = 224  # the input side of torchvision's ImageNet weights (get_losses_imagenet.py:23)
_HASH_CHUNK_ROWS = 4096


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(2**20), b""):
            digest.update(piece)
    return digest.hexdigest()


def data_fingerprint(images: torch.Tensor, labels: torch.Tensor, cache_key: str | None = None) -> str:
    """A key of a labelled image set: the data cache's own key when it offers one, else the
    sha256 of the labels and the uint8 pixels, read `_HASH_CHUNK_ROWS` images at a time
    (a memory-mapped split is streamed, never copied whole)."""
    if cache_key:
        return f"cache:{cache_key}"
    digest = hashlib.sha256()
    digest.update(json.dumps([list(images.shape), str(images.dtype)]).encode())
    digest.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    for start in range(0, int(images.shape[0]), _HASH_CHUNK_ROWS):
        digest.update(images[start:start + _HASH_CHUNK_ROWS].contiguous().numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def imageset_fingerprint(data) -> str:
    """`data_fingerprint` of an `ImageSet` (its `cache_key` attribute when the data cache sets one)."""
    key = getattr(data, "cache_key", None)
    return data_fingerprint(data.images, data.labels, key if isinstance(key, str) else None)


def state_sha256(module: nn.Module) -> str:
    """Hex sha256 of a module's state dict (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class RealNetworkSpec:
    """A network trained on real data: its architecture and the recipe's free settings."""

    res: int
    num_classes: int
    arch: str = "convnet"
    width: int = 128
    depth: int | None = None
    norm: str | None = None
    epochs: int = REAL_NETWORK_EPOCHS
    lr: float = 0.01
    batch_size: int = 256
    seed: int = 0

    def network_spec(self):
        from .algorithms import NetworkSpec

        return NetworkSpec(num_classes=self.num_classes, res=self.res, arch=self.arch, width=self.width,
                           depth=self.depth if self.arch == "convnet" else None,
                           norm=self.norm if self.arch == "convnet" else None)

    def resolved(self) -> "RealNetworkSpec":
        """The spec with depth and norm filled in (so equal networks have equal keys)."""
        net = self.network_spec()
        return RealNetworkSpec(**{**asdict(self), "arch": net.arch, "depth": net.depth, "norm": net.norm})

    def key(self, data_key: str) -> str:
        text = json.dumps({"spec": asdict(self.resolved()), "data": data_key, "recipe": RECIPE_VERSION},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def describe(self) -> str:
        spec = self.resolved()
        shape = f"{spec.arch}" + (f"-d{spec.depth}-w{spec.width}-{spec.norm}" if spec.arch == "convnet" else "")
        return f"{shape}, {spec.epochs} epochs on the real data (lr {spec.lr:g}, seed {spec.seed})"


def _network_cache_dir(cache_dir) -> Path:
    return Path(cache_dir).expanduser() / "networks" if cache_dir else user_cache_dir("networks")


def real_network_path(spec: RealNetworkSpec, data_key: str, cache_dir=None) -> Path:
    spec = spec.resolved()
    return _network_cache_dir(cache_dir) / f"{spec.arch}-{spec.res}px-{spec.key(data_key)[:24]}.safetensors"


def cached_real_network(spec: RealNetworkSpec, data_key: str, cache_dir=None) -> tuple[nn.Module, dict] | None:
    """The cached network of `spec` on the data `data_key` names, or None (an unreadable cache
    file is ignored with a warning)."""
    path = real_network_path(spec, data_key, cache_dir)
    if not path.is_file():
        return None
    try:
        network, _ = load_network_file(path)
    except LD3MError as error:
        logger.warning("ignoring unreadable cached network %s (%s); training again", path, error)
        return None
    return network.eval(), {"description": spec.resolved().describe(), "path": str(path),
                            "sha256": state_sha256(network), "cached": True}


def recipe(spec: RealNetworkSpec):
    """The evaluation recipe (an `EvalConfig`) a real-data network is trained with."""
    from .evaluation import EvalConfig

    spec = spec.resolved()
    return EvalConfig(archs=(spec.arch,), seeds=1, epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size,
                      width=spec.width, depth=spec.depth, norm=spec.norm or "instance")


def untrained_network(spec: RealNetworkSpec) -> nn.Module:
    """The initial network of `spec` (what training starts from), from its own stream."""
    from .algorithms import stream_generator

    return spec.network_spec().build_seeded(stream_generator(spec.seed, f"real-network:{spec.resolved().arch}"))


def train_real_network(images: torch.Tensor, labels: torch.Tensor, spec: RealNetworkSpec, *, data_key: str,
                       cache_dir=None, device="cpu") -> tuple[nn.Module, dict]:
    """The network of `spec` trained on (images, labels), from the cache or trained now (with a
    progress bar) and cached. images: (N, 3, res, res) uint8; labels (N,) long.

    Returns (network in eval mode on `device`, {"description", "path", "sha256" of its weights,
    "cached" (bool)})."""
    from .evaluation import train_network

    spec = spec.resolved()
    path = real_network_path(spec, data_key, cache_dir)
    cached = cached_real_network(spec, data_key, cache_dir)
    if cached is not None:
        logger.info(f"{spec.describe()}: cached at {path}")
        return cached[0].to(device), cached[1]
    from tqdm import tqdm

    from .algorithms import stream_generator

    generator = stream_generator(spec.seed, f"real-network:{spec.arch}")
    network = spec.network_spec().build_seeded(generator)
    logger.info(f"training {spec.describe()} ({int(labels.numel())} images); cached afterwards at {path}")
    with tqdm(total=spec.epochs, desc=f"{spec.arch} on the real data", unit="epoch", leave=False,
              disable=None) as bar:  # no bar without a terminal
        trained = train_network(network, images, labels, lr=spec.lr, config=recipe(spec), generator=generator,
                                device=device, on_epoch=lambda epoch: bar.update(1))
    trained = trained.eval()
    try:
        save_tensors_atomic(trained.state_dict(), path, {
            "format": NETWORK_FORMAT, "spec": json.dumps(asdict(spec)), "data": data_key,
            "recipe": RECIPE_VERSION})
    except OSError as error:  # a read-only cache costs the next start only
        logger.warning("could not cache the network at %s: %s", path, error)
    return trained.to(device), {"description": spec.describe(), "path": str(path),
                                "sha256": state_sha256(trained), "cached": False}


def load_network_file(path) -> tuple[nn.Module, RealNetworkSpec]:
    """An ld3m-fast network file (safetensors with a "spec" in its metadata), strictly loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != NETWORK_FORMAT:
                raise LD3MError(f"{path} is not an ld3m-fast network file")
            state = {k: f.get_tensor(k) for k in f.keys()}
        spec = RealNetworkSpec(**json.loads(meta["spec"]))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:
        raise LD3MError(f"cannot read network file {path}: {error}") from None
    network = spec.network_spec().build()
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise LD3MError(f"network file {path} does not match its recorded spec: "
                        f"{str(error).splitlines()[0]}") from None
    return network.eval(), spec


class ImageNetClassifier(nn.Module):
    """A torchvision ImageNet ResNet-18 seen as a classifier of the data's classes: network input
    (the shared normalisation, which is ImageNet's) at any side is resized to 224x224 (bilinear,
    antialiased) and the logits of the data's classes are kept (`class_rows`: the ImageNet
    index of every label)."""

    def __init__(self, model: nn.Module, class_rows: list[int]):
        super().__init__()
        self.model = model
        self.register_buffer("class_rows", torch.tensor(class_rows, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != IMAGENET_SIDE or x.shape[-2] != IMAGENET_SIDE:
            x = F.interpolate(x, size=(IMAGENET_SIDE, IMAGENET_SIDE), mode="bilinear", align_corners=False,
                              antialias=True)
        return self.model(x).index_select(1, self.class_rows)


def imagenet_rows(outputs: int, num_classes: int, subset: str | None, what: str) -> list[int]:
    """The output row of a classifier with `outputs` classes for each of the data's labels:
    the same index when the counts agree, the subset's ImageNet indices for a 1000-class one."""
    if outputs == num_classes:
        return list(range(num_classes))
    if outputs == 1000 and subset:
        from ..data.subsets import resolve_subset

        return list(resolve_subset(subset).imagenet_indices)
    raise LD3MError(f"{what} has {outputs} classes but the data {num_classes}: give a network of the data's "
                    "classes, or a 1000-class ImageNet one with --subset naming the ImageNet subset")


def load_classifier(path, *, num_classes: int, res: int, subset: str | None = None) -> tuple[nn.Module, dict]:
    """A classifier of the data's classes from a file: an ld3m-fast network file (it must have been
    trained at `res` on `num_classes` classes) or a torchvision ResNet-18 state dict.
    Returns (network in eval mode, {"description", "path", "sha256" of the file})."""
    from ..networks import load_torchvision_resnet18

    path = Path(path)
    if not path.is_file():
        raise LD3MError(f"{path} does not exist: give a network file or 'train'")
    info = {"path": str(path), "sha256": file_sha256(path)}
    if path.suffix == ".safetensors":
        from safetensors.torch import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                ours = (f.metadata() or {}).get("format") == NETWORK_FORMAT
        except Exception:  # noqa: BLE001 - read again below for the one-line error
            ours = False
        if ours:
            network, spec = load_network_file(path)
            if spec.res != res or spec.num_classes != num_classes:
                raise LD3MError(f"{path} was trained at {spec.res}² on {spec.num_classes} classes, but the data "
                                f"is {res}² with {num_classes} classes")
            return network, {**info, "description": f"{spec.describe()} ({path.name})"}
    model = load_torchvision_resnet18(path)
    rows = imagenet_rows(model.fc.out_features, num_classes, subset, str(path))
    return ImageNetClassifier(model, rows).eval(), {
        **info, "description": f"torchvision ResNet-18 {path.name} at {IMAGENET_SIDE}²"}


__all__ = ["IMAGENET_SIDE", "ImageNetClassifier", "NETWORK_FORMAT", "REAL_NETWORK_EPOCHS", "RealNetworkSpec",
           "cached_real_network", "data_fingerprint", "file_sha256", "imagenet_rows", "imageset_fingerprint",
           "load_classifier", "load_network_file", "real_network_path", "recipe", "state_sha256",
           "train_real_network", "untrained_network"]
