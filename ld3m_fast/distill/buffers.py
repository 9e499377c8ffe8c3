"""Expert trajectories for MTT: train ConvNets on real data, one snapshot per epoch.

On disk, one safetensors file per expert (`expert_0000.safetensors`, ...):
tensors `epochs` (E+1, P) float32 (row e = all parameters after e epochs, row 0 =
the initialisation, parameters flattened in `names` order) and metadata `ld3m_buffer`,
a JSON object with arch, depth, width, norm, res, channels, source, subset,
num_classes, lr, momentum, batch_size, epochs_trained, epochs_kept, names,
shapes, seed, dsa, and pruning (the real set's pruning: percent, order, scorer,
scorer_hash, kept_per_class; {"percent": 100} when unpruned). Only the epochs MTT will read are kept
(0 .. max_start_epoch + expert_epochs) unless asked otherwise.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import safe_open

from .._files import save_tensors_atomic
from ..errors import LD3MError
from ..normalization import from_uint8
from .algorithms import stream_generator

FORMAT = "ld3m-fast-expert"
# Fields a buffer must share with the student that reads it.
MATCH_FIELDS = ("arch", "depth", "width", "norm", "res", "num_classes", "channels")


@dataclass
class ExpertTrajectory:
    """One expert's parameter snapshots.

    epochs: (E+1, P) float32, row e = flat parameters after e epochs.
    names/shapes: the parameters in flattening order.
    """

    epochs: torch.Tensor
    names: list[str]
    shapes: list[tuple[int, ...]]
    metadata: dict
    source: str = ""

    @property
    def num_snapshots(self) -> int:
        return self.epochs.shape[0]

    def snapshot(self, epoch: int) -> torch.Tensor:
        """(P,) flat parameters after `epoch` epochs."""
        return self.epochs[epoch]


def flatten_parameters(module: torch.nn.Module) -> torch.Tensor:
    """(P,) concatenation of the module's parameters in `named_parameters` order."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).cpu().float()


def write_trajectory_atomic(path: Path, epochs: torch.Tensor, metadata: dict) -> None:
    """Write one trajectory through a temporary file and a rename: never half a file."""
    save_tensors_atomic({"epochs": epochs}, path,
                        {"format": FORMAT, "ld3m_buffer": json.dumps(metadata)})


