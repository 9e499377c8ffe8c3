"""The LD3M chain: learnable latents Z and class embeddings c -> images, differentiably.

    z_T      = sqrt(abar_tmax) * Z + sqrt(1 - abar_tmax) * n          (n: explicit start noise)
    for k = T-1 ... 0 (timesteps t_k = 1 + k * (1000 // T), visited from the largest):
        eps  = eps_null + g * (eps(z_t, t_k, c) - eps_null)         (classifier-free guidance)
        z    = ld3m_step(z, eps, anchor, a_t, a_prev, w_k, skip)    (see ld3m_fast.ops)
    image    = normalise(decode(z_0))

`skip="x0"` (the released code, default): anchor = quantize(Z), w_k = k / (T - 1).
`skip="mean"` (the paper's Eq. 7): anchor = z_T, w_k = (k + 1) / T.
`skip=None`: plain DDIM.

Three ways to get gradients (same values, different cost), `grad_mode`:
- "autograd": one graph through all T steps and the decoder (memory grows with T);
- "released": the released code's scheme: render without grad, then in backward
  re-render each chunk of images with autograd and a checkpoint around every
  denoiser call (3 denoiser forwards + 1 backward per step);
- "recompute" (default): render without grad keeping only the per-step latents
  z_t, then in backward walk the chain from the last step to the first,
  recomputing one step at a time with grad (2 forwards + 1 backward per step;
  memory independent of T).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import ops
from .normalization import from_autoencoder
from .priors.prior import Prior
from .reference.ld3m_step import check_skip

GRAD_MODES = ("autograd", "released", "recompute")


def render_size(prior: Prior, res: int) -> int:
    """Side the chain renders at for output side `res`: `res` up to the prior's native size,
    the native size above it (a denoiser never saw latents larger than its training size)."""
    return min(int(res), prior.image_size)


@dataclass(frozen=True)
class ChainSchedule:
    """Per-step constants of a T-step DDIM chain, in the order the chain visits them.

    All values are Python floats (float64), computed once; index k = 0 is the
    first step visited (the largest timestep).
    """

    timesteps: tuple[int, ...]
    a_t: tuple[float, ...]
    a_prev: tuple[float, ...]
    sigma: tuple[float, ...]
    skip_weight: tuple[float, ...]
    a_start: float

    @classmethod
    def build(cls, alphas_cumprod: torch.Tensor, steps: int, *, eta: float = 0.0,
              skip: str | None = "x0") -> "ChainSchedule":
        """Released-code DDIM timesteps: stride c = N // T, offset 1: {1, 1+c, ..., 1+(T-1)c}.

        (The CompVis code builds `range(0, N, c) + 1`, which has more than T entries
        when c does not divide N; we keep exactly T.) a_prev of the last step is
        abar[0], not 1, as released.
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        check_skip(skip)
        abar = alphas_cumprod.to(torch.float64).tolist()
        stride = len(abar) // steps
        ascending = [1 + i * stride for i in range(steps)]
        timesteps = tuple(reversed(ascending))
        a_t = tuple(abar[t] for t in timesteps)
        a_prev = tuple(abar[t] for t in timesteps[1:]) + (abar[0],)
        sigma = tuple(eta * math.sqrt((1 - ap) / (1 - at) * (1 - at / ap))
                      for at, ap in zip(a_t, a_prev))
        # Visit index j = 0..T-1 corresponds to the released step index k = T-1-j.
        if skip == "x0":
            weights = tuple((steps - 1 - j) / max(steps - 1, 1) for j in range(steps))
        elif skip == "mean":
            weights = tuple((steps - j) / steps for j in range(steps))
        else:
            weights = (0.0,) * steps
        return cls(timesteps, a_t, a_prev, sigma, weights, a_start=a_t[0])

    def __len__(self) -> int:
        return len(self.timesteps)


