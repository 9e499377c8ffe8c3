"""Prior folders: diffusers `save_pretrained` sub-folders plus a small manifest.

Layout of a prior folder:

    ld3m_prior.json            manifest (format, classes, conditioning, scaling factor, ...)
    unet/ or transformer/      the denoiser, `save_pretrained` layout
    vqvae/ or vae/             the autoencoder, `save_pretrained` layout
    scheduler/                 a diffusers scheduler config (the training noise schedule)
    class_table.safetensors    the class table, when it lives outside the denoiser

A diffusers pipeline folder (`model_index.json`) loads too: its manifest is inferred from its
own files (`pipeline.py`), and `ld3m-fast prior import` writes it out as a prior folder.

Loading is strict: weights that do not match their config.json are an error. The folder
is treated as untrusted input: every file it names must lie inside it (no '..', absolute
paths or symlinks leading out), tensors come only from safetensors files, and anything
malformed is one `PriorError` line naming the file, checked before any weights are read.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .._files import atomic_folder
from ..errors import PriorError
from .adapters import (AdaLNDenoiser, AutoencoderAdapter, ClassEmbeddingDenoiser,
                       CrossAttentionDenoiser, DenoiserAdapter, KLAutoencoder, VQAutoencoder)
from .prior import Prior, alphas_cumprod_from_config

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
    from diffusers import DDIMScheduler

    with atomic_folder(out_dir) as tmp:
        denoiser.save_pretrained(tmp / denoiser_sub, safe_serialization=True)
        autoencoder.save_pretrained(tmp / ae_sub, safe_serialization=True)
        DDIMScheduler.from_config(
            {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
        ).save_pretrained(tmp / "scheduler")
        if class_table is not None:
            save_file({"class_table": class_table.detach().contiguous().cpu()}, tmp / CLASS_TABLE)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
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


# --------------------------------------------------------------------------- reading a prior folder
#
# Everything below treats the folder as untrusted input: every file it names must stay inside
# it, every JSON value is checked for its type before diffusers sees it, and every failure is a
# one-line `PriorError` that names the file and says how to repair it.

MANIFEST_VERSION = 1
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
PICKLED_WEIGHTS = "diffusion_pytorch_model.bin"  # diffusers pipelines saved before safetensors
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"

# Keys that fix a model's tensor shapes. diffusers fills a missing key with its own default,
# which would silently build another model (and plan it, when no weights are read).
REQUIRED_CONFIG_KEYS = {
    "UNet2DConditionModel": ("in_channels", "out_channels", "block_out_channels",
                             "down_block_types", "up_block_types", "cross_attention_dim"),
    "UNet2DModel": ("in_channels", "out_channels", "block_out_channels", "down_block_types",
                    "up_block_types", "num_class_embeds"),
    "DiTTransformer2DModel": ("in_channels", "num_layers", "num_attention_heads",
                              "attention_head_dim", "patch_size", "sample_size",
                              "num_embeds_ada_norm"),
    "VQModel": ("in_channels", "out_channels", "block_out_channels", "latent_channels",
                "num_vq_embeddings"),
    "AutoencoderKL": ("in_channels", "out_channels", "block_out_channels", "latent_channels"),
}
# Config values checked for their type before the constructor sees them (null is allowed
# where diffusers allows it: it then derives the value).
_POSITIVE_INT = ("in_channels", "out_channels", "latent_channels", "num_vq_embeddings",
                 "num_class_embeds", "num_layers", "patch_size", "norm_num_groups",
                 "num_embeds_ada_norm", "vq_embed_dim")
_POSITIVE_INT_OR_LIST = ("layers_per_block", "cross_attention_dim", "attention_head_dim",
                         "num_attention_heads", "sample_size")
_STRING_LIST = ("down_block_types", "up_block_types")
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# What a diffusers constructor raises for a config it cannot build.
_CONFIG_ERRORS = (ValueError, TypeError, KeyError, AttributeError, IndexError,
                  NotImplementedError, ZeroDivisionError, AssertionError)


def _one_line(error, limit: int = 240) -> str:
    """A foreign error message on one line, shortened (the CLI prints exactly one line)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_positive_int_or_list(value) -> bool:
    if isinstance(value, list):
        return len(value) > 0 and all(_is_int(v) and v > 0 for v in value)
    return _is_int(value) and value > 0


