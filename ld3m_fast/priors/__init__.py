"""Frozen class-conditional latent diffusion models behind one `Prior` interface."""
from .adapters import (AdaLNDenoiser, AutoencoderAdapter, ClassEmbeddingDenoiser,
                       CrossAttentionDenoiser, DenoiserAdapter, KLAutoencoder, VQAutoencoder)
from .default import default_prior_path
from .io import load_prior, read_manifest, save_prior, save_prior_parts, wrap_autoencoder, wrap_denoiser
from .pipeline import import_prior
from .prior import Prior, alphas_cumprod_from_config
from .tiny import build_tiny_prior

__all__ = [
    "AdaLNDenoiser", "AutoencoderAdapter", "ClassEmbeddingDenoiser", "CrossAttentionDenoiser",
    "DenoiserAdapter", "KLAutoencoder", "Prior", "VQAutoencoder", "alphas_cumprod_from_config",
    "build_tiny_prior", "default_prior_path", "import_prior", "load_prior", "read_manifest", "save_prior", "save_prior_parts",
    "wrap_autoencoder", "wrap_denoiser",
]
