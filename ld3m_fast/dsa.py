"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021) with explicit randomness.

Groups (SPEC §2.3), one drawn uniformly per call:

    color   brightness x + U[-0.5, 0.5), saturation (x - mean_c) * U[0, 2) + mean_c,
            contrast (x - mean_chw) * U[0.5, 1.5) + mean_chw (all three, in this order)
    crop    translate by integer shifts in [-r, r] pixels per axis, r = round(0.125 * size),
            zero fill
    cutout  zero a square of side round(0.5 * size) centred anywhere in the image
    flip    horizontal flip with probability 0.5
    scale   x / y scale factors U[1/1.2, 1.2], bilinear resampling, zero fill
    rotate  angle U[-15, 15) degrees, bilinear resampling, zero fill

All randomness comes from the `torch.Generator` passed in (the global RNG is never used).
A *draw* holds the chosen group and per-sample parameters stored size-independently
(fractions are turned into pixel offsets at apply time), so one draw can be applied to
batches of different sizes and resolutions.

Siamese mode: `draw = aug.draw(max(n_real, n_syn), generator)` and `aug.apply(real, draw)`,
`aug.apply(syn, draw)`; row i of every batch gets parameters i of the draw (the behaviour of
the original DSA code, which re-seeded before each of the two calls). `batch_shared=True`
uses one parameter set for all rows (the original `batchmode`). `aug.siamese(real, syn, g)`
does both calls.

Everything is differentiable w.r.t. the images: gathers and masks for crop/cutout/flip,
`affine_grid` + `grid_sample` for scale/rotate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ._host import draw_int

GROUPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
_GROUP_ALIASES = {"translate": "crop", "translation": "crop", "rotation": "rotate"}


@dataclass(frozen=True)
class DSAParams:
    """Ranges of the augmentations (the released DSA defaults)."""

    brightness: float = 0.5       # additive, U[-b, b)
    saturation: float = 2.0       # multiplier, U[0, s)
    contrast: float = 0.5         # multiplier, U[1 - c, 1 + c)
    crop_ratio: float = 0.125     # max shift as a fraction of the side
    cutout_ratio: float = 0.5     # side of the erased square as a fraction of the side
    flip_probability: float = 0.5
    scale: float = 1.2            # factors in U[1/scale, scale)
    rotate_degrees: float = 15.0  # U[-deg, deg)


