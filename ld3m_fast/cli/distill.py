"""`ld3m-fast distill`: distil a data set through a frozen LDM prior into a run folder.

Settings come from, in increasing priority: the defaults of `DistillConfig`,
`--config run.toml` (keys = flag names, with '-' or '_'), and flags given on the
command line. `--resume RUN_DIR` continues a run from its checkpoint; only
iterations, save/image/eval cadence and the device may change on resume.

Example run.toml:

    data = "fashion-mnist"
    prior = "priors/tiny"
    algorithm = "mtt"
    buffer = "buffers/fmnist32"
    ipc = 10
    mtt-gradient = "truncated"
    iterations = 5000

An unknown key is an error that names it (exit code 2).
"""
from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from ..errors import LD3MError

# (flag, type, help); the default shown is DistillConfig's.
_FLAGS = [
    ("--data", str, "data folder (ImageNet tree, ImageFolder, CIFAR-10, Fashion-MNIST IDX) or 'fashion-mnist'"),
    ("--subset", str, "ImageNet subset name or alias (imagenette, woof, fruits, ...)"),
    ("--prior", str, "prior folder (written by save_prior / `ld3m-fast convert`)"),
    ("--algorithm", str, "dm | dc | mtt"),
    ("--res", int, "image side, a multiple of the prior's latent factor (default: the prior's native "
                   "size; any other side is rendered natively and resized with an antialiased, "
                   "differentiable bilinear interpolation)"),
    ("--ipc", int, "synthetic images per class"),
    ("--steps", int, "DDIM steps T of the LD3M chain"),
    ("--guidance", float, "classifier-free guidance scale"),
    ("--skip", str, "LD3M skip: x0 (released code) | mean (paper Eq. 7) | none"),
    ("--eta", float, "DDIM eta (0 = deterministic chain)"),
    ("--grad-mode", str, "autograd | released | recompute"),
    ("--chunk", "chunk", "images per generator chunk in released/recompute modes, or 'auto' "
                         "(the planner's cheapest that fits --memory-budget)"),
    ("--memory-budget", str, "memory budget for --chunk auto, e.g. 24GiB (default: the device's)"),
    ("--dtype", str, "fp32 | bf16 (autocast; Z, c and the latent chain stay fp32)"),
    ("--compile-backend", str, "torch.compile backend for --compile (inductor; aot_eager to check tracing)"),
    ("--profile", int, "write a torch.profiler trace of N iterations to RUN_DIR/profile"),
    ("--iterations", int, "distillation iterations"),
    ("--lr-latent", float, "SGD lr for the latents Z (default per algorithm: DM 1, DC 0.1, MTT 1000; "
                           "DM 0.1 on the embedded default prior)"),
    ("--lr-class", float, "SGD lr for the class embeddings c (default as --lr-latent)"),
    ("--lr-student", float, "SGD lr for MTT's learnable student lr"),
    ("--momentum", float, "SGD momentum for Z, c and the student lr"),
    ("--seed", int, "seed of every random stream of the run"),
    ("--out", str, "run folder to create"),
    ("--buffer", str, "expert buffer folder (MTT)"),
    ("--mtt-gradient", str, "truncated (constant memory, default) | full (exact unroll)"),
    ("--syn-steps", int, "MTT student steps per iteration"),
    ("--expert-epochs", int, "MTT target epoch offset M"),
    ("--max-start-epoch", int, "MTT start epoch s is drawn from [0, max_start_epoch)"),
    ("--student-lr", float, "MTT initial student lr"),
    ("--batch-real", int, "real images per class per iteration (DM, DC)"),
    ("--batch-syn", int, "synthetic images per MTT student step (default: all)"),
    ("--micro-batch", int, "student micro-batch for DM, DC and MTT (exact with per-sample norm; bounds memory)"),
    ("--dsa", str, "DSA strategy, e.g. color_crop_cutout_flip_scale_rotate, or 'none'"),
    ("--width", int, "ConvNet width"),
    ("--depth", int, "ConvNet depth (default from --res)"),
    ("--norm", str, "ConvNet norm: instance | batch | layer | none"),
    ("--eval-every", int, "inline evaluation every N iterations (0 = off)"),
    ("--eval-archs", str, "comma-separated architectures for inline evaluation"),
    ("--eval-epochs", int, "training epochs of inline evaluation"),
    ("--eval-seeds", int, "seeds of inline evaluation"),
    ("--save-every", int, "checkpoint every N iterations"),
    ("--image-every", int, "image grid every N iterations"),
    ("--device", str, "cpu | cuda | cuda:N"),
    ("--cache-dir", str, "decoded-data cache folder"),
    ("--max-per-class", int, "use at most N real images per class"),
]


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _chunk(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of images or 'auto', got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..distill.loop import DistillConfig

    defaults = DistillConfig()
    # Every default is None here so that "given on the command line" can be told
    # apart from "left at its default" (flags win over the config file).
    for flag, kind, text in _FLAGS:
        default = getattr(defaults, _dest(flag))
        parser.add_argument(flag, type=_chunk if kind == "chunk" else kind, default=None,
                            help=f"{text} (default: {default})" if default is not None else text)
    parser.add_argument("--compile", action="store_true", default=None,
                        help="torch.compile the denoiser, decoder and distillation network")
    parser.add_argument("--config", type=str, default=None, help="TOML file of settings (flags win)")
    parser.add_argument("--resume", type=str, default=None, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_argument(parser)


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is much faster on "
                             "small busy machines)")


def apply_threads(args) -> None:
    """Set torch's CPU thread count from --threads (a runtime choice, not part of the run config)."""
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise LD3MError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


def read_config_file(path) -> dict:
    """Settings from a TOML file, keys normalised to field names; unknown keys are errors."""
    from ..distill.loop import DistillConfig

    path = Path(path)
    if not path.is_file():
        raise LD3MError(f"config file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise LD3MError(f"cannot parse config file {path}: {error}") from None
    known = set(DistillConfig.field_names())
    values = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in known or name == "progress":
            raise LD3MError(f"unknown key {key!r} in config file {path}")
        values[name] = value
    return values


def explicit_settings(args) -> dict:
    """The settings given as flags on the command line."""
    values = {_dest(flag): getattr(args, _dest(flag)) for flag, _, _ in _FLAGS
              if getattr(args, _dest(flag), None) is not None}
    if getattr(args, "compile", None):
        values["compile"] = True
    if getattr(args, "no_progress", False):
        values["progress"] = False
    return values


def run(args) -> int:
    from ..distill.loop import DistillConfig, resume_run, start_run

    apply_threads(args)
    settings = read_config_file(args.config) if args.config else {}
    settings.update(explicit_settings(args))
    if args.resume:
        resume_run(args.resume, settings)
        return 0
    config = DistillConfig.from_dict({**DistillConfig().to_dict(), **settings})
    start_run(config)
    return 0
