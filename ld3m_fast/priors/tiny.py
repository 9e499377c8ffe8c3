"""Tiny random priors, built in code, for tests and examples.

Real shapes in miniature: the same diffusers classes as the full-size priors,
a handful of channels, an 8x8 latent at 32x32 images (latent factor 4).
"""
from __future__ import annotations

import torch

from .io import wrap_autoencoder, wrap_denoiser
from .prior import Prior

TINY_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0015,
    "beta_end": 0.0195,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
}


def _tiny_autoencoder(kind: str, latent_channels: int):
    from diffusers import AutoencoderKL, VQModel

    common = dict(in_channels=3, out_channels=3, block_out_channels=(16, 32, 32),
                  down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1,
                  latent_channels=latent_channels, norm_num_groups=8)
    if kind == "vq":
        return VQModel(**common, num_vq_embeddings=64, scaling_factor=1.0)
    if kind == "kl":
        return AutoencoderKL(**common, scaling_factor=0.5)
    raise ValueError(f"autoencoder must be 'vq' or 'kl', got {kind!r}")


def _tiny_denoiser(kind: str, latent_channels: int, latent_size: int, num_classes: int,
                   embed_dim: int):
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel

    if kind == "unet-cond":
        return UNet2DConditionModel(
            sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
            block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=embed_dim, attention_head_dim=8, norm_num_groups=8)
    if kind == "unet":
        return UNet2DModel(
            sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
            block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
            norm_num_groups=8, num_class_embeds=num_classes + 1)
    if kind == "dit":
        model = DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=latent_channels,
            out_channels=2 * latent_channels, num_layers=2, sample_size=latent_size,
            patch_size=2, num_embeds_ada_norm=num_classes)
        # One shared label table, as in converted DiT checkpoints.
        first = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.class_embedder.embedding_table.weight.data.copy_(first.data)
        return model
    raise ValueError(f"denoiser must be 'unet-cond', 'unet' or 'dit', got {kind!r}")


def build_tiny_prior(denoiser: str = "unet-cond", autoencoder: str = "vq", *,
                     num_classes: int = 10, image_size: int = 32, latent_channels: int = 3,
                     embed_dim: int = 32, seed: int = 0) -> Prior:
    """A randomly initialised `Prior` (fixed by `seed`) with the real model classes.

    denoiser: "unet-cond" (UNet2DConditionModel, cross-attention, CompVis style),
    "unet" (UNet2DModel with class embeddings) or "dit" (DiTTransformer2DModel);
    autoencoder: "vq" (VQModel) or "kl" (AutoencoderKL). Latent factor 4.
    """
    if image_size % 4:
        raise ValueError("tiny priors have latent factor 4: image_size must be a multiple of 4")
    global_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # diffusers initialises through the global RNG
    try:
        ae = _tiny_autoencoder(autoencoder, latent_channels)
        model = _tiny_denoiser(denoiser, latent_channels, image_size // 4, num_classes, embed_dim)
        class_table = torch.randn(num_classes + 1, embed_dim) if denoiser == "unet-cond" else None
    finally:
        torch.random.set_rng_state(global_state)
    return Prior(wrap_denoiser(model, class_table), wrap_autoencoder(ae), TINY_SCHEDULER_CONFIG,
                 num_classes=num_classes, image_size=image_size)