@dataclass
class AugmentationDraw:
    """One random draw: the group and (batch_size, ...) parameter tensors (on `device`)."""

    group: str
    batch_size: int
    params: dict[str, torch.Tensor] = field(default_factory=dict)

    def rows(self, n: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Parameters of the first n rows, on `device`."""
        if n > self.batch_size:
            raise ValueError(f"draw holds parameters for {self.batch_size} images, got a batch "
                             f"of {n}: draw with the larger batch size")
        return {k: v[:n].to(device) for k, v in self.params.items()}

    def select(self, rows: slice | torch.Tensor) -> "AugmentationDraw":
        """The draw restricted to `rows` (a slice or index tensor): for micro-batching, so
        images[rows] gets exactly the parameters it would get inside the whole batch."""
        params = {k: v[rows.to(v.device) if isinstance(rows, torch.Tensor) else rows]
                  for k, v in self.params.items()}
        size = next(iter(params.values())).shape[0] if params else 0
        return AugmentationDraw(self.group, size, params)


def parse_strategy(strategy: str | None) -> tuple[str, ...]:
    """'color_crop_cutout_flip_scale_rotate' -> ('color', 'crop', ...); '' / 'none' -> ()."""
    if strategy is None or strategy.strip().lower() in ("", "none"):
        return ()
    groups = []
    for part in strategy.lower().split("_"):
        name = _GROUP_ALIASES.get(part, part)
        if name not in GROUPS:
            raise ValueError(f"unknown DSA augmentation {part!r} in strategy {strategy!r}: "
                             f"use '_'-joined names from {', '.join(GROUPS)}")
        if name not in groups:
            groups.append(name)
    return tuple(groups)


def check_strategy(strategy: str) -> str:
    """`strategy` itself when `parse_strategy` reads it (a flag's type); ValueError otherwise."""
    parse_strategy(strategy)
    return strategy


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=generator.device) * (high - low) + low


class DSA:
    """Differentiable augmentation; `aug(x, generator)` augments a (B, C, H, W) float batch."""

    def __init__(self, strategy: str | None = DEFAULT_STRATEGY, params: DSAParams = DSAParams(),
                 batch_shared: bool = False):
        self.groups = parse_strategy(strategy)
        self.params = params
        self.batch_shared = batch_shared

    @property
    def enabled(self) -> bool:
        return bool(self.groups)

    def __repr__(self) -> str:
        return f"DSA(strategy={'_'.join(self.groups) or 'none'!r}, batch_shared={self.batch_shared})"

    # ------------------------------------------------------------------ drawing

    def draw(self, batch_size: int, generator: torch.Generator,
             device: torch.device | str | None = None) -> AugmentationDraw | None:
        """Choose one group and draw its parameters for `batch_size` images.

        Only `generator` is consumed. Returns None when the strategy is empty.
        """
        if not self.groups:
            return None
        choice = draw_int(len(self.groups), generator)
        group = self.groups[choice]
        n = 1 if self.batch_shared else batch_size
        params = getattr(self, f"_draw_{group}")(n, generator)
        target = torch.device(device) if device is not None else generator.device
        params = {k: v.expand(batch_size, *v.shape[1:]).to(target) for k, v in params.items()}
        return AugmentationDraw(group, batch_size, params)

    def _draw_color(self, n, g):
        p = self.params
        return {"brightness": _uniform(n, -p.brightness, p.brightness, g),
                "saturation": _uniform(n, 0.0, p.saturation, g),
                "contrast": _uniform(n, 1.0 - p.contrast, 1.0 + p.contrast, g)}

    def _draw_crop(self, n, g):
        # Fractions in [0, 1); turned into integer shifts for the actual image size.
        return {"shift": torch.rand(n, 2, generator=g, device=g.device)}

    def _draw_cutout(self, n, g):
        return {"centre": torch.rand(n, 2, generator=g, device=g.device)}

    def _draw_flip(self, n, g):
        return {"flip": torch.rand(n, generator=g, device=g.device) < self.params.flip_probability}

    def _draw_scale(self, n, g):
        s = self.params.scale
        return {"scale": torch.rand(n, 2, generator=g, device=g.device) * (s - 1.0 / s) + 1.0 / s}

    def _draw_rotate(self, n, g):
        limit = math.radians(self.params.rotate_degrees)
        return {"angle": _uniform(n, -limit, limit, g)}

    # ------------------------------------------------------------------ applying

    def apply(self, x: torch.Tensor, draw: AugmentationDraw | None) -> torch.Tensor:
        """Augment x (B, C, H, W) float with rows [0, B) of `draw` (None = identity)."""
        if draw is None:
            return x
        params = draw.rows(x.shape[0], x.device)
        return getattr(self, f"_apply_{draw.group}")(x, **params)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.draw(x.shape[0], generator, x.device))

    def siamese(self, real: torch.Tensor, synthetic: torch.Tensor, generator: torch.Generator):
        """Augment both batches with one shared draw (row i of each gets parameters i)."""
        draw = self.draw(max(real.shape[0], synthetic.shape[0]), generator, real.device)
        return self.apply(real, draw), self.apply(synthetic, draw)

    @staticmethod
    def _per_row(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return v.to(x.dtype).view(-1, 1, 1, 1)

    def _apply_color(self, x, brightness, saturation, contrast):
        x = x + self._per_row(brightness, x)
        channel_mean = x.mean(dim=1, keepdim=True)
        x = (x - channel_mean) * self._per_row(saturation, x) + channel_mean
        image_mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - image_mean) * self._per_row(contrast, x) + image_mean

    def _apply_crop(self, x, shift):
        batch, _, height, width = x.shape
        rows = self._shifted_indices(height, shift[:, 0])
        cols = self._shifted_indices(width, shift[:, 1])
        inside = ((rows >= 0) & (rows < height))[:, :, None] & ((cols >= 0) & (cols < width))[:, None, :]
        batch_index = torch.arange(batch, device=x.device)[:, None, None]
        # Gather in (B, H, W, C) layout, then zero what came from outside the image.
        moved = x.permute(0, 2, 3, 1)[batch_index, rows.clamp(0, height - 1)[:, :, None],
                                      cols.clamp(0, width - 1)[:, None, :]]
        return (moved * inside.unsqueeze(-1).to(x.dtype)).permute(0, 3, 1, 2)

    def _shifted_indices(self, size: int, fraction: torch.Tensor) -> torch.Tensor:
        """(B,) fractions -> (B, size) source indices for an integer shift in [-r, r]."""
        limit = int(size * self.params.crop_ratio + 0.5)
        shift = (fraction * (2 * limit + 1)).floor().long().clamp(max=2 * limit) - limit
        return torch.arange(size, device=fraction.device)[None, :] + shift[:, None]

    def _apply_cutout(self, x, centre):
        _, _, height, width = x.shape
        keep_rows = self._outside_cut(height, centre[:, 0])
        keep_cols = self._outside_cut(width, centre[:, 1])
        keep = keep_rows[:, :, None] | keep_cols[:, None, :]
        return x * keep.unsqueeze(1).to(x.dtype)

    def _outside_cut(self, size: int, fraction: torch.Tensor) -> torch.Tensor:
        """(B,) fractions -> (B, size) bool: True where the position is outside the cut band."""
        side = int(size * self.params.cutout_ratio + 0.5)
        # Centres range over [0, size - 1] (one more position for even sides, as in DSA).
        positions = size + (1 - side % 2)
        centre = (fraction * positions).floor().long().clamp(max=positions - 1)
        start = centre - side // 2
        index = torch.arange(size, device=fraction.device)[None, :]
        return (index < start[:, None]) | (index >= (start + side)[:, None])

    def _apply_flip(self, x, flip):
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)

    def _apply_scale(self, x, scale):
        theta = torch.zeros(x.shape[0], 2, 3, dtype=x.dtype, device=x.device)
        theta[:, 0, 0] = scale[:, 0].to(x.dtype)
        theta[:, 1, 1] = scale[:, 1].to(x.dtype)
        return self._warp(x, theta)

    def _apply_rotate(self, x, angle):
        cos, sin = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)
        theta = torch.zeros(x.shape[0], 2, 3, dtype=x.dtype, device=x.device)
        theta[:, 0, 0], theta[:, 0, 1] = cos, sin
        theta[:, 1, 0], theta[:, 1, 1] = -sin, cos
        return self._warp(x, theta)

    @staticmethod
    def _warp(x, theta):
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
