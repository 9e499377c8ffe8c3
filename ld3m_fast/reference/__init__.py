"""Plain-PyTorch definitions of every fused op: the oracles for tests and benchmarks."""
from .ld3m_step import ld3m_step_ref
from .tm_distance import mtt_truncated_terms_ref, trajectory_matching_distance_ref

__all__ = ["ld3m_step_ref", "trajectory_matching_distance_ref", "mtt_truncated_terms_ref"]
