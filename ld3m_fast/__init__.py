"""ld3m-fast: fast, memory-lean LD3M dataset distillation through frozen latent diffusion models.

Public API (importable from other distillation codebases):
    LD3MGenerator, ChainNoise, ChainSchedule   the differentiable LD3M chain
    Prior, load_prior, save_prior, build_tiny_prior
    SyntheticSet                                learnable latents Z, class embeddings c, labels
    ops.ld3m_step, ops.trajectory_matching_distance   fused ops (torch.library)
"""
from ._version import __version__
from .errors import LD3MError, PriorError
from .generator import ChainNoise, ChainSchedule, LD3MGenerator
from .priors import Prior, build_tiny_prior, load_prior, save_prior
from .synthetic import SyntheticSet

__all__ = [
    "ChainNoise", "ChainSchedule", "LD3MError", "LD3MGenerator", "Prior", "PriorError",
    "SyntheticSet", "__version__", "build_tiny_prior", "load_prior", "save_prior",
]
