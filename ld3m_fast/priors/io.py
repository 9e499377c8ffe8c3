"""Prior folders: diffusers `save_pretrained` sub-folders plus a small manifest.

Layout of a prior folder:

    ld3m_prior.json            manifest (format, classes, conditioning, scaling factor, ...)
    unet/ or transformer/      the denoiser, `save_pretrained` layout
    vqvae/ or vae/             the autoencoder, `save_pretrained` layout
    scheduler/                 a diffusers scheduler config (the training noise schedule)
    class_table.safetensors    the class table, when it lives outside the denoiser

Loading is strict: weights that do not match their config.json are an error.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._files import _umask
from ..errors import PriorError
from .adapters import (AdaLNDenoiser, AutoencoderAdapter, ClassEmbeddingDenoiser,
                       CrossAttentionDenoiser, DenoiserAdapter, KLAutoencoder, VQAutoencoder)
from .prior import Prior

MANIFEST = "ld3m_prior.json"
FORMAT = "ld3m-fast-prior"
CLASS_TABLE = "class_table.safetensors"

DENOISERS = {
    "cross_attention": ("UNet2DConditionModel", CrossAttentionDenoiser),
    "class_embedding": ("UNet2DModel", ClassEmbeddingDenoiser),
    "adaln": ("DiTTransformer2DModel", AdaLNDenoiser),
}
AUTOENCODERS = {"VQModel": VQAutoencoder, "AutoencoderKL": KLAutoencoder}


def wrap_denoiser(model: nn.Module, class_table: torch.Tensor | None = None) -> DenoiserAdapter:
    """Adapter for a diffusers denoiser; `class_table` is needed only for cross-attention UNets."""
    name = type(model).__name__
    if name == "UNet2DConditionModel":
        if class_table is None:
            raise PriorError("a UNet2DConditionModel prior needs a class table (num_classes + 1, D)")
        return CrossAttentionDenoiser(model, class_table)
    if name == "UNet2DModel":
        return ClassEmbeddingDenoiser(model)
    if name == "DiTTransformer2DModel":
        return AdaLNDenoiser(model)
    raise PriorError(f"unsupported denoiser class {name}; "
                     f"supported: {', '.join(c for c, _ in DENOISERS.values())}")


def wrap_autoencoder(model: nn.Module, scaling_factor: float | None = None) -> AutoencoderAdapter:
    name = type(model).__name__
    if name not in AUTOENCODERS:
        raise PriorError(f"unsupported autoencoder class {name}; supported: {', '.join(AUTOENCODERS)}")
    if scaling_factor is None:
        scaling_factor = model.config.scaling_factor
    return AUTOENCODERS[name](model, scaling_factor)


def _replace_dir(tmp: Path, out_dir: Path):
    """Move a finished temporary folder into place; an old folder is removed only afterwards."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + ".old-" + tmp.name)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_prior_parts(out_dir, *, denoiser: nn.Module, autoencoder: nn.Module,
                     class_table: torch.Tensor | None, scheduler_config: dict,
                     conditioning: str, num_classes: int, image_size: int,
                     scaling_factor: float, class_names: list[str] | None = None,
                     description: str = "") -> Path:
    """Write a prior folder from raw diffusers modules, atomically (temp folder, then rename).

    `denoiser` is the diffusers model *with* its own label table for the
    class-embedding and DiT kinds; `class_table` (num_classes + 1, D) is stored
    separately for cross-attention UNets.
    """
    if conditioning not in DENOISERS:
        raise ValueError(f"conditioning must be one of {sorted(DENOISERS)}, got {conditioning!r}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    denoiser_sub = {"adaln": "transformer"}.get(conditioning, "unet")
    ae_class = type(autoencoder).__name__
    ae_sub = AUTOENCODERS[ae_class].subfolder if ae_class in AUTOENCODERS else "autoencoder"
    manifest = {
        "format": FORMAT, "version": 1,
        "conditioning": conditioning,
        "denoiser": {"class": type(denoiser).__name__, "subfolder": denoiser_sub},
        "autoencoder": {"class": ae_class, "subfolder": ae_sub,
                        "scaling_factor": float(scaling_factor)},
        "num_classes": int(num_classes), "image_size": int(image_size),
        "class_names": list(class_names) if class_names else None,
        "description": description,
    }
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the result is an ordinary folder
    try:
        denoiser.save_pretrained(tmp / denoiser_sub, safe_serialization=True)
        autoencoder.save_pretrained(tmp / ae_sub, safe_serialization=True)
        from diffusers import DDIMScheduler

        DDIMScheduler.from_config(
            {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
        ).save_pretrained(tmp / "scheduler")
        if class_table is not None:
            save_file({"class_table": class_table.detach().contiguous().cpu()}, tmp / CLASS_TABLE)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _restore_label_table(prior: Prior) -> nn.Module:
    """The diffusers denoiser with its label lookup put back, for `save_pretrained`."""
    import copy

    model = copy.deepcopy(prior.denoiser.model)
    table = prior.class_table.detach().clone()
    if prior.conditioning == "class_embedding":
        embedding = nn.Embedding(*table.shape)
        embedding.weight.data.copy_(table)
        model.class_embedding = embedding
    elif prior.conditioning == "adaln":
        from diffusers.models.embeddings import LabelEmbedding

        for block in model.transformer_blocks:
            labels = LabelEmbedding(table.shape[0] - 1, table.shape[1], dropout_prob=0.1)
            labels.embedding_table.weight.data.copy_(table)
            block.norm1.emb.class_embedder = labels
    return model


def save_prior(prior: Prior, out_dir, description: str = "") -> Path:
    """Write `prior` as a prior folder that `load_prior` reads back."""
    return save_prior_parts(
        out_dir, denoiser=_restore_label_table(prior), autoencoder=prior.autoencoder.model,
        class_table=prior.class_table if prior.conditioning == "cross_attention" else None,
        scheduler_config=prior.scheduler_config, conditioning=prior.conditioning,
        num_classes=prior.num_classes, image_size=prior.image_size,
        scaling_factor=prior.autoencoder.scaling_factor, class_names=prior.class_names,
        description=description)


def read_manifest(path) -> dict:
    """The manifest of a prior folder, or a PriorError saying what is wrong."""
    folder = Path(path)
    if not folder.is_dir():
        raise PriorError(f"prior folder {folder} does not exist; pass a folder written by "
                         "`ld3m-fast convert` or `ld3m_fast.save_prior`")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise PriorError(f"{folder} is not an ld3m-fast prior folder: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise PriorError(f"{manifest_path} is not valid JSON ({error})") from None
    if manifest.get("format") != FORMAT:
        raise PriorError(f"{manifest_path} is not an ld3m-fast prior manifest")
    return manifest


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a `save_pretrained` folder (single or sharded safetensors)."""
    single = folder / "diffusion_pytorch_model.safetensors"
    if single.is_file():
        return load_file(single)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(folder / shard).items()}
    raise PriorError(f"{folder} has no diffusion_pytorch_model.safetensors")


def _listing(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: str):
    """Strict key and shape check, with every problem named (not torch's generic message)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    wrong_shape = [f"{k} {tuple(state[k].shape)} != {expected[k]}"
                   for k in expected.keys() & state.keys() if tuple(state[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_listing(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_listing(unexpected)})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} with wrong shape ({_listing(wrong_shape, 4)})")
    if problems:
        raise PriorError(f"{where}: weights do not match config.json: " + "; ".join(problems))


def _load_model(folder: Path, class_name: str, subfolder: str) -> nn.Module:
    """Build the model from its config, then load its weights strictly.

    (diffusers' own `from_pretrained` only warns about missing weights and leaves
    them randomly initialised: the silent failure the released code suffered from.)
    """
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise PriorError(f"this diffusers ({diffusers.__version__}) has no class {class_name}")
    path = folder / subfolder
    if not (path / "config.json").is_file():
        raise PriorError(f"prior folder {folder} has no {subfolder}/config.json")
    try:
        model = cls.from_config(cls.load_config(path))
    except (ValueError, TypeError, KeyError) as error:
        raise PriorError(f"{path}/config.json is not a valid {class_name} config ({error})") from None
    state = _read_weights(path)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state, strict=True)
    return model


def load_prior(path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Prior:
    """Load a prior folder (see module docstring) into a frozen `Prior`.

    Never downloads: `path` must be a local folder. Raises `PriorError` with a
    one-line reason for a missing folder, a missing part, or weights that do not
    match their config.
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    conditioning = manifest.get("conditioning")
    if conditioning not in DENOISERS:
        raise PriorError(f"{folder / MANIFEST}: unknown conditioning {conditioning!r}")
    denoiser_model = _load_model(folder, manifest["denoiser"]["class"], manifest["denoiser"]["subfolder"])
    ae = manifest["autoencoder"]
    ae_model = _load_model(folder, ae["class"], ae["subfolder"])
    class_table = None
    if conditioning == "cross_attention":
        table_path = folder / CLASS_TABLE
        if not table_path.is_file():
            raise PriorError(f"prior folder {folder} has no {CLASS_TABLE}")
        class_table = load_file(table_path)["class_table"]
    scheduler_path = folder / "scheduler" / "scheduler_config.json"
    if not scheduler_path.is_file():
        raise PriorError(f"prior folder {folder} has no scheduler/scheduler_config.json")
    scheduler_config = json.loads(scheduler_path.read_text())
    try:
        prior = Prior(wrap_denoiser(denoiser_model, class_table),
                      wrap_autoencoder(ae_model, ae.get("scaling_factor")),
                      scheduler_config, num_classes=manifest["num_classes"],
                      image_size=manifest["image_size"], class_names=manifest.get("class_names"))
    except (ValueError, KeyError) as error:
        raise PriorError(f"prior folder {folder} is inconsistent: {error}") from None
    return prior.to(device=device, dtype=dtype)
