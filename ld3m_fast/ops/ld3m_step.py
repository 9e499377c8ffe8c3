"""ld3m_step: one reverse step of the LD3M chain.

Placeholder until the fused kernels land: calls the PyTorch reference so the
chain already goes through this one entry point.
"""
from __future__ import annotations

from ..reference.ld3m_step import ld3m_step_ref


def ld3m_step(z_t, eps_cond, anchor, *, a_t, a_prev, skip_weight, skip="x0",
              eps_uncond=None, guidance=1.0, sigma=0.0, noise=None):
    """See `ld3m_fast.reference.ld3m_step_ref` for the math and shapes."""
    return ld3m_step_ref(z_t, eps_cond, anchor, a_t=a_t, a_prev=a_prev, skip_weight=skip_weight,
                         skip=skip, eps_uncond=eps_uncond, guidance=guidance, sigma=sigma, noise=noise)
