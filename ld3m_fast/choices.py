"""The closed sets of values a setting may take, each declared once (no torch import here).

`ld3m_fast.distill.config` validates the run's settings against them, and the modules that
implement each choice (the generator, the losses, the algorithms, the planner) import them
from here, so a new value is added in one place.
"""
from __future__ import annotations

ALGORITHMS = ("dm", "dc", "mtt")
MTT_GRADIENTS = ("truncated", "full")
GRAD_MODES = ("autograd", "released", "recompute")
SKIPS = ("x0", "mean", "none")          # "none" on the command line is skip=None in the generator
SPACINGS = ("exact", "released")
PRUNE_ORDERS = ("asc", "desc", "random")  # ld3m_fast.prune
NORMS = ("instance", "batch", "layer", "none")  # the networks' normalisation (ld3m_fast.networks)
# Autocast dtypes by name (Z, c and the latent chain stay fp32 under every one of them); fp16 runs
# with a gradient scaler (for cards without bf16: V100, RTX 20xx).
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str):
    """The torch dtype of a `DTYPES` name."""
    import torch

    return getattr(torch, DTYPES[name])


__all__ = ["ALGORITHMS", "DTYPES", "GRAD_MODES", "MTT_GRADIENTS", "NORMS", "SKIPS", "SPACINGS", "torch_dtype"]
