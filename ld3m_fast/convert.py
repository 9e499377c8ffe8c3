"""Convert the CompVis `cin256-v2` checkpoint into an ld3m-fast prior folder.

    ld3m-fast convert model.ckpt priors/cin256-v2 [--force]

The CompVis LatentDiffusion state_dict (906 tensors, see `priors/compvis_keys.py`)
becomes a diffusers `UNet2DConditionModel` + `VQModel`, a class table
(1001, 512) whose last row is the null class, and a DDIM scheduler config.

The key map is strict in both directions:

1. the checkpoint is compared with the key names and shapes that the published config
   implies: an unexpected key, a missing key or a wrong shape is a `PriorError` naming them;
2. the map from CompVis to diffusers names is traced through diffusers' own single-file
   conversion helpers (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`), run
   on meta tensors, and must send every UNet / VQ tensor to exactly one diffusers weight
   and fill every diffusers weight exactly once;
3. the schedule buffers are read, `betas` (and `alphas_cumprod`) are checked against the
   scheduler config, and then dropped: the schedule lives in the scheduler config.

Checkpoints are read with `torch.load(..., weights_only=True)`, never with
`weights_only=False`.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import logging
import math
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import PriorError
from .priors import read_manifest, save_prior_parts
from .priors.compvis_keys import (CLASS_TABLE_KEY, UNET_PREFIX, VQ_PREFIX,
                                  compvis_state_dict_shapes)
from .priors.configs import (CIN256_V2_COMPVIS_UNET_PARAMS, CIN256_V2_COMPVIS_VQ_PARAMS,
                             CIN256_V2_IMAGE_SIZE, CIN256_V2_NUM_CLASSES,
                             CIN256_V2_SCALING_FACTOR, CIN256_V2_SCHEDULER_CONFIG, instantiate,
                             unet_config_from_compvis, vq_config_from_compvis)

logger = logging.getLogger(__name__)

# Globals a harmless CompVis/Lightning checkpoint may reference besides tensors:
# numpy scalars (e.g. a numpy `global_step`). Anything else means the file carries
# pickled objects that we refuse to import.
# name -> (modules to try: numpy >= 2 first, then numpy 1; attribute)
_SCALAR = (("numpy._core.multiarray", "numpy.core.multiarray"), "scalar")
_ALLOWED_GLOBALS = {
    "numpy.dtype": (("numpy",), "dtype"),
    "numpy.core.multiarray.scalar": _SCALAR,
    "numpy._core.multiarray.scalar": _SCALAR,
}
# Rebuilding a numpy dtype yields an instance of its dtype class, which the weights-only
# unpickler must also accept (these names never show up as referenced globals).
_NUMPY_DTYPE_CLASSES = ("BoolDType", "Int32DType", "Int64DType", "UInt8DType",
                        "Float16DType", "Float32DType", "Float64DType")
_SHOWN_NAMES = 10


@dataclass(frozen=True)
class CompVisLDMConfig:
    """What a CompVis class-conditional LDM checkpoint holds, as published config data.

    unet_params / vq_params: CompVis `unet_config.params` / `first_stage_config.params`.
    scheduler_config: the diffusers scheduler config equal to the training schedule.
    num_classes: real classes; the table has num_classes + 1 rows (last = null class).
    """
    unet_params: dict
    vq_params: dict
    scheduler_config: dict
    num_classes: int
    image_size: int
    scaling_factor: float = 1.0

    @property
    def context_dim(self) -> int:
        return self.unet_params["context_dim"]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key and shape of the checkpoint's state_dict."""
        return compvis_state_dict_shapes(
            self.unet_params, self.vq_params, self.num_classes + 1, self.context_dim,
            num_timesteps=self.scheduler_config["num_train_timesteps"])


CIN256_V2 = CompVisLDMConfig(
    unet_params=CIN256_V2_COMPVIS_UNET_PARAMS, vq_params=CIN256_V2_COMPVIS_VQ_PARAMS,
    scheduler_config=CIN256_V2_SCHEDULER_CONFIG, num_classes=CIN256_V2_NUM_CLASSES,
    image_size=CIN256_V2_IMAGE_SIZE, scaling_factor=CIN256_V2_SCALING_FACTOR)


@dataclass(frozen=True)
class Placement:
    """Where one CompVis tensor lands: `component` ("unet" | "vq"), diffusers `key`, `shape`.

    `shape` may drop trailing singleton dims of the CompVis tensor (1x1 conv -> Linear).
    """
    component: str
    key: str
    shape: tuple[int, ...]


