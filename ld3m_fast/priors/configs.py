"""Full-size prior configurations as plain data, and parameter counts without weights.

Two kinds of data live here:

- the *published CompVis* parameters of `cin256-v2` (`CIN256_V2_COMPVIS_UNET_PARAMS`,
  `CIN256_V2_COMPVIS_VQ_PARAMS`), exactly the `unet_config.params` and
  `first_stage_config.params` of the released YAML, which describe the original
  checkpoint's key names and shapes (see `compvis_keys.py`);
- the equivalent *diffusers* constructor kwargs (`CIN256_V2_UNET_CONFIG`,
  `CIN256_V2_VQ_CONFIG`, `CIN256_V2_SCHEDULER_CONFIG`), plus DiT-XL/2-256 and the
  SD KL-f8 autoencoder for the memory planner.

`unet_config_from_compvis` / `vq_config_from_compvis` derive the diffusers kwargs
from CompVis parameters, so scaled-down test configs follow the same rules as the
full-size one. The dicts are module-level constants: copy them (`copy.deepcopy`)
before changing anything.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

# --- CompVis cin256-v2, as published (configs/latent-diffusion/cin256-v2.yaml) ---------

CIN256_V2_COMPVIS_UNET_PARAMS = {
    "image_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "model_channels": 192,
    "attention_resolutions": (8, 4, 2),
    "num_res_blocks": 2,
    "channel_mult": (1, 2, 3, 5),
    "num_heads": 1,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 512,
}

CIN256_V2_COMPVIS_VQ_PARAMS = {
    "embed_dim": 3,
    "n_embed": 8192,
    "ddconfig": {
        "double_z": False,
        "z_channels": 3,
        "resolution": 256,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 128,
        "ch_mult": (1, 2, 4),
        "num_res_blocks": 2,
        "attn_resolutions": (),
        "dropout": 0.0,
    },
}

CIN256_V2_NUM_CLASSES = 1000          # ImageNet; the class table has one more (null) row
CIN256_V2_IMAGE_SIZE = 256
CIN256_V2_SCALING_FACTOR = 1.0        # LatentDiffusion scale_factor for the VQ-f4 latent

# --- diffusers equivalents ---------------------------------------------------------------

CIN256_V2_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    # attention_resolutions (8, 4, 2) are downsample factors: levels 1, 2, 3 carry a
    # SpatialTransformer, level 0 (factor 1) does not.
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "UpBlock2D"),
    "block_out_channels": (192, 384, 576, 960),
    "layers_per_block": 2,
    "transformer_layers_per_block": 1,
    "cross_attention_dim": 512,
    # Legacy diffusers naming: `attention_head_dim` is the number of heads (CompVis
    # num_heads = 1 with num_head_channels = -1: one head spanning all channels).
    "attention_head_dim": 1,
    # SpatialTransformer proj_in / proj_out are 1x1 convolutions in cin256-v2.
    "use_linear_projection": False,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    # CompVis timestep_embedding puts cos before sin and uses no frequency shift.
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
}

CIN256_V2_VQ_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (128, 256, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 3,
    "sample_size": 256,
    "num_vq_embeddings": 8192,
    "vq_embed_dim": 3,
    "norm_num_groups": 32,
    "norm_type": "group",
    "mid_block_add_attention": True,
    "scaling_factor": 1.0,
}

# CompVis "linear" schedule = sqrt-linear: betas = linspace(sqrt(b0), sqrt(b1), 1000) ** 2,
# which diffusers calls "scaled_linear". DDIM timesteps {1, 1 + c, ...}: "leading" spacing
# with steps_offset 1; the last step uses abar_0 (set_alpha_to_one False), as CompVis DDIM.
CIN256_V2_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0015,
    "beta_end": 0.0195,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

# DiT-XL/2 at 256x256 (learned sigma: 8 output channels = eps and variance).
DIT_XL_2_256_CONFIG = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "attention_bias": True,
    "sample_size": 32,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "upcast_attention": False,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-5,
}

# The Stable Diffusion KL-f8 autoencoder (sd-vae-ft-*) that DiT decodes with.
SD_KL_F8_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}

# name -> (diffusers class name, constructor kwargs)
MODEL_CONFIGS: dict[str, tuple[str, dict]] = {
    "cin256-v2-unet": ("UNet2DConditionModel", CIN256_V2_UNET_CONFIG),
    "cin256-v2-vq": ("VQModel", CIN256_V2_VQ_CONFIG),
    "dit-xl-2-256": ("DiTTransformer2DModel", DIT_XL_2_256_CONFIG),
    "sd-kl-f8": ("AutoencoderKL", SD_KL_F8_VAE_CONFIG),
}


def unet_config_from_compvis(params: dict) -> dict:
    """diffusers `UNet2DConditionModel` kwargs equivalent to a CompVis openaimodel UNetModel.

    `params` is a CompVis `unet_config.params` dict with a SpatialTransformer
    (`use_spatial_transformer`, `context_dim`), one head per attention
    (`num_heads`, no `num_head_channels`), plain (not scale-shift) ResBlocks.
    """
    if not params.get("use_spatial_transformer", False) or params.get("context_dim") is None:
        raise ValueError("only CompVis UNets with a SpatialTransformer and context_dim convert "
                         "to UNet2DConditionModel")
    if params.get("num_head_channels", -1) != -1 or params.get("use_linear_in_transformer", False):
        raise ValueError("num_head_channels and use_linear_in_transformer are not supported")
    if params.get("use_scale_shift_norm", False) or params.get("resblock_updown", False):
        raise ValueError("use_scale_shift_norm and resblock_updown are not supported")
    block_out_channels = tuple(params["model_channels"] * m for m in params["channel_mult"])
    with_attention = [2 ** level in params["attention_resolutions"]
                      for level in range(len(block_out_channels))]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in with_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(with_attention))
    config = copy.deepcopy(CIN256_V2_UNET_CONFIG)
    config.update(
        sample_size=params["image_size"], in_channels=params["in_channels"],
        out_channels=params["out_channels"], down_block_types=down, up_block_types=up,
        block_out_channels=block_out_channels, layers_per_block=params["num_res_blocks"],
        transformer_layers_per_block=params.get("transformer_depth", 1),
        cross_attention_dim=params["context_dim"], attention_head_dim=params["num_heads"])
    return config


def vq_config_from_compvis(params: dict, scaling_factor: float = 1.0) -> dict:
    """diffusers `VQModel` kwargs equivalent to a CompVis (ldm) VQModel's `params`.

    Attention inside the resolution levels (`attn_resolutions`) has no counterpart
    in diffusers' plain encoder blocks and is rejected; the mid-block attention is kept.
    """
    dd = params["ddconfig"]
    if dd.get("attn_resolutions"):
        raise ValueError("VQ autoencoders with attention at resolution levels are not supported")
    if dd.get("double_z", False):
        raise ValueError("a VQ autoencoder has double_z = False")
    levels = len(dd["ch_mult"])
    config = copy.deepcopy(CIN256_V2_VQ_CONFIG)
    config.update(
        in_channels=dd["in_channels"], out_channels=dd["out_ch"],
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(dd["ch"] * m for m in dd["ch_mult"]),
        layers_per_block=dd["num_res_blocks"], latent_channels=dd["z_channels"],
        sample_size=dd["resolution"], num_vq_embeddings=params["n_embed"],
        vq_embed_dim=params["embed_dim"], scaling_factor=float(scaling_factor))
    return config


def instantiate(class_name: str, config: dict, device: str | torch.device = "meta") -> nn.Module:
    """A diffusers model built from `config`; on the meta device by default (no memory, no init)."""
    import diffusers

    cls = getattr(diffusers, class_name)
    with torch.device(device):
        return cls(**copy.deepcopy(config))


def count_parameters(config_name: str) -> int:
    """Parameter count of a named full-size config (`MODEL_CONFIGS`), built on the meta device.

    Note: diffusers' DiT stores a copy of the shared timestep and class embedders in each
    of its 28 blocks, so "dit-xl-2-256" counts 749.8 M parameter entries for the 675 M
    distinct values of the original DiT-XL/2.
    """
    if config_name not in MODEL_CONFIGS:
        raise KeyError(f"unknown config {config_name!r}; known: {', '.join(MODEL_CONFIGS)}")
    class_name, config = MODEL_CONFIGS[config_name]
    return sum(p.numel() for p in instantiate(class_name, config).parameters())
