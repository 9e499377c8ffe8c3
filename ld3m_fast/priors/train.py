"""Train the tiny class-conditional latent diffusion model that ships as the default prior.

Two stages, diffusers modules only, on a CPU in minutes:

1. `AutoencoderKL` (32x32 RGB in [-1, 1] -> 4x8x8 latent, factor 4): L1 + L2
   reconstruction of a posterior sample plus a small KL term. The latent scaling
   factor is then 1 / std of the training latents (posterior modes), as Stable
   Diffusion's 0.18215 was chosen, so the diffusion model sees unit-variance latents.
2. `UNet2DModel` with `num_class_embeds = num_classes + 1` (last row = the null
   class) on the scaled latents: epsilon prediction under the cin256-v2 noise
   schedule (`TINY_SCHEDULER_CONFIG`), labels replaced by the null class with
   probability `class_dropout` so classifier-free guidance works. The weights saved
   are an exponential moving average of the training weights.

Images: Fashion-MNIST 28x28 grayscale as `ld3m_fast.data.load_dataset` decodes it
(shorter side resized to 32 with Pillow bilinear, centre crop, gray replicated to RGB),
mapped to [-1, 1] with `ld3m_fast.normalization.uint8_to_autoencoder`.

Randomness: model initialisation through `torch.manual_seed(seed)` (diffusers draws
from the global RNG; the caller's global state is restored afterwards); data order,
timesteps, noise, class dropout and posterior samples through explicit generators.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._files import atomic_write
from ..bounds import SEED_MAXIMUM, Bounds
from ..errors import LD3MError
from ..normalization import uint8_to_autoencoder
from .io import save_prior_parts
from .prior import alphas_cumprod_from_config
from .tiny import TINY_SCHEDULER_CONFIG

logger = logging.getLogger(__name__)

IMAGE_SIZE = 32
LATENT_FACTOR = 4


def _bounded(default, help: str = "", **bounds):
    """A `PriorTrainingConfig` field with its bounds (`ld3m_fast.bounds`): `check` and the flags of
    `ld3m-fast prior train` read them."""
    return field(default=default, metadata={"bounds": Bounds(**bounds), "help": help})


@dataclass
class PriorTrainingConfig:
    """Everything that decides the trained weights (besides the data)."""

    ae_steps: int = _bounded(2000, "autoencoder training steps", minimum=1)
    ae_batch_size: int = _bounded(32, "autoencoder batch size", minimum=1)
    ae_lr: float = _bounded(1e-3, "autoencoder learning rate", above=0)
    kl_weight: float = _bounded(1e-6, "weight of the autoencoder's KL term", minimum=0)
    unet_steps: int = _bounded(3500, "denoiser training steps", minimum=1)
    batch_size: int = _bounded(128, "denoiser batch size", minimum=1)
    lr: float = _bounded(2e-3, "denoiser peak learning rate", above=0)
    warmup_steps: int = _bounded(200, minimum=0)
    class_dropout: float = _bounded(0.1, "probability of training on the null class (classifier-free guidance)",
                                    minimum=0, below=1)
    ema_decay: float = _bounded(0.999, "decay of the weights' exponential moving average (the saved weights)",
                                minimum=0, maximum=1)
    latent_channels: int = _bounded(4, minimum=1)
    ae_channels: tuple[int, ...] = (16, 32, 64)
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_layers_per_block: int = _bounded(2, minimum=1)
    seed: int = _bounded(0, "seed of the initialisation and of every random stream", minimum=0, maximum=SEED_MAXIMUM)
    log_every: int = _bounded(200, "print the losses every N steps", minimum=1)

    def check(self):
        for item in fields(self):
            if "bounds" in item.metadata:
                item.metadata["bounds"].check("--" + item.name.replace("_", "-"), getattr(self, item.name))
        if len(self.ae_channels) != 3:
            raise LD3MError("the autoencoder needs 3 levels (latent factor 4)")


# --------------------------------------------------------------------------- models

def build_autoencoder(config: PriorTrainingConfig) -> nn.Module:
    """A small `AutoencoderKL`: (B,3,32,32) in [-1,1] <-> latent (B,C,8,8)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=tuple(config.ae_channels),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, latent_channels=config.latent_channels,
        norm_num_groups=min(16, min(config.ae_channels)), sample_size=IMAGE_SIZE,
        # An 8x8 latent needs no self-attention in the mid block; it would only cost time.
        mid_block_add_attention=False)