@dataclass
class ConvertedPrior:
    """Converted parts, ready for the diffusers constructors and `save_prior_parts`.

    unet_state_dict / vq_state_dict: complete state dicts for `unet_config` / `vq_config`;
    class_table: (num_classes + 1, context_dim) float32, last row = null class.
    """
    unet_state_dict: dict[str, torch.Tensor]
    vq_state_dict: dict[str, torch.Tensor]
    class_table: torch.Tensor
    scheduler_config: dict
    unet_config: dict
    vq_config: dict


def _listing(names, what: str) -> str:
    """'<count> <what>: a, b, c, ... (and N more)' with the first few names, sorted."""
    names = sorted(names)
    shown = ", ".join(names[:_SHOWN_NAMES])
    more = f" (and {len(names) - _SHOWN_NAMES} more)" if len(names) > _SHOWN_NAMES else ""
    return f"{len(names)} {what}: {shown}{more}"


# --- reading the checkpoint ------------------------------------------------------------------

def _first_importable(module_names: tuple[str, ...], attribute: str):
    for module_name in module_names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {module_names} provides {attribute}")


def _numpy_safe_globals(referenced: list[str]) -> list[tuple[object, str]]:
    """(object, pickled name) pairs for `torch.serialization.safe_globals`."""
    import numpy

    pairs = []
    for name in referenced:
        module_names, attribute = _ALLOWED_GLOBALS[name]
        pairs.append((_first_importable(module_names, attribute), name))
    for name in _NUMPY_DTYPE_CLASSES:
        if hasattr(getattr(numpy, "dtypes", None), name):
            pairs.append((getattr(numpy.dtypes, name), f"numpy.dtypes.{name}"))
    return pairs


def _unpickling_reason(error: Exception) -> str:
    """The informative line of a weights-only load error (torch wraps it in advice)."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:200] if lines else type(error).__name__


def _load_allowing_numpy(path: Path, first_error: Exception):
    """Retry a weights_only load that met unknown globals, if they are only numpy scalars."""
    try:
        referenced = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip checkpoint: its globals cannot be listed without unpickling
        raise PriorError(f"cannot read {path} as a PyTorch checkpoint with weights_only=True "
                         f"({_unpickling_reason(first_error)})") from None
    refused = [name for name in referenced if name not in _ALLOWED_GLOBALS]
    if refused or not referenced:
        reason = _listing(refused, "unknown globals") if refused else _unpickling_reason(first_error)
        raise PriorError(
            f"{path} is not a plain state-dict checkpoint ({reason}); ld3m-fast loads checkpoints "
            "with weights_only=True only. In an environment you trust, re-save just the weights: "
            "torch.save({'state_dict': torch.load(CKPT, weights_only=False)['state_dict']}, OUT)")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals(referenced)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise PriorError(f"{path} is not a plain state-dict checkpoint "
                         f"({_unpickling_reason(error)})") from None


def load_compvis_state_dict(path) -> dict[str, torch.Tensor]:
    """The state_dict of a CompVis/Lightning checkpoint (`ckpt["state_dict"]`, or a bare one).

    `.safetensors` files are read with safetensors; anything else with
    `torch.load(weights_only=True)`, allowing numpy scalars and nothing else.
    """
    path = Path(path)
    if not path.is_file():
        raise PriorError(f"checkpoint {path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise PriorError(f"cannot read {path} as a safetensors checkpoint ({error})") from None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        checkpoint = _load_allowing_numpy(path, error)
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise PriorError(f"cannot read {path} as a PyTorch checkpoint "
                         f"({_unpickling_reason(error)})") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items()):
        raise PriorError(f"{path} holds neither a dict with a 'state_dict' of tensors nor a "
                         "state_dict itself")
    return dict(checkpoint)


# --- the key map ---------------------------------------------------------------------------------

def _diffusers_shapes(class_name: str, config: dict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in instantiate(class_name, config).state_dict().items()}


def _trace_helpers(probes: dict[str, torch.Tensor], unet_config: dict, vq_config: dict):
    """Run diffusers' LDM converters on meta probes; yields (component, diffusers key, value)."""
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    unet = convert_ldm_unet_checkpoint(probes, unet_config)
    # The VAE helper also serves VQModel: same Encoder/Decoder names; only the codebook
    # (quantize.embedding.weight, identical name in both) is outside its scope.
    vq = convert_ldm_vae_checkpoint(probes, vq_config)
    vq["quantize.embedding.weight"] = probes.get(VQ_PREFIX + "quantize.embedding.weight")
    for component, converted in (("unet", unet), ("vq", vq)):
        for key, value in converted.items():
            if value is not None:
                yield component, key, value


