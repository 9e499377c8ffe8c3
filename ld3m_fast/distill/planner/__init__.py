"""Memory and FLOP planning: measure real code paths under fake tensors."""
from .measure import LiveStorageTracker, Measurement, measure

__all__ = ["LiveStorageTracker", "Measurement", "measure"]
