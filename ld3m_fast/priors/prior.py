"""`Prior`: a frozen, class-conditional latent diffusion model behind one interface."""
from __future__ import annotations

import torch
from torch import nn

from .adapters import AutoencoderAdapter, DenoiserAdapter


def alphas_cumprod_from_config(scheduler_config: dict) -> torch.Tensor:
    """The training schedule's abar_t (num_train_timesteps,) float64, via a diffusers scheduler."""
    from diffusers import DDIMScheduler
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    # Real numbers even while a planner builds the prior under FakeTensorMode:
    # the chain's per-step constants are Python floats computed from them.
    with unset_fake_temporarily():
        scheduler = DDIMScheduler.from_config(config)
        return scheduler.alphas_cumprod.to(torch.float64)


class Prior(nn.Module):
    """A frozen class-conditional LDM: denoiser + autoencoder + noise schedule + class table.

    Shapes (B = batch, C = `latent_channels`, h = w = image side / `latent_factor`):
      - `eps(z_t (B,C,h,w), t (B,) long, cond (B,D)) -> (B,C,h,w)` noise prediction;
      - `class_table` (num_classes + 1, D); row `null_index` is the unconditional class;
      - `encode(x (B,3,H,W) in [-1,1]) -> Z (B,C,h,w)`; `decode(z) -> x in [-1,1]`;
      - `anchor(Z)`: straight-through-quantised Z (VQ) or Z itself (KL);
      - `alphas_cumprod` (num_train_timesteps,) float64.
    Parameters never receive gradients; gradients flow *through* the modules.
    """

    def __init__(self, denoiser: DenoiserAdapter, autoencoder: AutoencoderAdapter,
                 scheduler_config: dict, *, num_classes: int, image_size: int,
                 class_names: list[str] | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.autoencoder = autoencoder
        self.scheduler_config = dict(scheduler_config)
        # A plain CPU float64 tensor, not a buffer: `.to(dtype)` must not round the
        # schedule, and only Python floats computed from it reach the chain.
        self.alphas_cumprod = alphas_cumprod_from_config(scheduler_config)
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.class_names = list(class_names) if class_names else None
        self._check()
        self.requires_grad_(False)
        self.eval()

    def _check(self):
        rows = self.class_table.shape[0]
        if rows != self.num_classes + 1:
            raise ValueError(f"class table has {rows} rows, expected num_classes + 1 = "
                             f"{self.num_classes + 1} (the last row is the null class)")
        if self.image_size % self.latent_factor:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the "
                             f"latent factor {self.latent_factor}")
        channels = self.latent_channels
        if self.denoiser.in_channels != channels:
            raise ValueError(f"the denoiser takes {self.denoiser.in_channels} latent channels but "
                             f"the autoencoder makes {channels}")
        # DiT predicts (eps, variance): twice the latent channels, of which eps is the first half.
        allowed = (channels, 2 * channels) if self.conditioning == "adaln" else (channels,)
        if self.denoiser.out_channels not in allowed:
            raise ValueError(f"the denoiser predicts {self.denoiser.out_channels} channels, not the "
                             f"autoencoder's {channels} latent channels")

    def train(self, mode: bool = True):
        # Frozen: dropout and friends stay off whatever the caller asks.
        return super().train(False)

    @property
    def class_table(self) -> torch.Tensor:
        return self.denoiser.class_table

    @property
    def null_index(self) -> int:
        return self.num_classes

    @property
    def embedding_dim(self) -> int:
        return self.class_table.shape[1]

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.latent_channels

    @property
    def latent_factor(self) -> int:
        return self.autoencoder.latent_factor

    @property
    def conditioning(self) -> str:
        return self.denoiser.conditioning

    def latent_shape(self, image_size: int | None = None) -> tuple[int, int, int]:
        """(C, h, w) of the latent for square images of `image_size` (default: native)."""
        side = self.image_size if image_size is None else image_size
        if side % self.latent_factor:
            raise ValueError(f"image size {side} is not a multiple of the latent factor "
                             f"{self.latent_factor}")
        return (self.latent_channels, side // self.latent_factor, side // self.latent_factor)

    def eps(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0:
            t = t.expand(z_t.shape[0])
        return self.denoiser.eps(z_t, t, cond.to(z_t.dtype))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(x)

    def anchor(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.anchor(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z)

    @property
    def device(self) -> torch.device:
        return self.class_table.device
