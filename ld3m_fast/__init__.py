"""ld3m-fast: fast, memory-lean LD3M dataset distillation through frozen latent diffusion models.

Public API (importable from other distillation codebases):
    LD3MGenerator, ChainNoise, ChainSchedule   the differentiable LD3M chain
    Prior, load_prior, save_prior, build_tiny_prior, default_prior_path (the shipped prior)
    SyntheticSet                                learnable latents Z, class embeddings c, labels
    dm_loss, dc_loss, mtt_loss                  the distillation losses as functions of tensors
    load_dataset, from_uint8, build_network     real images (uint8), their normalisation, students
    ops.ld3m_step, ops.trajectory_matching_distance   fused ops (torch.library)

The names load on first use (PEP 562), so `import ld3m_fast` and the CLI's start-up
do not import torch before the command line has set up its environment.

Messages go through `logging`, to the `ld3m_fast` logger and its children (one per module).
The library installs no handler of its own (only a `NullHandler`): configure `logging` to
see them, silence them or send them elsewhere. The `ld3m-fast` command installs one for the
duration of a command (`ld3m_fast.cli.main`).
"""
from __future__ import annotations

import importlib
import logging

from ._version import __version__
from .errors import LD3MError, PriorError

# A library adds no output of its own: without a configured handler its messages go nowhere
# (not to logging's last-resort stderr handler either).
logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {
    "ChainNoise": "generator", "ChainSchedule": "generator", "LD3MGenerator": "generator",
    "Prior": "priors", "build_tiny_prior": "priors", "default_prior_path": "priors", "load_prior": "priors",
    "save_prior": "priors",
    "SyntheticSet": "synthetic",
    "dm_loss": "losses", "dc_loss": "losses", "mtt_loss": "losses",
    "load_dataset": "data", "from_uint8": "normalization", "build_network": "networks",
}

__all__ = ["LD3MError", "PriorError", "__version__", *sorted(_LAZY)]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ld3m_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