def _inside(root: Path, path: Path, label: str) -> Path:
    """`path`, refused when it resolves (symlinks followed) outside the prior folder `root`."""
    resolved, top = path.resolve(), root.resolve()
    if resolved != top and top not in resolved.parents:
        raise PriorError(f"{label} resolves to {resolved}, outside the prior folder {top}: a "
                         "prior folder must hold its own files (copy them in; no links out, no '..')")
    return path


def _relative(root: Path, base: Path, name, what: str) -> Path:
    """`base / name` for a relative path `name` read from a prior's own files."""
    if not isinstance(name, str) or not name.strip():
        raise PriorError(f"{what} must be a non-empty relative path, got {_short(name)}")
    if Path(name).is_absolute():
        raise PriorError(f"{what} {name!r} is an absolute path; name it relative to the prior "
                         f"folder {root}")
    return _inside(root, base / name, f"{what} {name!r}")


def _read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`, or a PriorError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PriorError(f"cannot read {what} {path}: {_one_line(error)}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise PriorError(f"{what} {path} is not valid JSON ({error}); repair it or write the "
                         "prior folder again") from None
    if not isinstance(value, dict):
        raise PriorError(f"{what} {path} must hold a JSON object, not a {type(value).__name__}")
    return value


def _read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise PriorError(f"cannot read {what} {path}: {_one_line(error)} (a truncated or "
                         "corrupt safetensors file: copy or write it again)") from None


def read_manifest(path) -> dict:
    """The checked manifest of a prior folder, or a PriorError saying what is wrong.

    Checked: the format and version, the conditioning, each part's class (one of the
    supported diffusers model classes) and subfolder, num_classes and image_size
    (positive integers), scaling_factor (a positive number or absent) and class_names.
    Subfolders are not resolved here (see `build_prior`).
    """
    folder = Path(path)
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise PriorError(f"prior folder {folder} {problem}; pass a folder written by "
                         "`ld3m-fast convert` or `ld3m_fast.save_prior`")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise PriorError(f"{folder} is not an ld3m-fast prior folder: {MANIFEST} is missing")
    _inside(folder, manifest_path, f"manifest {manifest_path}")
    manifest = _read_json(manifest_path, "prior manifest")
    if manifest.get("format") != FORMAT:
        raise PriorError(f"{manifest_path} is not an ld3m-fast prior manifest "
                         f"(\"format\" is not {FORMAT!r})")
    _check_manifest(manifest, manifest_path)
    return manifest


def _check_manifest(manifest: dict, where: Path) -> None:
    def bad(problem: str):
        raise PriorError(f"{where}: {problem}; fix the manifest or write the folder again "
                         "with ld3m_fast.save_prior")

    version = manifest.get("version", MANIFEST_VERSION)
    if not _is_int(version) or version < 1:
        bad(f"\"version\" must be a positive integer, got {_short(version)}")
    if version > MANIFEST_VERSION:
        raise PriorError(f"{where} has manifest version {version}, newer than this ld3m-fast "
                         f"reads ({MANIFEST_VERSION}): upgrade ld3m-fast")
    conditioning = manifest.get("conditioning")
    if conditioning not in DENOISERS:
        bad(f"unknown \"conditioning\" {_short(conditioning)}; use one of {', '.join(DENOISERS)}")
    expected = DENOISERS[conditioning][0]
    for role in ("denoiser", "autoencoder"):
        part = manifest.get(role)
        if not isinstance(part, dict):
            bad(f"\"{role}\" must be an object with \"class\" and \"subfolder\", got {_short(part)}")
        name = part.get("class")
        if role == "denoiser" and name != expected:
            if name in (c for c, _ in DENOISERS.values()):
                bad(f"denoiser class {name!r} does not fit conditioning {conditioning!r}, "
                    f"which needs {expected}")
            bad(f"denoiser class {_short(name)} is not a supported denoiser model; use one of "
                f"{', '.join(c for c, _ in DENOISERS.values())}")
        if role == "autoencoder" and name not in AUTOENCODERS:
            bad(f"autoencoder class {_short(name)} is not a supported autoencoder model; use "
                f"one of {', '.join(AUTOENCODERS)}")
        subfolder = part.get("subfolder")
        if not isinstance(subfolder, str) or not subfolder.strip():
            bad(f"{role} \"subfolder\" must be a non-empty relative path, got {_short(subfolder)}")
    scaling = manifest["autoencoder"].get("scaling_factor")
    if scaling is not None and not (_is_number(scaling) and scaling > 0):
        bad(f"autoencoder \"scaling_factor\" must be a positive number, got {_short(scaling)}")
    for key in ("num_classes", "image_size"):
        value = manifest.get(key)
        if not _is_int(value) or value < 1:
            bad(f"\"{key}\" must be a positive integer, got "
                f"{'nothing' if key not in manifest else _short(value)}")
    names = manifest.get("class_names")
    if names is not None and (not isinstance(names, list) or not all(isinstance(n, str) for n in names)
                              or len(names) != manifest["num_classes"]):
        bad(f"\"class_names\" must be null or a list of {manifest['num_classes']} strings "
            f"(num_classes), got {_short(names)}")


def _model_config(root: Path, part: dict, role: str) -> tuple[str, Path, dict]:
    """(class name, subfolder path, checked config.json) of a manifest part."""
    class_name = part["class"]
    folder = _relative(root, root, part["subfolder"], f"{role} subfolder")
    if not (folder / "config.json").is_file():
        raise PriorError(f"prior folder {root} has no {part['subfolder']}/config.json")
    config_path = _inside(root, folder / "config.json", f"{role} config {folder / 'config.json'}")
    config = _read_json(config_path, f"{role} config")

    def bad(problem: str):
        raise PriorError(f"{config_path} is not a valid {class_name} config: {problem}")

    missing = [k for k in REQUIRED_CONFIG_KEYS[class_name] if config.get(k) is None]
    if missing:
        bad(f"{', '.join(missing)} missing (these keys fix the model's shapes)")
    for key in _POSITIVE_INT:
        if config.get(key) is not None and not (_is_int(config[key]) and config[key] > 0):
            bad(f"{key} must be a positive integer, got {_short(config[key])}")
    for key in _POSITIVE_INT_OR_LIST:
        if config.get(key) is not None and not _is_positive_int_or_list(config[key]):
            bad(f"{key} must be a positive integer or a list of them, got {_short(config[key])}")
    if config.get("block_out_channels") is not None and not (
            isinstance(config["block_out_channels"], list) and _is_positive_int_or_list(config["block_out_channels"])):
        bad(f"block_out_channels must be a list of positive integers, got "
            f"{_short(config['block_out_channels'])}")
    for key in _STRING_LIST:
        value = config.get(key)
        if value is not None and not (isinstance(value, list) and value
                                      and all(isinstance(v, str) for v in value)):
            bad(f"{key} must be a list of block names, got {_short(value)}")
    if "scaling_factor" in config and config["scaling_factor"] is not None and not (
            _is_number(config["scaling_factor"]) and config["scaling_factor"] > 0):
        bad(f"scaling_factor must be a positive number, got {_short(config['scaling_factor'])}")
    return class_name, folder, config


# Bytes per timestep of the noise-schedule tables a prior builds (diffusers' float32 betas, alphas,
# alphas_cumprod and int64 timesteps; the float64 copy; the chain's Python floats).
SCHEDULE_BYTES_PER_TIMESTEP = 64


def _check_fits_in_ram(needed: int, what: str, where) -> None:
    """Refuse, before allocating it, what cannot fit in the RAM available now (one line)."""
    from ..distill.planner.memory import device_free_memory

    available, _ = device_free_memory("cpu")
    if needed > available:
        raise PriorError(f"{where}: {what} need at least {needed / 1e9:.3g} GB, more than the "
                         f"{available / 1e9:.3g} GB of RAM available; fix it or write the prior folder again")


def _levels(value, count: int) -> list[int]:
    """A per-level config value (an int for every level, or a list)."""
    return list(value) if isinstance(value, list) else [value] * count


def estimated_parameters(class_name: str, config: dict) -> int:
    """A lower bound on the parameters of a checked config, from its sizes alone (one 3x3
    convolution per residual block of a UNet or autoencoder level, the attention projections of a
    DiT block): an absurd config (block_out_channels 65536) is refused before it is built."""
    if class_name == "DiTTransformer2DModel":
        inner = _levels(config["num_attention_heads"], 1)[0] * _levels(config["attention_head_dim"], 1)[0]
        return config["num_layers"] * 4 * inner * inner
    channels = config["block_out_channels"]
    layers = _levels(config.get("layers_per_block") or 1, len(channels))
    per_side = sum(n * 9 * c * c for n, c in zip(layers, channels))
    return per_side * (2 if class_name in AUTOENCODERS else 1)  # an autoencoder has both sides


def _build_model(class_name: str, folder: Path, config: dict) -> nn.Module:
    """The diffusers model of a checked config (random weights, or fake under FakeTensorMode)."""
    import diffusers

    cls = getattr(diffusers, class_name)  # one of DENOISERS / AUTOENCODERS, checked by read_manifest
    # id2label (a pipeline's class names, read by ld3m-fast) is no constructor argument.
    config = {k: v for k, v in config.items() if k != "id2label"}
    try:
        return cls.from_config(config)
    except _CONFIG_ERRORS as error:
        raise PriorError(f"{folder / 'config.json'} is not a valid {class_name} config "
                         f"({_one_line(error)})") from None


def _read_weights(root: Path, folder: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a `save_pretrained` folder (single or sharded safetensors; with
    `allow_pickle`, a diffusers pipeline's older `.bin`, read with `weights_only=True`)."""
    single = folder / WEIGHTS
    if single.is_file():
        return _read_safetensors(_inside(root, single, f"weights file {single}"), "weights file")
    index_path = folder / WEIGHTS_INDEX
    if allow_pickle and not index_path.is_file() and (folder / PICKLED_WEIGHTS).is_file():
        return _read_pickled_weights(_inside(root, folder / PICKLED_WEIGHTS, f"weights file {folder}"))
    if not index_path.is_file():
        present = sorted(p.name for p in folder.glob("*") if p.suffix in (".safetensors", ".bin"))
        raise PriorError(f"{folder} has no {WEIGHTS} (nor a sharded {WEIGHTS_INDEX})"
                         + (f"; it holds {', '.join(present)} (a variant: rename it to {WEIGHTS})"
                            if present else ""))
    index = _read_json(_inside(root, index_path, f"weights index {index_path}"), "weights index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise PriorError(f"weights index {index_path} has no \"weight_map\" object of tensor "
                         "name -> shard file; repair it or write the prior folder again")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = _relative(root, folder, shard, f"shard named in {index_path}:")
        if not path.is_file():
            raise PriorError(f"shard {shard!r} named in {index_path} is missing; copy it into "
                             f"{folder} or write the prior folder again")
        tensors = _read_safetensors(path, "weights shard")
        twice = state.keys() & tensors.keys()
        if twice:
            raise PriorError(f"weights shard {path} repeats tensors of another shard "
                             f"({_listing(twice)}); the shards do not belong together")
        state.update(tensors)
    return state


def _read_pickled_weights(path: Path) -> dict[str, torch.Tensor]:
    """A `.bin` state dict, unpickled with `weights_only=True` (tensors and plain containers only)."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError) as error:
        raise PriorError(f"cannot read weights file {path}: {_one_line(error)} (a corrupt file, or one "
                         "holding more than tensors)") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise PriorError(f"weights file {path} is not a state dict of named tensors")
    return state


def _listing(names, limit: int = 8) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], where: str):
    """Strict key, shape and dtype check, with every problem named (not torch's generic message).

    A stored tensor must be floating point exactly where the model's is: `load_state_dict`
    would otherwise cast integers into weights silently. Half or bfloat16 weights are fine.
    """
    model_state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in model_state.items()}
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    common = expected.keys() & state.keys()
    wrong_shape = [f"{k} {tuple(state[k].shape)} != {expected[k]}"
                   for k in common if tuple(state[k].shape) != expected[k]]
    wrong_dtype = [f"{k} {state[k].dtype} (needs {model_state[k].dtype})" for k in common
                   if state[k].is_floating_point() != model_state[k].is_floating_point()]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_listing(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_listing(unexpected)})")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} with wrong shape ({_listing(wrong_shape, 4)})")
    if wrong_dtype:
        problems.append(f"{len(wrong_dtype)} with wrong dtype ({_listing(wrong_dtype, 4)})")
    if problems:
        raise PriorError(f"{where}: weights do not match config.json: " + "; ".join(problems))


def _check_finite(state: dict[str, torch.Tensor], where: str):
    """NaN or inf in frozen weights can only render NaN images: refuse them at load time,
    before a run folder exists, rather than as a NaN loss at iteration 1."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise PriorError(f"{where}: {len(bad)} tensor(s) hold NaN or inf ({_listing(bad, 4)}); "
                         "the weights are corrupt: convert or copy them again")


def _load_weights(root: Path, model: nn.Module, folder: Path, allow_pickle: bool = False) -> None:
    """Load a model's weights strictly (diffusers' own `from_pretrained` only warns about
    missing weights and leaves them random: the silent failure the released code suffered from)."""
    state = _read_weights(root, folder, allow_pickle)
    check_state_dict(model, state, str(folder))
    _check_finite(state, str(folder))
    model.load_state_dict(state, strict=True)


def read_scheduler_config(path, subfolder: str = "scheduler") -> dict:
    """The checked training-schedule config (`<subfolder>/scheduler_config.json`) of a prior folder.

    Required: num_train_timesteps, and beta_schedule with beta_start/beta_end (or
    trained_betas); prediction_type must be epsilon (the chain needs noise predictions).
    The schedule it gives must have 0 < abar_t <= 1, non-increasing.
    """
    from .._host import host_values

    root = Path(path)
    config_path = _relative(root, root, f"{subfolder}/scheduler_config.json", "scheduler config")
    if not config_path.is_file():
        raise PriorError(f"prior folder {root} has no {subfolder}/scheduler_config.json")
    config = _read_json(_inside(root, config_path, f"scheduler config {config_path}"), "scheduler config")

    def bad(problem: str):
        raise PriorError(f"{config_path}: {problem}; fix it or write the prior folder again")

    steps = config.get("num_train_timesteps")
    if not _is_int(steps) or steps < 2:
        bad(f"num_train_timesteps must be an integer >= 2, got "
            f"{'nothing' if 'num_train_timesteps' not in config else _short(steps)}")
    betas = config.get("trained_betas")
    if betas is not None:
        if not (isinstance(betas, list) and len(betas) == steps and all(_is_number(b) for b in betas)):
            bad(f"trained_betas must be null or a list of num_train_timesteps ({steps}) numbers")
    else:
        schedule = config.get("beta_schedule")
        if schedule not in _BETA_SCHEDULES:
            bad(f"beta_schedule must be one of {', '.join(_BETA_SCHEDULES)}, got "
                f"{'nothing' if 'beta_schedule' not in config else _short(schedule)}")
        if schedule != "squaredcos_cap_v2":
            for key in ("beta_start", "beta_end"):
                value = config.get(key)
                if not (_is_number(value) and 0 < value < 1):
                    bad(f"{key} must be a number in (0, 1), got "
                        f"{'nothing' if key not in config else _short(value)}")
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        bad(f"prediction_type {_short(prediction)} is not supported: the LD3M chain needs a "
            "noise-predicting (epsilon) model")
    _check_fits_in_ram(SCHEDULE_BYTES_PER_TIMESTEP * steps, f"the noise schedule's tables of num_train_timesteps "
                       f"{steps}", config_path)
    try:
        alphas_cumprod = alphas_cumprod_from_config(config)
    except _CONFIG_ERRORS as error:
        bad(f"diffusers cannot build its schedule ({_one_line(error)})")
    with host_values():
        valid = bool(((alphas_cumprod > 0) & (alphas_cumprod <= 1)).all()
                     and (alphas_cumprod[1:] <= alphas_cumprod[:-1]).all())
    if not valid:
        bad("its noise schedule is not valid (needs 0 < abar_t <= 1, non-increasing in t)")
    return config


def _read_class_table(root: Path, path: Path | None = None) -> torch.Tensor:
    """class_table.safetensors (`path`, by default in the prior folder `root`, which it must
    then stay inside): one 2-D float tensor named class_table, finite."""
    if path is None or path == root / CLASS_TABLE:
        path = root / CLASS_TABLE
        if not path.is_file():
            raise PriorError(f"prior folder {root} has no {CLASS_TABLE}")
        _inside(root, path, f"class table {path}")
    elif not Path(path).is_file():
        raise PriorError(f"class table {path} does not exist")
    tensors = _read_safetensors(path, "class table")
    if "class_table" not in tensors:
        raise PriorError(f"{path} has no tensor named 'class_table' (it holds "
                         f"{_listing(tensors) or 'nothing'})")
    table = tensors["class_table"]
    if table.dim() != 2 or not table.is_floating_point():
        raise PriorError(f"{path}: class_table must be a 2-D floating-point tensor "
                         f"(num_classes + 1, D), got {tuple(table.shape)} {table.dtype}")
    _check_finite({"class_table": table}, str(path))
    return table


def build_prior(path, *, weights: bool = True) -> Prior:
    """A prior folder, a diffusers pipeline folder or a prior file (`pipeline.py`) as a frozen
    `Prior`; with `weights=False` only its architecture.

    Everything cheap is checked before any weights are read: the manifest (or, for a
    pipeline, the facts it is inferred from), both config.json files, the scheduler config,
    every path staying inside the folder. `weights=False` reads no tensor file (the class
    table of a cross-attention prior is zeros): the planner calls it inside `FakeTensorMode`
    to size full models.
    """
    from .pipeline import open_prior_source  # it reads its files through this module's helpers

    source = open_prior_source(path)
    root, manifest = source.root, source.manifest
    conditioning = manifest["conditioning"]
    parts = [_model_config(root, manifest[role], role) for role in ("denoiser", "autoencoder")]
    scheduler_config = read_scheduler_config(root, source.scheduler_subfolder)
    if weights:  # real parameters: what cannot fit is refused before it is built
        for name, folder, config in parts:
            _check_fits_in_ram(4 * estimated_parameters(name, config), f"its sizes make a {name} whose float32 "
                               "weights", folder / "config.json")
    denoiser, autoencoder = (_build_model(name, folder, config) for name, folder, config in parts)
    class_table = None
    if weights:
        for model, (_, folder, _) in zip((denoiser, autoencoder), parts):
            _load_weights(root, model, folder, source.allow_pickled_weights)
        if conditioning == "cross_attention":
            class_table = _read_class_table(root, source.class_table)
    else:
        if conditioning == "cross_attention":
            dim = denoiser.config.cross_attention_dim
            table_dim = dim if _is_int(dim) else dim[0]
            class_table = torch.zeros(manifest["num_classes"] + 1, table_dim)
        elif conditioning == "adaln":
            # Untrained blocks hold different label tables; converted checkpoints share one.
            first = denoiser.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
            for block in denoiser.transformer_blocks[1:]:
                block.norm1.emb.class_embedder.embedding_table.weight = first
    try:
        return Prior(wrap_denoiser(denoiser, class_table),
                     wrap_autoencoder(autoencoder, manifest["autoencoder"].get("scaling_factor")),
                     scheduler_config, num_classes=manifest["num_classes"],
                     image_size=manifest["image_size"], class_names=manifest.get("class_names"))
    except ValueError as error:
        raise PriorError(f"prior folder {root} is inconsistent: {_one_line(error)}") from None


def load_prior(path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> Prior:
    """Load a prior folder (see module docstring), a diffusers pipeline folder or a prior file
    naming one (`ld3m_fast.priors.pipeline`) into a frozen `Prior`.

    Never downloads: `path` must be a local folder (or prior file); a hub id is refused with
    how to download it. Raises `PriorError` with a
    one-line reason for a missing folder, a missing, unreadable or malformed part,
    a path leading outside the folder, or weights that do not match their config.
    """
    return build_prior(path, weights=True).to(device=device, dtype=dtype)
