"""Every setting of a distillation run, declared once.

`DistillConfig` is the single declaration. Each field's `setting(...)` carries its
default, help text, allowed values, bounds, whether it may change when a run is resumed
and whether it decides what one iteration computes and holds (`walked`); its annotation
is its type. Everything else is derived from it:

- the flags of `ld3m-fast distill` and `ld3m-fast plan` (`--ipc`, `--lr-latent`, `--compile`,
  `--no-progress`) and their parsing (`ld3m_fast.cli.settings`);
- the keys of a `--config run.toml` file (field names, with '-' or '_');
- type checking of every value, from a flag, a file or Python (`check_types`), and
  the one-line errors for values out of range (`check_values`, `validate`);
- which settings a resume may change (`RESUMABLE`);
- what the planner walks and keys its walks by (`WALKED`, `walked_settings`); the iteration
  itself is assembled from the config in one place, `ld3m_fast.distill.assemble`.

`resolve_method_defaults` fills the settings left at None from the prior's profile (the
embedded default or the paper's); `resolve_defaults` also picks the run folder and the
thread count.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..bounds import SEED_MAXIMUM, Bounds
from ..choices import ALGORITHMS, DTYPES, GRAD_MODES, MTT_GRADIENTS, NORMS, PRUNE_ORDERS, SKIPS
from ..errors import LD3MError

logger = logging.getLogger(__name__)

ATTENTION_CHECKPOINTING = ("auto", "on", "off")


def setting(default, help: str, *, choices: tuple | None = None, minimum: float | None = None,
            maximum: float | None = None, above: float | None = None, below: float | None = None,
            resumable: bool = False, walked: bool = True, in_file: bool = True, parse=None,
            flag: str | None = None):
    """A `DistillConfig` field with everything the CLI, config files, validation and the planner need.

    choices: allowed values; minimum, maximum (inclusive), above, below (exclusive): bounds for
    numbers (`ld3m_fast.bounds`; None allowed where the type is optional, floats are always
    finite); resumable: may change on `--resume`; walked: decides what one iteration
    computes and holds in memory (the planner walks it; False for output, logging, learning
    rates and the like, which a plan does not depend on); in_file: accepted as a `--config`
    key; parse: text -> value for the flag (default: from the type); flag: the flag's name
    when it is not derived from the field (booleans).
    """
    return field(default=default, metadata={
        "help": help, "choices": choices, "bounds": Bounds(minimum, maximum, above, below), "resumable": resumable,
        "walked": walked, "in_file": in_file, "parse": parse, "flag": flag})


def parse_chunk(text: str):
    """'auto' or a number of images (the --chunk flag)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected a number of images or 'auto', got {text!r}") from None


def parse_dsa(text: str) -> str:
    """A DSA strategy the augmentation reads ('color_crop', 'none'; the --dsa flag)."""
    from ..dsa import check_strategy

    return check_strategy(text)