def _reshape_allowed(source: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Same shape, or a 1x1 (or width-1) convolution kernel read as a Linear weight."""
    return source == target or (source[:len(target)] == target
                                and all(d == 1 for d in source[len(target):]))


def compvis_key_map(config: CompVisLDMConfig = CIN256_V2) -> dict[str, Placement]:
    """{CompVis key: Placement} for every UNet and VQ tensor of `config`'s checkpoint.

    Traced through diffusers' single-file converters on meta tensors (no memory, no
    weights): each output is the probe itself or a slice of it, so its source is known
    by identity. Raises `PriorError` unless the map is a bijection onto the diffusers
    state dicts with compatible shapes.
    """
    unet_config = unet_config_from_compvis(config.unet_params)
    vq_config = vq_config_from_compvis(config.vq_params, config.scaling_factor)
    shapes = {k: v for k, v in config.expected_shapes().items()
              if k.startswith((UNET_PREFIX, VQ_PREFIX))}
    probes = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    source_of = {id(probe): key for key, probe in probes.items()}

    key_map: dict[str, Placement] = {}
    filled: dict[tuple[str, str], str] = {}
    twice = []
    for component, key, value in _trace_helpers(probes, unet_config, vq_config):
        root = value if value._base is None else value._base
        source = source_of.get(id(root))
        if source is None:
            raise RuntimeError(f"diffusers converter produced {component}.{key} from no probe")
        if source in key_map or (component, key) in filled:
            twice.append(source)
        key_map[source] = Placement(component, key, tuple(value.shape))
        filled[(component, key)] = source

    targets = {"unet": _diffusers_shapes("UNet2DConditionModel", unet_config),
               "vq": _diffusers_shapes("VQModel", vq_config)}
    unplaced = [k for k in shapes if k not in key_map]
    nowhere = [s for s, p in key_map.items() if p.key not in targets[p.component]]
    unfilled = [f"{c}.{k}" for c, keys in targets.items() for k in keys if (c, k) not in filled]
    misfit = [s for s, p in key_map.items() if p.key in targets[p.component]
              and not (p.shape == targets[p.component][p.key] and _reshape_allowed(shapes[s], p.shape))]
    problems = [_listing(names, what) for names, what in (
        (unplaced, "checkpoint tensors the key map does not place"),
        (nowhere, "checkpoint tensors mapped to names the diffusers model lacks"),
        (twice, "checkpoint tensors mapped twice or onto an already filled weight"),
        (unfilled, "diffusers weights left unfilled"),
        (misfit, "checkpoint tensors whose shape does not fit their diffusers weight"),
    ) if names]
    if problems:
        import diffusers

        raise PriorError(f"the CompVis -> diffusers {diffusers.__version__} key map is incomplete: "
                         + "; ".join(problems))
    return key_map


# --- conversion ----------------------------------------------------------------------------------

def _check_keys_and_shapes(state_dict: dict[str, torch.Tensor], config: CompVisLDMConfig):
    expected = config.expected_shapes()
    unexpected = [k for k in state_dict if k not in expected]
    missing = [k for k in expected if k not in state_dict]
    wrong = [f"{k} {tuple(state_dict[k].shape)} != {expected[k]}"
             for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    problems = [_listing(names, what) for names, what in (
        (unexpected, "unexpected keys"), (missing, "missing keys"), (wrong, "shape mismatches"))
        if names]
    if problems:
        raise PriorError(f"checkpoint does not match the CompVis config ({len(expected)} tensors "
                         "expected): " + "; ".join(problems))


def _check_schedule(state_dict: dict[str, torch.Tensor], scheduler_config: dict):
    """The checkpoint's betas and alphas_cumprod must equal those of `scheduler_config`."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(copy.deepcopy(scheduler_config))
    described = (f"{scheduler_config['beta_schedule']} {scheduler_config['beta_start']} -> "
                 f"{scheduler_config['beta_end']} over {scheduler_config['num_train_timesteps']} steps")
    for name, expected in (("betas", scheduler.betas), ("alphas_cumprod", scheduler.alphas_cumprod)):
        found = state_dict[name].to(torch.float64)
        expected = expected.to(torch.float64)
        # float32 storage on both sides: 1e-4 relative is far below any schedule change
        # (sqrt-linear vs linear differ by 30 % mid-way) and far above rounding.
        if not torch.allclose(found, expected, rtol=1e-4, atol=1e-7):
            worst = int((found - expected).abs().argmax())
            raise PriorError(
                f"checkpoint {name} do not match the scheduler config ({described}): at t={worst} "
                f"the checkpoint has {found[worst].item():.6g}, the config {expected[worst].item():.6g}; "
                "this checkpoint was trained with a different noise schedule")