def train_expert(network, images: torch.Tensor, labels: torch.Tensor, *, epochs: int,
                 keep_epochs: int | None, lr: float = 0.01, batch_size: int = 256,
                 dsa=None, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """Train `network` with plain SGD (no momentum, no weight decay) and return its snapshots.

    images: (N, 3, res, res) uint8; labels: (N,) long. Returns (K+1, P) float32:
    row 0 = the initialisation, row e = after e epochs, for e <= K = keep_epochs
    (all `epochs` when None). Training still runs all `epochs`.
    Batches are shuffled with `generator`; DSA draws come from it too.
    """
    network = network.to(device).train()
    optimizer = torch.optim.SGD(network.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
    keep = epochs if keep_epochs is None else min(keep_epochs, epochs)
    snapshots = [flatten_parameters(network)]
    count = images.shape[0]
    for epoch in range(1, epochs + 1):
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, batch_size):
            index = order[start:start + batch_size]
            x = from_uint8(images[index]).to(device)
            if dsa is not None:
                x = dsa.apply(x, dsa.draw(x.shape[0], generator, x.device))
            loss = F.cross_entropy(network(x), labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if not torch.isfinite(loss):
            raise LD3MError(f"expert training diverged (loss {float(loss)}) at epoch {epoch}; lower --lr")
        if epoch <= keep:
            snapshots.append(flatten_parameters(network))
    return torch.stack(snapshots)


def build_buffer(out_dir, network_spec, images: torch.Tensor, labels: torch.Tensor, *,
                 num_experts: int, epochs: int, keep_epochs: int | None, lr: float = 0.01,
                 batch_size: int = 256, dsa_strategy: str | None = "color_crop_cutout_flip_scale_rotate",
                 seed: int = 0, source: str = "", subset: str | None = None, device="cpu",
                 pruning: dict | None = None, progress=None) -> list[Path]:
    """Train `num_experts` experts and write `out_dir/expert_XXXX.safetensors` for each.

    `network_spec` is an `algorithms.NetworkSpec`. Expert i's init, batch order and
    DSA draws come from a generator seeded with (seed, i), so adding experts later
    with the same seed reproduces the first ones. Returns the written paths.
    """
    from ..dsa import DSA

    out_dir = Path(out_dir)
    dsa = DSA(dsa_strategy) if dsa_strategy else None
    paths: list[Path] = []
    try:
        for i in range(num_experts):
            paths.append(_build_one_expert(out_dir, i, network_spec, images, labels, epochs=epochs,
                                           keep_epochs=keep_epochs, lr=lr, batch_size=batch_size, dsa=dsa,
                                           dsa_strategy=dsa_strategy, seed=seed, source=source,
                                           subset=subset, device=device, pruning=pruning))
            if progress is not None:
                progress(i + 1, num_experts, paths[-1])
    except BaseException:
        # No half-built buffer: a failed or interrupted build removes what it wrote.
        for path in paths:
            path.unlink(missing_ok=True)
        raise
    return paths


def _build_one_expert(out_dir: Path, i: int, network_spec, images, labels, *, epochs, keep_epochs, lr,
                      batch_size, dsa, dsa_strategy, seed, source, subset, device, pruning=None) -> Path:
    """Train expert `i` (init, batch order and DSA from a generator seeded by (seed, i)) and write it."""
    generator = stream_generator(seed, f"expert:{i}")
    network = network_spec.build_seeded(generator)
    names = [n for n, _ in network.named_parameters()]
    shapes = [list(p.shape) for p in network.parameters()]
    trajectory = train_expert(network, images, labels, epochs=epochs, keep_epochs=keep_epochs,
                              lr=lr, batch_size=batch_size, dsa=dsa, generator=generator,
                              device=device)
    metadata = {
        "arch": network_spec.arch, "depth": network_spec.depth, "width": network_spec.width,
        "norm": network_spec.norm, "res": network_spec.res, "channels": network_spec.channels,
        "num_classes": network_spec.num_classes, "source": source, "subset": subset,
        "lr": lr, "momentum": 0.0, "batch_size": batch_size, "epochs_trained": epochs,
        "epochs_kept": trajectory.shape[0] - 1, "names": names, "shapes": shapes,
        "seed": seed, "expert_index": i, "dsa": dsa_strategy, "pruning": pruning or {"percent": 100},
    }
    path = out_dir / f"expert_{i:04d}.safetensors"
    write_trajectory_atomic(path, trajectory, metadata)
    return path


def _read_trajectory(path: Path) -> ExpertTrajectory:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or "epochs" not in f.keys():
                raise LD3MError(f"{path} is not an ld3m-fast expert trajectory; build one with `ld3m-fast buffer`")
            epochs = f.get_tensor("epochs")
        metadata = json.loads(meta["ld3m_buffer"])
    except (SafetensorError, OSError, ValueError, KeyError) as error:
        raise LD3MError(f"cannot read expert trajectory {path}: {error}") from None
    shapes = [tuple(s) for s in metadata["shapes"]]
    total = sum(int(torch.Size(s).numel()) for s in shapes)
    if epochs.dim() != 2 or epochs.shape[1] != total:
        raise LD3MError(f"expert trajectory {path} is damaged: {tuple(epochs.shape)} does not hold "
                        f"{total} parameters per epoch")
    if not epochs.is_floating_point() or not bool(torch.isfinite(epochs).all()):
        raise LD3MError(f"expert trajectory {path} is damaged: its parameters hold NaN or inf (or are not "
                        "floating point); build the buffer again with `ld3m-fast buffer`")
    return ExpertTrajectory(epochs.float(), list(metadata["names"]), shapes, metadata, source=str(path))


def load_buffer(path, expect: dict | None = None) -> list[ExpertTrajectory]:
    """Read every trajectory in a buffer folder (or one trajectory file).

    `expect` maps fields of `MATCH_FIELDS` to the student's values; any
    difference is an LD3MError naming every mismatched field.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("expert_*.safetensors"))
        if not files:
            raise LD3MError(f"expert buffer {path} holds no expert_*.safetensors files; "
                            "build one with `ld3m-fast buffer`")
    elif path.is_file():
        files = [path]
    else:
        raise LD3MError(f"expert buffer {path} does not exist; build one with `ld3m-fast buffer`")
    trajectories = [_read_trajectory(f) for f in files]
    for t in trajectories:
        if t.names != trajectories[0].names or t.shapes != trajectories[0].shapes:
            raise LD3MError(f"expert buffer {path} mixes different networks ({t.source})")
    if expect:
        check_buffer_matches(trajectories[0].metadata, expect, path)
    return trajectories


def check_buffer_matches(metadata: dict, expect: dict, path) -> None:
    """Raise LD3MError listing every field where buffer and student differ."""
    mismatched = [f"{key} (buffer {metadata.get(key)!r}, student {value!r})"
                  for key, value in expect.items() if metadata.get(key) != value]
    if mismatched:
        raise LD3MError(f"expert buffer {path} does not match the student: " + ", ".join(mismatched)
                        + "; rebuild it with `ld3m-fast buffer` using the student's settings")
