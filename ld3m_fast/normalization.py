"""The one image normalisation shared by real and generated images.

Real images (uint8) and decoded images (the autoencoder's [-1, 1]) both end up
as `(x01 - MEAN) / STD` with x01 in [0, 1]. The released code normalised the two
with different means; here every path goes through these functions.
"""
from __future__ import annotations

import torch

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _stats(x: torch.Tensor):
    shape = (1, -1, 1, 1)
    mean = torch.tensor(MEAN, dtype=x.dtype, device=x.device).view(shape)
    std = torch.tensor(STD, dtype=x.dtype, device=x.device).view(shape)
    return mean, std


def normalize_unit(x01: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] -> network input."""
    mean, std = _stats(x01)
    return (x01 - mean) / std


def denormalize_unit(x: torch.Tensor) -> torch.Tensor:
    """Network input -> (B, 3, H, W) images in [0, 1] (not clamped)."""
    mean, std = _stats(x)
    return x * std + mean


def from_uint8(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> network input."""
    return normalize_unit(images.to(dtype) / 255.0)


def from_autoencoder(x_pm1: torch.Tensor) -> torch.Tensor:
    """Decoder output in [-1, 1] -> network input (differentiable, no clamp)."""
    return normalize_unit((x_pm1 + 1.0) * 0.5)


def to_autoencoder(x: torch.Tensor) -> torch.Tensor:
    """Network input -> the [-1, 1] range the autoencoders' encoders expect."""
    return denormalize_unit(x) * 2.0 - 1.0


def uint8_to_autoencoder(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> [-1, 1], what the VQ/KL encoders were trained on."""
    return images.to(dtype) / 127.5 - 1.0