@dataclass
class ChainNoise:
    """The explicit randomness of one chain pass, drawn once per iteration.

    start: (B, C, h, w) noise of q_sample(Z, t_max).
    steps: (T, B, C, h, w) per-step noise when eta > 0, else None.
    Every pass of an iteration (render, re-render, recompute) reuses the same tensors.
    """

    start: torch.Tensor
    steps: torch.Tensor | None = None

    def select(self, index) -> "ChainNoise":
        """The noise of a subset of images (a chunk)."""
        return ChainNoise(self.start[index], None if self.steps is None else self.steps[:, index])

    def to(self, *args, **kwargs) -> "ChainNoise":
        return ChainNoise(self.start.to(*args, **kwargs),
                          None if self.steps is None else self.steps.to(*args, **kwargs))


class LD3MGenerator(torch.nn.Module):
    """Differentiable LD3M image generator over a frozen `Prior`.

    Call: `images = gen(Z, c, noise)` with
      Z (B, C, h, w) learnable latents, c (B, D) learnable class embeddings,
      noise a `ChainNoise` from `gen.draw_noise(B, generator)`;
    returns (B, 3, H, W) images in the shared normalisation of real images
    (`ld3m_fast.normalization`), H = W = `output_size` or h * latent_factor.
    Gradients reach Z and c in every `grad_mode`; the prior stays frozen.

    Args:
        prior: the frozen LDM.
        steps: T, the number of DDIM steps (10 at 128², 20 at 256² in the paper).
        guidance: classifier-free guidance scale against the null class; 1.0 = one
            conditional pass per step.
        skip: "x0" (released code), "mean" (paper Eq. 7) or None (plain DDIM).
        eta: DDIM eta; > 0 needs per-step noise (drawn by `draw_noise`).
        grad_mode: "autograd", "released" or "recompute" (see module docstring).
        chunk_size: images per chunk in "released"/"recompute" (None = all at once).
        output_size: resize decoded images to this side (differentiable, antialiased);
            None keeps the decoder's size.
        render_size: image side the chain renders at, a multiple of the latent factor
            (latents of side render_size / factor); None = the prior's native size.
    """

    def __init__(self, prior: Prior, steps: int = 10, *, guidance: float = 3.0,
                 skip: str | None = "x0", eta: float = 0.0, grad_mode: str = "recompute",
                 chunk_size: int | None = None, output_size: int | None = None,
                 render_size: int | None = None):
        super().__init__()
        if grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        self.prior = prior
        self.skip = check_skip(skip)
        self.guidance = float(guidance)
        self.eta = float(eta)
        self.grad_mode = grad_mode
        self.chunk_size = chunk_size
        self.output_size = output_size
        self.latent_shape = prior.latent_shape(render_size)
        self.schedule = ChainSchedule.build(prior.alphas_cumprod, steps, eta=eta, skip=skip)

    @property
    def steps(self) -> int:
        return len(self.schedule)

    # ----------------------------------------------------------------- noise
    def draw_noise(self, batch: int, generator: torch.Generator | None = None, *,
                   latent_shape: tuple[int, int, int] | None = None,
                   device=None, dtype=torch.float32) -> ChainNoise:
        """This iteration's chain noise for `batch` images, from an explicit generator."""
        shape = tuple(latent_shape or self.latent_shape)
        device = device if device is not None else self.prior.device
        draw = lambda *s: torch.randn(*s, generator=generator, device=device, dtype=dtype)  # noqa: E731
        start = draw(batch, *shape)
        steps = draw(self.steps, batch, *shape) if self.eta > 0 else None
        return ChainNoise(start, steps)

    # ---------------------------------------------------------- chain pieces
    def start_state(self, Z: torch.Tensor, start_noise: torch.Tensor) -> torch.Tensor:
        """z_T = q_sample(Z, t_max) with the given noise."""
        a = self.schedule.a_start
        return math.sqrt(a) * Z + math.sqrt(1.0 - a) * start_noise

    def anchor(self, Z: torch.Tensor, z_T: torch.Tensor) -> torch.Tensor | None:
        if self.skip == "x0":
            return self.prior.anchor(Z)
        if self.skip == "mean":
            return z_T
        return None

    def guided_eps(self, z_t: torch.Tensor, t: int, c: torch.Tensor):
        """(eps_cond, eps_uncond or None): one denoiser call, batched over cond and null."""
        timestep = torch.full((z_t.shape[0],), t, device=z_t.device, dtype=torch.long)
        if self.guidance == 1.0:
            return self.prior.eps(z_t, timestep, c), None
        null = self.prior.class_table[self.prior.null_index].to(c.dtype).expand_as(c)
        eps = self.prior.eps(torch.cat([z_t, z_t]), torch.cat([timestep, timestep]),
                             torch.cat([c, null]))
        eps_cond, eps_uncond = eps.chunk(2)
        return eps_cond, eps_uncond

    def step(self, j: int, z_t, c, anchor, step_noise=None, *, checkpointed: bool = False):
        """Visit step j (0 = largest timestep): denoiser call(s) + fused LD3M update."""
        s = self.schedule
        if checkpointed:
            eps_cond, eps_uncond = checkpoint(self.guided_eps, z_t, s.timesteps[j], c,
                                              use_reentrant=False)
        else:
            eps_cond, eps_uncond = self.guided_eps(z_t, s.timesteps[j], c)
        # The chain state stays in Z's dtype; under autocast the denoiser may answer in bf16.
        eps_cond, eps_uncond, anchor = (None if x is None else x.to(z_t.dtype)
                                        for x in (eps_cond, eps_uncond, anchor))
        return ops.ld3m_step(
            z_t, eps_cond, anchor, a_t=s.a_t[j], a_prev=s.a_prev[j],
            skip_weight=s.skip_weight[j], skip=self.skip, eps_uncond=eps_uncond,
            guidance=self.guidance, sigma=s.sigma[j],
            noise=None if s.sigma[j] == 0.0 else step_noise[j])

    def to_images(self, z_0: torch.Tensor) -> torch.Tensor:
        """Decode final latents and map them to the shared normalisation (and size)."""
        images = from_autoencoder(self.prior.decode(z_0))
        if self.output_size is not None and images.shape[-1] != self.output_size:
            images = F.interpolate(images, size=(self.output_size, self.output_size),
                                   mode="bilinear", align_corners=False, antialias=True)
        return images

    def render(self, Z, c, noise: ChainNoise, *, keep_latents: bool = False,
               checkpointed: bool = False):
        """The whole chain on one batch under the current grad mode.

        Returns images, or (images, latents) with latents (T+1, B, C, h, w) =
        z_T, ..., z_0 when `keep_latents`.
        """
        z = self.start_state(Z, noise.start)
        anchor = self.anchor(Z, z)
        latents = [z] if keep_latents else None
        for j in range(self.steps):
            z = self.step(j, z, c, anchor, noise.steps, checkpointed=checkpointed)
            if keep_latents:
                latents.append(z)
        images = self.to_images(z)
        return (images, torch.stack(latents)) if keep_latents else images

    # --------------------------------------------------------------- forward
    def chunks(self, batch: int):
        size = self.chunk_size or batch
        return [slice(i, min(i + size, batch)) for i in range(0, batch, size)]

    def forward(self, Z: torch.Tensor, c: torch.Tensor, noise: ChainNoise) -> torch.Tensor:
        if Z.shape[0] != c.shape[0] or Z.shape[0] != noise.start.shape[0]:
            raise ValueError(f"batch sizes differ: Z {Z.shape[0]}, c {c.shape[0]}, "
                             f"noise {noise.start.shape[0]}")
        if noise.steps is None and self.eta > 0:
            raise ValueError("eta > 0 needs per-step noise: use gen.draw_noise(...)")
        needs_grad = torch.is_grad_enabled() and (Z.requires_grad or c.requires_grad)
        if self.grad_mode == "autograd" or not needs_grad:
            return torch.cat([self.render(Z[s], c[s], noise.select(s))
                              for s in self.chunks(Z.shape[0])])
        function = _RecomputeChain if self.grad_mode == "recompute" else _ReleasedChain
        return function.apply(self, Z, c, noise.start, noise.steps)


