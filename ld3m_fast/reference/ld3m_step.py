"""Reference for one reverse step of the LD3M chain (after the denoiser call)."""
from __future__ import annotations

import math

import torch

SKIP_MODES = ("x0", "mean", None)


def check_skip(skip):
    """Return `skip` if it names a known mode, else raise ValueError."""
    if skip not in SKIP_MODES:
        raise ValueError(f"skip must be one of 'x0', 'mean' or None, got {skip!r}")
    return skip


def ld3m_step_ref(
    z_t: torch.Tensor,
    eps_cond: torch.Tensor,
    anchor: torch.Tensor | None,
    *,
    a_t: float,
    a_prev: float,
    skip_weight: float,
    skip: str | None = "x0",
    eps_uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
    sigma: float = 0.0,
    noise: torch.Tensor | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """One LD3M/DDIM reverse step, written as plainly as possible.

    Shapes: every tensor is (B, C, H, W) (any layout); `anchor` may be None when
    `skip` is None, `noise` may be None when `sigma` is 0.

        eps    = eps_uncond + guidance * (eps_cond - eps_uncond)   (eps_cond if no eps_uncond)
        x0     = (z_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
        dir    = sqrt(1 - a_prev - sigma^2) * eps
        skip="x0":   x0 <- (1 - w) * x0 + w * anchor;  z_prev = sqrt(a_prev) * x0 + dir
        skip="mean": z_prev = (1 - w) * (sqrt(a_prev) * x0 + dir) + w * anchor
        skip=None:   z_prev = sqrt(a_prev) * x0 + dir
        z_prev += sigma * noise

    `upcast=True` computes in float32 (or float64 if given) and casts back: the
    high-precision oracle that low-precision kernels are compared against.
    """
    check_skip(skip)
    out_dtype = z_t.dtype
    if upcast:
        work = torch.float64 if out_dtype == torch.float64 else torch.float32
        z_t, eps_cond = z_t.to(work), eps_cond.to(work)
        anchor = None if anchor is None else anchor.to(work)
        eps_uncond = None if eps_uncond is None else eps_uncond.to(work)
        noise = None if noise is None else noise.to(work)
    eps = eps_cond if eps_uncond is None else eps_uncond + guidance * (eps_cond - eps_uncond)
    x0 = (z_t - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    direction = math.sqrt(max(1.0 - a_prev - sigma**2, 0.0)) * eps
    w = skip_weight
    if skip == "x0":
        x0 = (1.0 - w) * x0 + w * anchor
        z_prev = math.sqrt(a_prev) * x0 + direction
    elif skip == "mean":
        z_prev = (1.0 - w) * (math.sqrt(a_prev) * x0 + direction) + w * anchor
    else:
        z_prev = math.sqrt(a_prev) * x0 + direction
    if sigma != 0.0:
        if noise is None:
            raise ValueError("sigma > 0 needs explicit noise")
        z_prev = z_prev + sigma * noise
    return z_prev.to(out_dtype)