@dataclass
class DistillConfig:
    """Everything that defines a distillation run; one field per setting."""

    # -- data and prior
    preset: str | None = setting(None, "named settings (the paper's runs, the embedded default; list: "
                                 "`ld3m-fast presets`); a config file and flags win over it", walked=False)
    data: str = setting("fashion-mnist", "data folder (ImageNet tree, ImageFolder, CIFAR-10, "
                        "Fashion-MNIST IDX) or 'fashion-mnist'", walked=False)
    subset: str | None = setting(None, "ImageNet subset name or alias (imagenette, woof, fruits, ...)", walked=False)
    prior: str | None = setting(None, "prior: an ld3m-fast prior folder (`ld3m-fast convert`, `prior import`, "
                                "save_prior), a diffusers pipeline folder, or a prior file naming one; `plan` "
                                "also takes cin256-v2, dit-xl-2-256 (architectures); default: the embedded "
                                "Fashion-MNIST prior")
    max_per_class: int | None = setting(None, "use at most N real images per class", minimum=1, walked=False)
    # -- pruning the real data, as the authors' follow-up releases it (ld3m_fast/prune.py, docs/pruning.md)
    prune_percent: int = setting(100, "keep int(P * n / 100) real images of each class of n, ranked by "
                                 "--prune-scorer's loss (1-100; 100 = no pruning)", minimum=1, maximum=100,
                                 walked=False)
    prune_order: str = setting("asc", "asc: keep the lowest losses (the release's choice), desc: the highest, "
                               "random: a seeded draw (no scorer)", choices=PRUNE_ORDERS, walked=False)
    prune_scorer: str = setting("train", "what scores the real images: a torchvision ResNet-18 state dict (the "
                                "release's ImageNet-pretrained one) or 'train' (a ConvNet trained here on the real "
                                "data; recorded as a deviation from the release)", walked=False)
    prune_losses: str | None = setting(None, "per-image losses written by `ld3m-fast prune` (instead of scoring)",
                                       walked=False)
    prune_scorer_hash: str | None = setting(None, "filled in by the run: the sha256 of the scorer's weights (or "
                                            "the one --prune-losses records); given or recorded, a scorer that "
                                            "hashes otherwise is refused", walked=False)
    cache_dir: str | None = setting(None, "decoded-data cache folder", resumable=True, walked=False)
    # -- the synthetic set and the chain
    algorithm: str = setting("dm", "distillation loss", choices=ALGORITHMS)
    res: int | None = setting(None, "image side, a multiple of the prior's latent factor (default: the "
                              "prior's native size; larger sides render natively and are resized "
                              "with an antialiased, differentiable bilinear interpolation)", minimum=1)
    ipc: int = setting(1, "synthetic images per class", minimum=1)
    steps: int = setting(10, "DDIM steps T of the LD3M chain", minimum=1)
    guidance: float = setting(3.0, "classifier-free guidance scale")
    skip: str = setting("x0", "LD3M skip: x0 (released code), mean (paper Eq. 7), none", choices=SKIPS)
    eta: float = setting(0.0, "DDIM eta, 0..1 (0 = deterministic chain, 1 = DDPM's variance; above 1 the "
                         "step's sigma would exceed what the DDIM step can take)", minimum=0, maximum=1)
    released_compat: bool = setting(False, "reproduce the released LD3M code where ld3m-fast differs: its "
                                    "timestep list (more than T steps when T does not divide 1000), its clamp of "
                                    "decoded images, its half-size truncated-MTT image gradient "
                                    "(docs/released_compat.md)")
    # -- how the chain is differentiated and where it runs
    grad_mode: str = setting("recompute", "how gradients cross the chain", choices=GRAD_MODES)
    chunk: int | str | None = setting(None, "images per generator chunk in released/recompute modes, or "
                                      "'auto' (the planner's cheapest that fits --memory-budget)",
                                      parse=parse_chunk)
    memory_budget: str | None = setting(None, "device memory a plan (--chunk auto, `ld3m-fast plan`) may use "
                                        "before the reserve, e.g. 80GiB (default: the device's free memory "
                                        "at start)", resumable=True, walked=False)
    memory_reserve: str | None = setting(None, "memory left out of the budget for what a plan does not "
                                         "count: the CUDA context, cuBLAS/cuDNN workspaces, the allocator's "
                                         "rounding and fragmentation, e.g. 4GiB or 8%% (default: 1 GiB + 5%% "
                                         "of the budget, see ld3m_fast/distill/planner/memory.py)",
                                         resumable=True, walked=False)
    decoder_chunk: int | None = setting(None, "recompute: images per decoder call, independent of --chunk "
                                        "(default: the whole chunk; with --chunk auto, the planner's)",
                                        minimum=1)
    store_steps: int | None = setting(None, "recompute: the last K chain steps keep state from the render "
                                      "pass instead of being recomputed (default 0; with --chunk auto, the "
                                      "planner's); same gradients, fewer FLOPs, more memory", minimum=0)
    sac_min_flops: float | None = setting(None, "what a stored step keeps: only the outputs of ops doing >= N "
                                          "FLOPs per output element (selective activation checkpointing); "
                                          "unset: its whole graph (with --chunk auto, the planner's)",
                                          minimum=0)
    checkpoint_attention: str = setting("auto", "checkpoint the denoiser's transformer blocks inside every call "
                                        "made with grad, as the released UNet does (`checkpoint=True`); auto: "
                                        "on with --released-compat --grad-mode released",
                                        choices=ATTENTION_CHECKPOINTING)
    dtype: str = setting("fp32", "autocast dtype (Z, c and the latent chain stay fp32)", choices=tuple(DTYPES))
    compile: bool = setting(False, "torch.compile the denoiser, decoder and distillation network",
                            resumable=True, walked=False)
    compile_backend: str = setting("inductor", "torch.compile backend for --compile "
                                   "(inductor; aot_eager to check tracing)", resumable=True, walked=False)
    device: str = setting("cpu", "cpu | cuda | cuda:N", resumable=True, walked=False)
    threads: int | None = setting(None, "CPU threads for torch (default: the cores idle when the run starts, "
                                  "see ld3m_fast/_threads.py; recorded, and kept on resume)", minimum=1,
                                  resumable=True, walked=False)
    profile: int = setting(0, "write a torch.profiler trace of N iterations to RUN_DIR/profile",
                           minimum=0, resumable=True, walked=False)
    # -- optimisation
    iterations: int | None = setting(None, "distillation iterations (default: 10000, the paper's; "
                                     "120 on the embedded default)", minimum=0, resumable=True,
                                     walked=False)
    lr_latent: float | None = setting(None, "SGD lr for the latents Z (default per algorithm: DM 1, DC 0.1, "
                                      "MTT 500, the released 1000 on its half-size image gradient (1000 "
                                      "with --released-compat); DM 0.1 on the embedded default prior)", above=0,
                                      resumable=True, walked=False)
    lr_class: float | None = setting(None, "SGD lr for the class embeddings c (default as --lr-latent)",
                                     above=0, resumable=True, walked=False)
    lr_student: float = setting(1e-6, "SGD lr for MTT's learnable student lr", minimum=0, walked=False)
    momentum: float = setting(0.5, "SGD momentum for Z, c and the student lr", minimum=0, below=1)
    seed: int = setting(0, "seed of every random stream of the run", minimum=0, maximum=SEED_MAXIMUM, walked=False)
    # -- the algorithms
    buffer: str | None = setting(None, "expert buffer folder (MTT)", walked=False)
    mtt_gradient: str = setting("truncated", "truncated (constant memory) | full (exact unroll)",
                                choices=MTT_GRADIENTS)
    syn_steps: int = setting(10, "MTT student steps per iteration", minimum=1)
    expert_epochs: int = setting(2, "MTT target epoch offset M", minimum=1)
    max_start_epoch: int = setting(2, "MTT start epoch s is drawn from [0, max_start_epoch)", minimum=1)
    student_lr: float = setting(0.01, "MTT initial student lr", above=0, walked=False)
    batch_real: int | None = setting(None, "real images per class per iteration (DM, DC; default 256, "
                                     "64 on the embedded default)", minimum=1)
    batch_syn: int | None = setting(None, "synthetic images per MTT student step (default: all)", minimum=1)
    micro_batch: int | None = setting(None, "student micro-batch for DM, DC and MTT (exact with "
                                      "per-sample norm; bounds memory)", minimum=1)
    dsa: str = setting("color_crop_cutout_flip_scale_rotate", "DSA strategy, or 'none'", parse=parse_dsa)
    width: int = setting(128, "ConvNet width", minimum=1)
    depth: int | None = setting(None, "ConvNet depth (default from --res)", minimum=1)
    norm: str = setting("instance", "ConvNet norm", choices=NORMS)
    # -- output
    out: str | None = setting(None, "run folder to create (default: runs/distill-<date>-<time>)", walked=False)
    save_every: int | None = setting(None, "also checkpoint every N iterations", minimum=1, resumable=True, walked=False)
    save_seconds: float = setting(60.0, "checkpoint when this many seconds passed since the last one",
                                  minimum=0, resumable=True, walked=False)
    image_every: int = setting(100, "image grid every N iterations", minimum=1, resumable=True, walked=False)
    eval_every: int = setting(0, "inline evaluation every N iterations (0 = off)", minimum=0, resumable=True, walked=False)
    eval_archs: str = setting("convnet", "comma-separated architectures for inline evaluation",
                              resumable=True, walked=False)
    eval_epochs: int = setting(300, "training epochs of inline evaluation", minimum=1, resumable=True, walked=False)
    eval_seeds: int = setting(1, "seeds of inline evaluation", minimum=1, resumable=True, walked=False)
    progress: bool = setting(True, "no progress bar", resumable=True, in_file=False, flag="--no-progress", walked=False)

    # -- derived views

    @classmethod
    def settings(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def types(cls) -> dict:
        return _type_hints()

    @classmethod
    def from_dict(cls, values: dict, *, where: str = "config") -> "DistillConfig":
        """A config from a mapping of field names; unknown keys and wrong types are LD3MErrors."""
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            raise LD3MError(f"unknown key {unknown[0]!r} in {where}; known keys: "
                            + ", ".join(cls.field_names()))
        config = cls(**values)
        config.check_types(where=where)
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check_types(self, *, where: str = "config") -> None:
        """Every value has its declared type (ints are not floats, booleans are not numbers)."""
        for name, hint in _type_hints().items():
            setattr(self, name, coerce(name, getattr(self, name), hint, where))

    def walked_settings(self) -> dict:
        """The settings that decide what one iteration computes and holds (`setting(walked=...)`):
        what the planner walks, and the key of its walks."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["walked"]}

    def check_values(self) -> None:
        """Every value has its type, is one of its choices and within its bounds (one line each)."""
        self.check_types()
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            flag = "--" + f.name.replace("_", "-")
            if meta["choices"] is not None and value not in meta["choices"]:
                raise LD3MError(f"unknown {flag} {value!r}; choose {', '.join(map(str, meta['choices']))}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                meta["bounds"].check(flag, value)
        if isinstance(self.chunk, str) and self.chunk != "auto" or isinstance(self.chunk, int) and self.chunk < 1:
            raise LD3MError(f"--chunk must be >= 1 or auto, got {self.chunk!r}")

    def check_method(self) -> None:
        """Settings that cannot go together in one iteration."""
        self.check_values()
        if self.released_compat and self.algorithm == "mtt" and self.mtt_gradient != "truncated":
            raise LD3MError("--released-compat reproduces the released truncated MTT gradient; "
                            f"--mtt-gradient {self.mtt_gradient} has no released counterpart")
        if self.grad_mode != "recompute" and (self.decoder_chunk is not None or self.store_steps):
            raise LD3MError(f"--decoder-chunk and --store-steps need --grad-mode recompute, not {self.grad_mode}")
        if self.store_steps is not None and self.store_steps > self.steps:
            raise LD3MError(f"--store-steps {self.store_steps} is more than the chain's {self.steps} steps")

    def validate(self) -> None:
        """Reject a run's impossible settings with one clear line each (after `resolve_defaults`)."""
        self.check_method()
        if self.prior is None or self.iterations is None or self.batch_real is None:
            raise ValueError("unresolved defaults: call resolve_defaults(config) first")
        if self.algorithm == "mtt" and not self.buffer:
            raise LD3MError("--algorithm mtt needs --buffer PATH (build one with `ld3m-fast buffer`)")
        if self.threads is not None:
            from .._threads import check_threads

            check_threads(self.threads)

    @property
    def attention_checkpointed(self) -> bool:
        """Whether the denoiser's transformer blocks are checkpointed inside (--checkpoint-attention)."""
        if self.checkpoint_attention == "auto":
            return self.released_compat and self.grad_mode == "released"
        return self.checkpoint_attention == "on"


RESUMABLE = tuple(f.name for f in dataclasses.fields(DistillConfig) if f.metadata["resumable"])
WALKED = tuple(f.name for f in dataclasses.fields(DistillConfig) if f.metadata["walked"])


def _type_hints() -> dict:
    return typing.get_type_hints(DistillConfig)


def _allowed(hint) -> tuple:
    """The plain types a hint admits: `int | None` -> (int, NoneType)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               type(None): "unset"}


def coerce(name: str, value, hint, where: str = "config"):
    """`value` checked against `hint`; an int where a float is declared becomes a float."""
    allowed = _allowed(hint)
    if value is None and type(None) in allowed:
        return None
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif isinstance(value, int) and int in allowed:
        return value
    elif isinstance(value, (int, float)) and float in allowed:
        if not math.isfinite(value):
            raise LD3MError(f"{name} in {where} must be a finite number, got {value}")
        return float(value)
    elif isinstance(value, str) and str in allowed:
        return value
    words = " or ".join(_TYPE_WORDS[t] for t in allowed if t is not type(None))
    raise LD3MError(f"{name} in {where} must be {words}, got {value!r}")


# --------------------------------------------------------------------------- profiles

# Defaults that depend on the prior. The embedded default (a 32² Fashion-MNIST prior)
# runs end to end in a few minutes on a laptop CPU; a user's prior gets the paper's.
# (At --res 256 the 28-px data are upsampled once and cached: 500 per class keep that ~1 GB.)
# A dict value is per algorithm. DM's released lr 1 is tuned to cin256's 3x64x64 latents: on the
# embedded prior's 4x8x8 ones (DM gradient norm ~90 at the start) it decodes to images 2.6x the
# data's spread after 120 iterations; 0.1 keeps them in range, ends at a lower loss and tests
# as well (docs/default_prior.md).
EMBEDDED_PROFILE = {"iterations": 120, "batch_real": 64, "max_per_class": 500,
                    "lr_latent": {"dm": 0.1}, "lr_class": {"dm": 0.1}}
PAPER_PROFILE = {"iterations": 10000, "batch_real": 256, "max_per_class": None}


def resolve_method_defaults(config: DistillConfig) -> DistillConfig:
    """The config with the prior-dependent defaults filled: the prior (the embedded default when
    unset), iterations, batch_real, max_per_class and the embedded prior's DM learning rates.
    What a run and a plan of it share; writes nothing."""
    config.check_types()
    values = config.to_dict()
    profile = PAPER_PROFILE
    if values["prior"] is None:
        from ..priors.default import default_prior_path

        values["prior"] = str(default_prior_path())
        profile = EMBEDDED_PROFILE
        logger.info("using the embedded default prior (Fashion-MNIST 32², see docs/default_prior.md)")
    for key, value in profile.items():
        if isinstance(value, dict):
            value = value.get(values["algorithm"])
        if values[key] is None:
            values[key] = value
    return DistillConfig(**values)


def resolve_defaults(config: DistillConfig) -> DistillConfig:
    """`resolve_method_defaults`, then the run folder and the thread count: unset, it records
    torch's current count, at most the cores the process may use (the CLI sets its automatic
    choice before; Python callers keep theirs)."""
    values = resolve_method_defaults(config).to_dict()
    if not values["out"]:
        values["out"] = str(Path("runs") / time.strftime("distill-%Y%m%d-%H%M%S"))
    if values["threads"] is None:
        import torch

        from .._threads import usable_cores

        values["threads"] = min(torch.get_num_threads(), usable_cores())
    return DistillConfig(**values)


def load_config(run_dir) -> DistillConfig:
    """The resolved config of an existing run folder."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise LD3MError(f"{run_dir} is not an ld3m-fast run folder (no config.json)")
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise LD3MError(f"cannot read {path}: {error}") from None
    if not isinstance(values, dict):
        raise LD3MError(f"{path} is not an ld3m-fast run config")
    return DistillConfig.from_dict(values, where=str(path))


__all__ = ["ATTENTION_CHECKPOINTING", "DistillConfig", "EMBEDDED_PROFILE", "PAPER_PROFILE", "RESUMABLE", "WALKED",
           "coerce", "load_config", "resolve_defaults", "resolve_method_defaults", "setting"]