def build_denoiser(config: PriorTrainingConfig, num_classes: int) -> nn.Module:
    """A small `UNet2DModel` on (B,C,8,8) latents with a (num_classes + 1)-row label table."""
    from diffusers import UNet2DModel

    levels = len(config.unet_channels)
    down = ("DownBlock2D",) + ("AttnDownBlock2D",) * (levels - 1)
    up = ("AttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",)
    return UNet2DModel(
        sample_size=IMAGE_SIZE // LATENT_FACTOR, in_channels=config.latent_channels,
        out_channels=config.latent_channels, block_out_channels=tuple(config.unet_channels),
        layers_per_block=config.unet_layers_per_block, down_block_types=down,
        up_block_types=up, attention_head_dim=32, norm_num_groups=16,
        num_class_embeds=num_classes + 1)


def build_models(config: PriorTrainingConfig, num_classes: int) -> tuple[nn.Module, nn.Module]:
    """(autoencoder, denoiser), initialised from `config.seed` without touching the caller's RNG."""
    state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)  # diffusers initialises through the global RNG
    try:
        return build_autoencoder(config), build_denoiser(config, num_classes)
    finally:
        torch.random.set_rng_state(state)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------- helpers

def _batches(num_items: int, batch_size: int, generator: torch.Generator):
    """Endless stream of index batches (B,) int64: reshuffled epochs, last partial batch dropped."""
    batch_size = min(batch_size, num_items)
    while True:
        order = torch.randperm(num_items, generator=generator)
        for start in range(0, num_items - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


class _EMA:
    """Exponential moving average of a model's weights, with the usual early warm-up."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, new in zip(self.model.parameters(), model.parameters()):
            avg.lerp_(new.detach(), 1.0 - decay)
        for avg, new in zip(self.model.buffers(), model.buffers()):
            avg.copy_(new)


def _check_finite(loss: torch.Tensor, what: str, step: int):
    if not torch.isfinite(loss):
        raise LD3MError(f"{what} loss became {loss.item()} at step {step}: lower the learning rate")


# ------------------------------------------------------------------ autoencoder

def train_autoencoder(ae: nn.Module, images: torch.Tensor, config: PriorTrainingConfig,
                      generator: torch.Generator) -> list[float]:
    """Fit `ae` to images (N,3,32,32) uint8. Returns the loss every `log_every` steps.

    loss = L1 + L2 between x and decode(sample of q(z|x)) (both on [-1,1])
           + kl_weight * KL(q(z|x) || N(0, I)) summed over the latent, averaged over the batch.
    """
    ae.train()
    optimizer = torch.optim.AdamW(ae.parameters(), lr=config.ae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, config.ae_steps, min(100, config.ae_steps // 10 + 1)))
    batches = _batches(len(images), config.ae_batch_size, generator)
    history, running = [], 0.0
    progress = tqdm(range(config.ae_steps), desc="autoencoder", unit="step", mininterval=5)
    for step in progress:
        x = uint8_to_autoencoder(images[next(batches)])
        posterior = ae.encode(x).latent_dist
        reconstruction = ae.decode(posterior.sample(generator=generator)).sample
        loss = (F.l1_loss(reconstruction, x) + F.mse_loss(reconstruction, x)
                + config.kl_weight * posterior.kl().mean())
        _check_finite(loss, "autoencoder", step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        running += loss.item()
        if (step + 1) % config.log_every == 0 or step + 1 == config.ae_steps:
            count = (step % config.log_every) + 1
            history.append(running / count)
            logger.info(f"autoencoder step {step + 1}/{config.ae_steps}: loss {running / count:.4f}")
            progress.set_postfix(loss=f"{running / count:.4f}")
            running = 0.0
    ae.eval()
    return history


@torch.no_grad()
def encode_modes(ae: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Unscaled posterior modes (N,C,8,8) float32 of images (N,3,32,32) uint8."""
    return torch.cat([ae.encode(uint8_to_autoencoder(images[i:i + batch_size])).latent_dist.mode()
                      for i in range(0, len(images), batch_size)])


def scaling_factor_of(latents: torch.Tensor) -> float:
    """1 / std of all latent values: makes the diffusion model's data unit-variance."""
    return float(1.0 / latents.float().std())


@torch.no_grad()
def reconstruction_error(encode: Callable, decode: Callable, images: torch.Tensor,
                         batch_size: int = 250) -> dict[str, float]:
    """MSE and PSNR of decode(encode(x)) against x, images (N,3,H,W) uint8.

    `mse_pm1` on the [-1, 1] scale the autoencoder works in; `mse_01` and `psnr_db`
    on [0, 1] after clamping (PSNR = 10 log10(1 / mse_01)).
    """
    total_pm1 = total_01 = 0.0
    for i in range(0, len(images), batch_size):
        x = uint8_to_autoencoder(images[i:i + batch_size])
        reconstruction = decode(encode(x))
        total_pm1 += F.mse_loss(reconstruction, x, reduction="sum").item()
        total_01 += F.mse_loss((reconstruction.clamp(-1, 1) + 1) / 2, (x + 1) / 2,
                               reduction="sum").item()
    count = images[0].numel() * len(images)
    mse_01 = total_01 / count
    return {"mse_pm1": total_pm1 / count, "mse_01": mse_01,
            "psnr_db": 10.0 * math.log10(1.0 / max(mse_01, 1e-12)), "images": len(images)}


# --------------------------------------------------------------------- denoiser

def train_denoiser(unet: nn.Module, latents: torch.Tensor, labels: torch.Tensor,
                   config: PriorTrainingConfig, generator: torch.Generator) -> tuple[nn.Module, list[float]]:
    """Fit `unet` to predict the noise in q(z_t | z_0) for scaled latents (N,C,8,8).

    labels (N,) int64 in [0, K); with probability `class_dropout` a label becomes K
    (the null row). Returns (EMA copy of the denoiser, loss every `log_every` steps).
    """
    num_classes = unet.config.num_class_embeds - 1
    alphas_cumprod = alphas_cumprod_from_config(TINY_SCHEDULER_CONFIG).float()
    num_timesteps = len(alphas_cumprod)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, config.unet_steps, config.warmup_steps))
    ema = _EMA(unet, config.ema_decay)
    batches = _batches(len(latents), config.batch_size, generator)
    history, running = [], 0.0
    progress = tqdm(range(config.unet_steps), desc="denoiser", unit="step", mininterval=5)
    for step in progress:
        index = next(batches)
        z0, y = latents[index], labels[index].clone()
        y[torch.rand(len(y), generator=generator) < config.class_dropout] = num_classes
        t = torch.randint(0, num_timesteps, (len(y),), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        abar = alphas_cumprod[t].view(-1, 1, 1, 1)
        z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
        loss = F.mse_loss(unet(z_t, t, class_labels=y).sample, noise)
        _check_finite(loss, "denoiser", step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        ema.update(unet)
        running += loss.item()
        if (step + 1) % config.log_every == 0 or step + 1 == config.unet_steps:
            count = (step % config.log_every) + 1
            history.append(running / count)
            logger.info(f"denoiser step {step + 1}/{config.unet_steps}: loss {running / count:.4f}")
            progress.set_postfix(loss=f"{running / count:.4f}")
            running = 0.0
    unet.eval()
    return ema.model.eval(), history


# ------------------------------------------------------------------------ driver

@dataclass
class TrainingReport:
    """What happened during `train_prior` (times in seconds of wall-clock)."""

    out_dir: str
    train_images: int
    autoencoder_parameters: int
    denoiser_parameters: int
    scaling_factor: float
    autoencoder_seconds: float
    denoiser_seconds: float
    autoencoder_losses: list[float]
    denoiser_losses: list[float]
    config: dict

    def to_dict(self) -> dict:
        return asdict(self)


def train_prior(images: torch.Tensor, labels: torch.Tensor, out_dir, *,
                class_names: list[str], config: PriorTrainingConfig | None = None,
                data_description: str = "") -> TrainingReport:
    """Train autoencoder then denoiser on images (N,3,32,32) uint8 with labels (N,) and
    write a prior folder (see `ld3m_fast.priors.io`) to `out_dir`.

    Deterministic given `config.seed` and the data (for a fixed torch build and thread count).
    """
    config = config or PriorTrainingConfig()
    config.check()
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise LD3MError(f"training images must be (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) uint8, "
                        f"got {tuple(images.shape)} {images.dtype}")
    num_classes = len(class_names)
    labels = labels.to(torch.int64)
    if labels.shape != (len(images),) or int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise LD3MError(f"labels must be (N,) integers in [0, {num_classes})")
    ae, unet = build_models(config, num_classes)
    logger.info(f"autoencoder {parameter_count(ae):,} parameters, denoiser {parameter_count(unet):,}; "
                f"{len(images)} training images")
    generator = torch.Generator().manual_seed(config.seed)

    started = time.perf_counter()
    ae_losses = train_autoencoder(ae, images, config, generator)
    modes = encode_modes(ae, images)
    scale = scaling_factor_of(modes)
    ae.register_to_config(scaling_factor=scale)
    ae_seconds = time.perf_counter() - started
    logger.info(f"latent std {1 / scale:.4f} -> scaling factor {scale:.5f}")

    started = time.perf_counter()
    ema_unet, unet_losses = train_denoiser(unet, modes * scale, labels, config, generator)
    unet_seconds = time.perf_counter() - started

    description = (f"Tiny class-conditional LDM (AutoencoderKL + UNet2DModel) trained by "
                   f"ld3m_fast.priors.train on {data_description or f'{len(images)} images'}: "
                   f"{config.ae_steps} autoencoder steps, {config.unet_steps} denoiser steps "
                   f"(EMA {config.ema_decay}), seed {config.seed}.")
    save_prior_parts(out_dir, denoiser=ema_unet, autoencoder=ae, class_table=None,
                     scheduler_config=TINY_SCHEDULER_CONFIG, conditioning="class_embedding",
                     num_classes=num_classes, image_size=IMAGE_SIZE, scaling_factor=scale,
                     class_names=list(class_names), description=description)
    logger.info(f"wrote prior to {out_dir} (autoencoder {ae_seconds:.0f}s, denoiser {unet_seconds:.0f}s)")
    return TrainingReport(str(out_dir), len(images), parameter_count(ae), parameter_count(unet),
                          scale, ae_seconds, unet_seconds, ae_losses, unet_losses, asdict(config))


# ----------------------------------------------------------------------- samples

@torch.no_grad()
def class_sample_grid(prior, *, per_class: int = 10, steps: int = 50, guidance: float = 3.0,
                      seed: int = 0) -> torch.Tensor:
    """Plain-DDIM class-conditional samples: (num_classes * per_class, 3, H, W) uint8, class-major.

    Starts from q_sample(Z, t_max) with random Z (mostly noise at t_max), i.e. an
    ordinary DDIM sampler with classifier-free guidance against the null row.
    """
    from ..generator import LD3MGenerator
    from ..normalization import denormalize_unit

    generator = torch.Generator().manual_seed(seed)
    chain = LD3MGenerator(prior, steps=steps, guidance=guidance, skip=None, grad_mode="autograd")
    count = prior.num_classes * per_class
    Z = torch.randn(count, *prior.latent_shape(), generator=generator)
    c = prior.class_table[torch.arange(prior.num_classes).repeat_interleave(per_class)]
    images = chain(Z, c, chain.draw_noise(count, generator))
    return (denormalize_unit(images).clamp(0, 1) * 255).round().to(torch.uint8)


def save_labelled_grid(images: torch.Tensor, rows: int, row_labels: list[str], path,
                       scale: int = 2) -> Path:
    """Write images (rows*cols, 3, H, W) uint8 as a PNG grid, one labelled row per class."""
    from PIL import Image, ImageDraw

    count, _, height, width = images.shape
    cols = count // rows
    grid = images.view(rows, cols, 3, height, width).permute(0, 3, 1, 4, 2)
    grid = grid.reshape(rows * height, cols * width, 3).numpy()
    picture = Image.fromarray(grid).resize((cols * width * scale, rows * height * scale),
                                           Image.NEAREST)
    margin = 90
    canvas = Image.new("RGB", (picture.width + margin, picture.height), "white")
    canvas.paste(picture, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for row, label in enumerate(row_labels):
        draw.text((4, row * height * scale + height * scale // 2 - 5), label, fill="black")
    path = Path(path)
    with atomic_write(path, suffix=".png") as temporary:
        canvas.save(temporary, format="PNG")
    return path
