"""Fused ops, registered as `torch.library` ops in the `ld3m_fast` namespace.

Backends: C++ on CPU (ahead-of-time `ld3m_fast._C` or a just-in-time build), Triton on
CUDA, the PyTorch reference otherwise; `LD3M_FAST_BACKEND=reference|cpp|triton` forces one.
"""
from __future__ import annotations

from . import _backend, _native
from .ld3m_step import ld3m_step
from .tm_distance import mtt_truncated_terms, trajectory_matching_distance

OP_NAMES = ("ld3m_step", "trajectory_matching_distance", "mtt_truncated_terms")


def backend_report() -> dict[str, str]:
    """What each op would run on CPU and on CUDA, and the C++ extension's state. Builds nothing.

    Keys: one per op ("cpu=cpp, cuda=triton"-style values), "cpp_extension",
    "triton" and "forced" (the LD3M_FAST_BACKEND value or "auto").
    """
    line = f"cpu={_backend.describe('cpu')}, cuda={_backend.describe('cuda')}"
    report = {name: line for name in OP_NAMES}
    report["cpp_extension"] = _native.status()
    if _backend.triton_installed():
        mode = "interpreter on CPU (TRITON_INTERPRET=1)" if _backend.triton_interpreter_on() else "CUDA"
        report["triton"] = f"installed ({mode})"
    else:
        report["triton"] = "not installed"
    try:
        report["forced"] = _backend.forced_backend() or "auto"
    except Exception as error:  # an invalid LD3M_FAST_BACKEND is reported, not raised, here
        report["forced"] = f"invalid: {error}"
    return report


__all__ = ["ld3m_step", "trajectory_matching_distance", "mtt_truncated_terms", "backend_report"]
