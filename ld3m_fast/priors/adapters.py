"""Adapters that give every diffusers model the same small interface.

A denoiser adapter maps `(z_t, t, cond) -> eps` where `cond` is a *vector* per
sample (the learnable class embedding `c_i`), not a label: LD3M optimises `c`
freely, so the model's label lookup is bypassed and its table is exposed as
`class_table` (last row = the null class used for classifier-free guidance).

An autoencoder adapter maps images in [-1, 1] to diffusion latents and back,
applying the latent scaling factor, and gives the LD3M anchor (straight-through
quantised latents for VQ, the latents themselves for KL).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from ..errors import PriorError
from .lean_unet import global_hooks as lean_global_hooks
from .lean_unet import lean_unet2d_forward, why_not_lean


class _PassThroughLabels(nn.Module):
    """Stands in for a label-embedding lookup: the caller passes the embedding itself."""

    def forward(self, embeddings, force_drop_ids=None):
        return embeddings


class DenoiserAdapter(nn.Module):
    """Base: `eps(z_t, t, cond)` and a frozen `class_table` (num_classes + 1, D)."""

    conditioning: str = ""
    subfolder: str = ""

    def __init__(self, model: nn.Module, class_table: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("class_table", class_table.detach().clone(), persistent=False)

    @property
    def in_channels(self) -> int:
        return self.model.config.in_channels

    @property
    def out_channels(self) -> int:
        return self.model.config.out_channels or self.in_channels

    def eps(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, z_t, t, cond):
        return self.eps(z_t, t, cond)


class CrossAttentionDenoiser(DenoiserAdapter):
    """CompVis-style `UNet2DConditionModel`: the class token enters through cross-attention.

    `cond` (B, D) becomes the one-token context (B, 1, D). The class table lives
    outside the UNet (CompVis `cond_stage_model.embedding`).
    """

    conditioning = "cross_attention"
    subfolder = "unet"

    def __init__(self, model: nn.Module, class_table: torch.Tensor):
        dim = model.config.cross_attention_dim
        if class_table.dim() != 2 or not class_table.is_floating_point():
            raise PriorError(f"the class table must be a 2-D floating-point tensor (num_classes + 1, "
                             f"D), got {tuple(class_table.shape)} {class_table.dtype}")
        if isinstance(dim, int) and class_table.shape[1] != dim:
            raise PriorError(f"the class table has {class_table.shape[1]} values per row but the "
                             f"UNet's cross_attention_dim is {dim}: they belong to different models")
        super().__init__(model, class_table)

    def eps(self, z_t, t, cond):
        return self.model(z_t, t, encoder_hidden_states=cond[:, None, :]).sample


class ClassEmbeddingDenoiser(DenoiserAdapter):
    """`UNet2DModel` with `num_class_embeds`: the class vector is added to the time embedding.

    The model's `nn.Embedding` is taken out as the class table and replaced by a
    pass-through, so `class_labels` carries the vector itself.
    """

    conditioning = "class_embedding"
    subfolder = "unet"

    def __init__(self, model: nn.Module):
        embedding = model.class_embedding
        if not isinstance(embedding, nn.Embedding):
            raise PriorError("UNet2DModel prior needs class embeddings "
                             "(num_class_embeds set, class_embed_type None)")
        table = embedding.weight
        model.class_embedding = _PassThroughLabels()
        super().__init__(model, table)
        self._lean_structure = None  # (model checked, whether the lean forward reproduces it)

    # The lean forward (`lean_unet.lean_unet2d_forward`, bit-identical, less Python per call)
    # whenever it reproduces the model; False forces the diffusers forward (the reference).
    lean_forward = True

    def eps(self, z_t, t, cond):
        if self.lean_forward and self._lean_applies():
            return lean_unet2d_forward(self.model, z_t, t, cond)
        return self.model(z_t, t, class_labels=cond).sample

    def _lean_applies(self) -> bool:
        """`why_not_lean` on the structure once (it walks every module: ~1 ms), the settings
        that change after construction (train mode, `model.compile()`, global hooks) every call.
        Hooks or gradient checkpointing put on submodules after the first call are not seen:
        call `recheck_lean()` after such a change (nothing in ld3m-fast makes one)."""
        if self.model.training or getattr(self.model, "_compiled_call_impl", None) is not None \
                or lean_global_hooks():
            return False
        if self._lean_structure is None or self._lean_structure[0] is not self.model:
            self._lean_structure = (self.model, why_not_lean(self.model) is None)
        return self._lean_structure[1]

    def recheck_lean(self) -> None:
        """Check the model's structure again on the next call (see `_lean_applies`)."""
        self._lean_structure = None


class AdaLNDenoiser(DenoiserAdapter):
    """`DiTTransformer2DModel`: the class vector enters every block's adaLN-Zero.

    diffusers keeps one copy of the label table per block (identical after
    conversion from the original DiT); they must agree, and one shared learnable
    vector feeds them all. DiT predicts (eps, variance): only eps is used.
    """

    conditioning = "adaln"
    subfolder = "transformer"

    def __init__(self, model: nn.Module):
        embedders = [block.norm1.emb.class_embedder for block in model.transformer_blocks]
        table = embedders[0].embedding_table.weight
        if any(e.embedding_table.weight is not table and not torch.equal(e.embedding_table.weight, table)
               for e in embedders[1:]):
            raise PriorError("DiT blocks hold different class tables; ld3m-fast needs one shared "
                             "table (tie them, as the original DiT checkpoints do)")
        if table.shape[0] != model.config.num_embeds_ada_norm + 1:
            raise PriorError("DiT class table has no null row (class_dropout_prob was 0)")
        for block in model.transformer_blocks:
            block.norm1.emb.class_embedder = _PassThroughLabels()
        super().__init__(model, table)

    def eps(self, z_t, t, cond):
        out = self.model(z_t, timestep=t, class_labels=cond).sample
        return out[:, : z_t.shape[1]]


class AutoencoderAdapter(nn.Module):
    """Base: images in [-1, 1] <-> scaled diffusion latents."""

    kind: str = ""
    subfolder: str = ""

    def __init__(self, model: nn.Module, scaling_factor: float):
        if (isinstance(scaling_factor, bool) or not isinstance(scaling_factor, numbers.Real)
                or not math.isfinite(scaling_factor) or scaling_factor <= 0):
            raise PriorError(f"the autoencoder's scaling factor must be a positive number, got "
                             f"{scaling_factor!r}")
        super().__init__()
        self.model = model
        self.scaling_factor = float(scaling_factor)

    @property
    def latent_channels(self) -> int:
        return self.model.config.latent_channels

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.model.config.block_out_channels) - 1)


class VQAutoencoder(AutoencoderAdapter):
    """`VQModel`: latents are the pre-quantisation encoder output (after quant_conv),
    as in CompVis LDMs; decoding quantises with a straight-through estimator."""

    kind = "vq"
    subfolder = "vqvae"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x).latents * self.scaling_factor

    def anchor(self, z: torch.Tensor) -> torch.Tensor:
        quantized, _, _ = self.model.quantize(z / self.scaling_factor)
        return quantized * self.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z / self.scaling_factor, force_not_quantize=False).sample


class KLAutoencoder(AutoencoderAdapter):
    """`AutoencoderKL`: encode to the posterior mode (deterministic), no quantisation."""

    kind = "kl"
    subfolder = "vae"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x).latent_dist.mode() * self.scaling_factor

    def anchor(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z / self.scaling_factor).sample