def _autocast_state(device_type: str):
    """The caller's autocast settings, to re-enter when backward re-renders (as checkpoint does)."""
    return (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))


def _autocast(state):
    device_type, enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=enabled)


class _ReleasedChain(torch.autograd.Function):
    """Render without grad; backward re-renders each chunk with checkpointed denoiser calls."""

    @staticmethod
    def forward(ctx, gen: LD3MGenerator, Z, c, start_noise, step_noise):
        ctx.gen = gen
        ctx.autocast = _autocast_state(Z.device.type)
        ctx.save_for_backward(Z, c, start_noise, step_noise)
        noise = ChainNoise(start_noise, step_noise)
        return torch.cat([gen.render(Z[s], c[s], noise.select(s)) for s in gen.chunks(Z.shape[0])])

    @staticmethod
    def backward(ctx, grad_images):
        gen = ctx.gen
        Z, c, start_noise, step_noise = ctx.saved_tensors
        noise = ChainNoise(start_noise, step_noise)
        grad_Z, grad_c = torch.zeros_like(Z), torch.zeros_like(c)
        for s in gen.chunks(Z.shape[0]):
            Z_leaf = Z[s].detach().requires_grad_()
            c_leaf = c[s].detach().requires_grad_()
            with torch.enable_grad(), _autocast(ctx.autocast):
                images = gen.render(Z_leaf, c_leaf, noise.select(s), checkpointed=True)
            grad_Z[s], grad_c[s] = torch.autograd.grad(images, (Z_leaf, c_leaf), grad_images[s])
        return None, grad_Z, grad_c, None, None


