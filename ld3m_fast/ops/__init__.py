"""Fused ops, registered as `torch.library` ops in the `ld3m_fast` namespace."""
from .ld3m_step import ld3m_step

__all__ = ["ld3m_step"]