def convert_state_dict(state_dict: dict[str, torch.Tensor],
                       config: CompVisLDMConfig = CIN256_V2) -> ConvertedPrior:
    """Map a CompVis LDM state_dict onto diffusers UNet2DConditionModel + VQModel state dicts.

    state_dict: the checkpoint's `state_dict` (906 tensors for cin256-v2). Floating
    tensors come out as float32; 1x1-conv attention kernels as Linear weights (C, C).
    Raises `PriorError` listing unexpected, missing or mis-shaped keys, and when the
    schedule buffers disagree with `config.scheduler_config`.
    """
    _check_keys_and_shapes(state_dict, config)
    _check_schedule(state_dict, config.scheduler_config)
    parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "vq": {}}
    seen_storages: set[int] = set()
    for source, place in compvis_key_map(config).items():
        tensor = state_dict[source].reshape(place.shape)
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages or not tensor.is_contiguous():
            # Tensors that share memory cannot be saved side by side with safetensors.
            tensor = tensor.contiguous().clone()
        seen_storages.add(tensor.untyped_storage().data_ptr())
        parts[place.component][place.key] = tensor
    return ConvertedPrior(
        unet_state_dict=parts["unet"], vq_state_dict=parts["vq"],
        class_table=state_dict[CLASS_TABLE_KEY].to(torch.float32),
        scheduler_config=copy.deepcopy(config.scheduler_config),
        unet_config=unet_config_from_compvis(config.unet_params),
        vq_config=vq_config_from_compvis(config.vq_params, config.scaling_factor))


def _load_into(class_name: str, config: dict, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A diffusers model whose weights *are* `state_dict` (built on meta: no second copy)."""
    model = instantiate(class_name, config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"{class_name}: tensors outside the state dict stayed on meta: "
                           f"{left_on_meta[:_SHOWN_NAMES]}")
    return model.eval()


def build_modules(converted: ConvertedPrior) -> tuple[nn.Module, nn.Module]:
    """(UNet2DConditionModel, VQModel) holding the converted weights."""
    return (_load_into("UNet2DConditionModel", converted.unet_config, converted.unet_state_dict),
            _load_into("VQModel", converted.vq_config, converted.vq_state_dict))


def _check_out_dir(out_dir: Path, force: bool):
    """Before the checkpoint is read: OUT_DIR can be written (and is empty, or --force)."""
    from .priors.pipeline import check_output_folder

    check_output_folder(out_dir, force)


def convert_cin256_v2(ckpt_path, out_dir, *, force: bool = False,
                      config: CompVisLDMConfig = CIN256_V2) -> Path:
    """Convert a CompVis cin256-v2 `.ckpt` into a prior folder that `load_prior` reads.

    The folder is written atomically (temporary folder, then rename); an existing
    non-empty `out_dir` is replaced only with `force=True`. `config` describes the
    checkpoint (scaled-down relatives in tests). Returns `out_dir`.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, force)
    converted = convert_state_dict(load_compvis_state_dict(ckpt_path), config)
    unet, vq = build_modules(converted)
    return save_prior_parts(
        out_dir, denoiser=unet, autoencoder=vq, class_table=converted.class_table,
        scheduler_config=converted.scheduler_config, conditioning="cross_attention",
        num_classes=config.num_classes, image_size=config.image_size,
        scaling_factor=config.scaling_factor,
        description=f"CompVis LDM converted from {Path(ckpt_path).name}")


# --- CLI -------------------------------------------------------------------------------------

def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `ld3m-fast convert CKPT OUT_DIR [--force]`."""
    parser.add_argument("checkpoint", metavar="CKPT", type=Path,
                        help="CompVis cin256-v2 checkpoint (.ckpt with a 'state_dict')")
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path,
                        help="prior folder to write (diffusers sub-folders + ld3m_prior.json)")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT_DIR if it exists and is not empty")
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Entry point of `ld3m-fast convert`; returns the exit code (errors raise PriorError)."""
    out_dir = convert_cin256_v2(args.checkpoint, args.out_dir, force=args.force)
    manifest = read_manifest(out_dir)
    sizes = {part["class"]: _parameters_in(out_dir / part["subfolder"])
             for part in (manifest["denoiser"], manifest["autoencoder"])}
    logger.info(f"wrote {out_dir}: " + ", ".join(f"{name} {count / 1e6:.1f} M parameters"
                                                 for name, count in sizes.items())
                + f", class table {manifest['num_classes']} classes + null row")
    return 0


def _parameters_in(folder: Path) -> int:
    """Number of values in a save_pretrained folder's safetensors files (headers only)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    return total