class _RecomputeChain(torch.autograd.Function):
    """Render without grad keeping z_T..z_0; backward recomputes one step at a time."""

    @staticmethod
    def forward(ctx, gen: LD3MGenerator, Z, c, start_noise, step_noise):
        noise = ChainNoise(start_noise, step_noise)
        images, latents = [], []
        for s in gen.chunks(Z.shape[0]):
            chunk_images, chunk_latents = gen.render(Z[s], c[s], noise.select(s), keep_latents=True)
            images.append(chunk_images)
            latents.append(chunk_latents)
        ctx.gen = gen
        ctx.autocast = _autocast_state(Z.device.type)
        ctx.save_for_backward(Z, c, start_noise, step_noise, torch.cat(latents, dim=1))
        return torch.cat(images)

    @staticmethod
    def backward(ctx, grad_images):
        gen = ctx.gen
        Z, c, start_noise, step_noise, latents = ctx.saved_tensors
        grad_Z, grad_c = torch.zeros_like(Z), torch.zeros_like(c)
        with _autocast(ctx.autocast):
            for s in gen.chunks(Z.shape[0]):
                grad_Z[s], grad_c[s] = _recompute_chunk(
                    gen, Z[s], c[s], ChainNoise(start_noise, step_noise).select(s),
                    latents[:, s], grad_images[s])
        return None, grad_Z, grad_c, None, None


def _recompute_chunk(gen: LD3MGenerator, Z, c, noise: ChainNoise, latents, grad_images):
    """Gradients (dZ, dc) of one chunk, holding one step's graph at a time."""
    Z_leaf = Z.detach().requires_grad_()
    c_leaf = c.detach().requires_grad_()
    with torch.enable_grad():
        z_T = gen.start_state(Z_leaf, noise.start)
        anchor = gen.anchor(Z_leaf, z_T)
        # Decoder first (its own graph, freed before the chain's).
        z_0 = latents[-1].detach().requires_grad_()
        (grad_z,) = torch.autograd.grad(gen.to_images(z_0), z_0, grad_images)
        grad_c = torch.zeros_like(c)
        anchor_in = None if anchor is None else anchor.detach().requires_grad_()
        grad_anchor = None if anchor is None else torch.zeros_like(anchor)
        for j in reversed(range(gen.steps)):
            z_in = latents[j].detach().requires_grad_()
            c_in = c_leaf.detach().requires_grad_()
            z_out = gen.step(j, z_in, c_in, anchor_in, noise.steps)
            inputs = (z_in, c_in) if anchor_in is None else (z_in, c_in, anchor_in)
            grads = torch.autograd.grad(z_out, inputs, grad_z)
            grad_z, grad_c = grads[0], grad_c + grads[1]
            if anchor_in is not None:
                grad_anchor = grad_anchor + grads[2]
        # Back through q_sample and the anchor into Z in one autograd call.
        outputs, grads = [z_T], [grad_z]
        if anchor is not None:
            outputs.append(anchor)
            grads.append(grad_anchor)
        (grad_Z,) = torch.autograd.grad(outputs, Z_leaf, grads)
    return grad_Z, grad_c
