"""Plain-PyTorch definitions of every fused op: the oracles for tests and benchmarks."""
from .ld3m_step import ld3m_step_ref

__all__ = ["ld3m_step_ref"]
