"""Full-size priors without weights, for planning under `FakeTensorMode`.

Built from the published configs in `ld3m_fast.priors.configs`; call these
inside an active `FakeTensorMode` so no memory is allocated and nothing is
initialised for real (a 400 M-parameter UNet builds in about a second).
"""
from __future__ import annotations

import torch

from ...errors import LD3MError
from ...priors import configs
from ...priors.io import wrap_autoencoder, wrap_denoiser
from ...priors.prior import Prior

DIT_SCHEDULER_CONFIG = {  # DiT trains on the linear 1e-4 -> 2e-2 schedule
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "clip_sample": False, "set_alpha_to_one": False,
}


def cin256_v2() -> Prior:
    """CompVis cin256-v2: UNet 400.9 M (cross-attention class token) + VQ-f4 55.3 M."""
    unet = configs.instantiate("UNet2DConditionModel", configs.CIN256_V2_UNET_CONFIG, device="cpu")
    vq = configs.instantiate("VQModel", configs.CIN256_V2_VQ_CONFIG, device="cpu")
    table = torch.zeros(configs.CIN256_V2_NUM_CLASSES + 1,
                        configs.CIN256_V2_UNET_CONFIG["cross_attention_dim"])
    return Prior(wrap_denoiser(unet, table), wrap_autoencoder(vq, configs.CIN256_V2_SCALING_FACTOR),
                 configs.CIN256_V2_SCHEDULER_CONFIG, num_classes=configs.CIN256_V2_NUM_CLASSES,
                 image_size=configs.CIN256_V2_IMAGE_SIZE)


def dit_xl_2_256() -> Prior:
    """DiT-XL/2 at 256² with the SD KL-f8 autoencoder (4-channel 32×32 latent)."""
    dit = configs.instantiate("DiTTransformer2DModel", configs.DIT_XL_2_256_CONFIG, device="cpu")
    first = dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    for block in dit.transformer_blocks[1:]:  # one shared table, as converted checkpoints have
        block.norm1.emb.class_embedder.embedding_table.weight = first
    vae = configs.instantiate("AutoencoderKL", configs.SD_KL_F8_VAE_CONFIG, device="cpu")
    return Prior(wrap_denoiser(dit), wrap_autoencoder(vae), DIT_SCHEDULER_CONFIG,
                 num_classes=1000, image_size=256)


def tiny() -> Prior:
    """The test-size prior (`build_tiny_prior`), for checking the planner against real runs."""
    from ...priors.tiny import build_tiny_prior

    return build_tiny_prior()


FULL_SIZE_PRIORS = {"cin256-v2": cin256_v2, "dit-xl-2-256": dit_xl_2_256, "tiny": tiny}


def prior_architecture(path) -> Prior:
    """A prior folder's models built from their configs only (weights are not read).

    The same checks as `load_prior` (`ld3m_fast.priors.io.build_prior`): a folder
    that would not load does not plan either.
    """
    from ...priors.io import build_prior

    return build_prior(path, weights=False)


def build_planning_prior(name_or_path: str) -> Prior:
    """A named prior (cin256-v2, dit-xl-2-256, tiny) or a prior folder's architecture.

    Call inside `FakeTensorMode` for full-size models.
    """
    if name_or_path in FULL_SIZE_PRIORS:
        return FULL_SIZE_PRIORS[name_or_path]()
    try:
        return prior_architecture(name_or_path)
    except LD3MError as error:
        raise LD3MError(f"--prior must be one of {', '.join(FULL_SIZE_PRIORS)} or a prior "
                        f"folder ({error})") from None
