"""The LD3M chain: learnable latents Z and class embeddings c -> images, differentiably.

    z_T      = sqrt(abar_tmax) * Z + sqrt(1 - abar_tmax) * n          (n: explicit start noise)
    for k = T-1 ... 0 (timesteps t_k = 1 + k * (1000 // T), visited from the largest):
        eps  = eps_null + g * (eps(z_t, t_k, c) - eps_null)         (classifier-free guidance)
        z    = ld3m_step(z, eps, anchor, a_t, a_prev, w_k, skip)    (see ld3m_fast.ops)
    image    = normalise(decode(z_0))

`skip="x0"` (the released code, default): anchor = quantize(Z), w_k = k / (T - 1).
`skip="mean"` (the paper's Eq. 7): anchor = z_T, w_k = (k + 1) / T.
`skip=None`: plain DDIM.
`spacing="released"` and `clamp=True` reproduce the released code's timestep list and its
clamp of decoded images (`--released-compat`, docs/released_compat.md).

Three ways to get gradients (same values, different cost), `grad_mode`:
- "autograd": one graph through all T steps and the decoder (memory grows with T);
- "released": the released code's scheme: render without grad, then in backward
  re-render each chunk of images with autograd and a checkpoint around every
  denoiser call (3 denoiser forwards + 1 backward per step). With
  `checkpoint_attention=True` the denoiser's transformer blocks are also checkpointed
  inside, as the released UNet's `checkpoint=True` does: they run a 4th forward;
- "recompute" (default): render without grad keeping only the per-step latents
  z_t, then in backward walk the chain from the last step to the first,
  recomputing one step at a time with grad (2 forwards + 1 backward per step;
  memory independent of T). At guidance != 1 the backward holds the conditional and
  the null call's graphs one after the other (B images each, not 2B).

Between recompute and one whole graph, "recompute" has two knobs the planner sets
(`ld3m_fast.distill.planner.plan`):
- `store_steps=k`: the last k steps of the chain keep state from the render pass
  instead of being recomputed from scratch; `sac_min_flops` says what they keep:
  None = their whole graph (1 forward + 1 backward per step), N = only the outputs
  of the ops doing at least N FLOPs per output element (convolutions, matmuls,
  attention), through `torch.utils.checkpoint`'s selective activation checkpointing;
  backward recomputes the rest (pointwise ops, norms, the cheaper matmuls). What is
  kept stays live from the render pass to the backward pass for every image, so it
  grows with T x images: that is the memory the planner trades for FLOPs.
- `decoder_chunk`: images per decoder call, in the render pass and in backward
  (the decoder's backward of 10 images at 256² is larger than a UNet step's).
All settings give the same images and gradients (tests/test_generator.py).
"""
from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from . import ops
from .choices import GRAD_MODES, SPACINGS
from .normalization import from_autoencoder, normalize_unit
from .priors.prior import Prior
from .reference.ld3m_step import check_skip


aten = torch.ops.aten
_ATTENTION_OPS = tuple(getattr(aten, name) for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    if hasattr(aten, name))


def flops_per_output_element(func, args) -> float:
    """FLOPs an aten op spends per element of its output: 2 x its contraction length for
    convolutions and matmuls, ~4 x the key length for attention, 0 for everything else.

    Ranking ops by this ranks them by FLOPs saved per byte kept, which is what selective
    activation checkpointing trades (`LD3MGenerator(sac_min_flops=...)`).
    """
    packet = getattr(func, "_overloadpacket", func)
    if packet is aten.convolution:
        weight, stride, transposed, groups = args[1], args[3], args[6], args[8]
        kernel = math.prod(weight.shape[2:])
        if transposed:  # each output gathers in_channels x kernel / stride taps
            return 2.0 * weight.shape[0] / groups * kernel / max(1, math.prod(stride))
        return 2.0 * weight.shape[1] * kernel
    if packet in (aten.mm, aten.bmm):
        return 2.0 * args[0].shape[-1]
    if packet in (aten.addmm, aten.baddbmm):
        return 2.0 * args[1].shape[-1]
    if packet in _ATTENTION_OPS:
        query, key, value = args[:3]
        return 2.0 * key.shape[-2] * (query.shape[-1] + value.shape[-1]) / value.shape[-1]
    return 0.0


def _sac_policy(min_flops: float):
    """Keep the outputs of ops worth at least `min_flops` FLOPs per element; recompute the rest."""
    def policy(ctx, func, *args, **kwargs):
        flops = flops_per_output_element(func, args)
        if flops > 0 and flops >= min_flops:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE
    return policy


def _transformer_models(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The diffusers `Transformer2DModel`s inside a denoiser (the CompVis SpatialTransformers,
    whose BasicTransformerBlocks the released UNet checkpoints with `checkpoint=True`)."""
    return [m for m in model.modules()
            if type(m).__name__ == "Transformer2DModel" and hasattr(m, "gradient_checkpointing")]


def _checkpoint_module(module, *args):
    return checkpoint(module.__call__, *args, use_reentrant=False)


@contextmanager
def _checkpointed_transformer_blocks(modules: list[torch.nn.Module]):
    """Checkpoint every transformer block of `modules` while inside (diffusers honours the
    flag only when grad is enabled); the previous settings come back afterwards."""
    saved = [(m.gradient_checkpointing, getattr(m, "_gradient_checkpointing_func", None)) for m in modules]
    for m in modules:
        m.gradient_checkpointing = True
        m._gradient_checkpointing_func = _checkpoint_module
    try:
        yield
    finally:
        for m, (flag, func) in zip(modules, saved):
            m.gradient_checkpointing = flag
            if func is None:
                del m._gradient_checkpointing_func
            else:
                m._gradient_checkpointing_func = func


def pieces(count: int, size: int | None) -> list[slice]:
    """Slices covering range(count) in pieces of `size` (None: one piece)."""
    size = count if not size else int(size)
    return [slice(i, min(i + size, count)) for i in range(0, count, size)]


def render_size(prior: Prior, res: int, *, released: bool = False) -> int:
    """Side the chain renders at for output side `res`: `res` up to the prior's native size,
    the native size above it (a denoiser never saw latents larger than its training size).

    released=True: `res` at every size, as the released code does (its latents are the encoded
    `res`-sized images, and `sampler.sample`'s `shape=[3, 64, 64]` is ignored when `x_T` is given;
    docs/released_compat.md)."""
    return int(res) if released else min(int(res), prior.image_size)


def released_timesteps(num_train: int, steps: int) -> tuple[int, ...]:
    """The released sampler's ascending DDIM timesteps for `--ddim_steps` T: range(0, N, N // T)
    shifted by 1, which has T' > T entries when N // T does not divide N (T=6 runs 7 steps).

    The T where the released code fails are refused with one line naming the failure and the
    nearest T that runs: T=1 (a division by zero in its skip weight index / (T' - 1)), T > N
    (range step 0) and every T whose last timestep is N (an index error past abar[N - 1]:
    T = 3, 9, 27, 36, 37, 101..111, 251..333, 501..1000 for N = 1000).
    """
    def failure(t: int) -> str | None:
        if t == 1:
            return "a division by zero in its skip weight index / (T' - 1)"
        if t > num_train:
            return f"range(0, {num_train}, {num_train} // {t}) has step 0"
        if range(0, num_train, num_train // t)[-1] + 1 >= num_train:
            return (f"its timesteps range(0, {num_train}, {num_train // t}) + 1 reach {num_train}, "
                    f"an index error past the schedule's {num_train} entries")
        return None

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    why = failure(steps)
    if why is not None:
        from .errors import LD3MError

        near = [t for t in range(1, num_train + 1) if failure(t) is None]
        below = max((t for t in near if t < steps), default=None)
        above = min((t for t in near if t > steps), default=None)
        advice = " or ".join(str(t) for t in (below, above) if t is not None)
        raise LD3MError(f"--released-compat: the released sampler fails at --steps {steps} ({why}); "
                        f"use --steps {advice}")
    return tuple(t + 1 for t in range(0, num_train, num_train // steps))


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
              skip: str | None = "x0", spacing: str = "exact") -> "ChainSchedule":
        """Released-code DDIM timesteps: stride c = N // T, offset 1: {1, 1+c, ..., 1+(T-1)c}.

        spacing="exact" (default): exactly these T steps. spacing="released": the released
        list `range(0, N, c) + 1` itself (`released_timesteps`), which has T' > T entries
        when c does not divide N and fails at some T (refused). The skip weights
        w_k = k / (T' - 1) run over the T' steps the chain takes. a_prev of the last step
        is abar[0], not 1, as released.
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        check_skip(skip)
        abar = alphas_cumprod.to(torch.float64).tolist()
        stride = len(abar) // steps
        if spacing == "released":
            ascending = released_timesteps(len(abar), steps)
            steps = len(ascending)
        else:
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
        decoder_chunk: "recompute" only: images per decoder call, in the render pass
            and in backward, independent of `chunk_size` (None = the whole chain chunk).
        store_steps: "recompute" only: the last k steps (0..T) keep state from the
            render pass instead of being recomputed from scratch (0 = pure recompute).
        sac_min_flops: what a stored step keeps: None = its whole graph; N = only the
            outputs of ops doing >= N FLOPs per output element
            (`flops_per_output_element`), the rest is recomputed in backward.
        checkpoint_attention: checkpoint the denoiser's transformer blocks inside every
            call made with grad, as the released UNet does (`checkpoint=True` in its
            BasicTransformerBlocks); used to model the released scheme faithfully.
        spacing: "exact" (default): exactly `steps` DDIM steps; "released": the released
            timestep list, T' >= T steps (`released_timesteps`; `gen.steps` is T').
        clamp: False (default): decoded images go to the shared normalisation unclamped;
            True: the released order: resize in the decoder's range (when `output_size`
            differs), map to [0, 1], clamp there (zero gradient for pixels outside), normalise.
    """

    def __init__(self, prior: Prior, steps: int = 10, *, guidance: float = 3.0,
                 skip: str | None = "x0", eta: float = 0.0, grad_mode: str = "recompute",
                 chunk_size: int | None = None, output_size: int | None = None,
                 render_size: int | None = None, decoder_chunk: int | None = None,
                 store_steps: int = 0, sac_min_flops: float | None = None,
                 checkpoint_attention: bool = False, spacing: str = "exact", clamp: bool = False):
        super().__init__()
        if grad_mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        if decoder_chunk is not None and decoder_chunk < 1:
            raise ValueError(f"decoder_chunk must be >= 1 or None, got {decoder_chunk}")
        if not 0 <= int(store_steps) <= int(steps):
            raise ValueError(f"store_steps must be in 0..{steps} (the chain's steps), got {store_steps}")
        if sac_min_flops is not None and sac_min_flops < 0:
            raise ValueError(f"sac_min_flops must be >= 0 or None, got {sac_min_flops}")
        if grad_mode != "recompute" and (store_steps or decoder_chunk is not None):
            raise ValueError(f"store_steps and decoder_chunk belong to grad_mode 'recompute', "
                             f"not {grad_mode!r}")
        self.prior = prior
        self.skip = check_skip(skip)
        self.guidance = float(guidance)
        self.eta = float(eta)
        self.grad_mode = grad_mode
        self.chunk_size = chunk_size
        self.decoder_chunk = decoder_chunk
        self.store_steps = int(store_steps)
        self.sac_min_flops = sac_min_flops
        self.checkpoint_attention = bool(checkpoint_attention)
        self._transformers = _transformer_models(prior.denoiser) if checkpoint_attention else []
        self.output_size = output_size
        self.clamp = bool(clamp)
        self.latent_shape = prior.latent_shape(render_size)
        self.schedule = ChainSchedule.build(prior.alphas_cumprod, steps, eta=eta, skip=skip, spacing=spacing)

    @property
    def steps(self) -> int:
        return len(self.schedule)

    def describe(self) -> dict:
        """What this generator computes and how (plain values): the chain, its gradient mode and
        chunking, sizes. Two generators with equal descriptions run the same iteration."""
        s = self.schedule
        return {"steps": self.steps, "timesteps": list(s.timesteps), "skip": self.skip,
                "skip_weights": list(s.skip_weight), "guidance": self.guidance, "eta": self.eta,
                "per_step_noise": any(x > 0 for x in s.sigma), "grad_mode": self.grad_mode,
                "chunk_size": self.chunk_size, "decoder_chunk": self.decoder_chunk,
                "store_steps": self.store_steps, "sac_min_flops": self.sac_min_flops,
                "checkpoint_attention": self.checkpoint_attention, "clamp": self.clamp,
                "latent_shape": list(self.latent_shape), "output_size": self.output_size}

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
            return self.denoise(z_t, timestep, c), None
        eps = self.denoise(torch.cat([z_t, z_t]), torch.cat([timestep, timestep]),
                           torch.cat([c, self.null_like(c)]))
        eps_cond, eps_uncond = eps.chunk(2)
        return eps_cond, eps_uncond

    def null_like(self, c: torch.Tensor) -> torch.Tensor:
        return self.prior.class_table[self.prior.null_index].to(c.dtype).expand_as(c)

    def denoise(self, z_t, timestep, cond):
        """One denoiser call (its transformer blocks checkpointed inside when
        `checkpoint_attention` is set and grad is enabled)."""
        if self._transformers and torch.is_grad_enabled():
            with _checkpointed_transformer_blocks(self._transformers):
                return self.prior.eps(z_t, timestep, cond)
        return self.prior.eps(z_t, timestep, cond)

    def checkpointed_guided_eps(self, z_t, t: int, c):
        """`guided_eps` under a checkpoint: nothing kept for backward, recomputed there (released)."""
        return checkpoint(self.guided_eps, z_t, t, c, use_reentrant=False)

    def selective_denoise(self, z_t, timestep, cond):
        """`denoise` under selective activation checkpointing: only the outputs of the ops doing
        >= `sac_min_flops` FLOPs per output element are kept; backward recomputes the rest."""
        contexts = functools.partial(create_selective_checkpoint_contexts, _sac_policy(self.sac_min_flops))
        return checkpoint(self.denoise, z_t, timestep, cond, use_reentrant=False, context_fn=contexts)

    def step(self, j: int, z_t, c, anchor, step_noise=None, *, checkpointed: bool = False):
        """Visit step j (0 = largest timestep): denoiser call(s) + fused LD3M update."""
        s = self.schedule
        if checkpointed:
            eps_cond, eps_uncond = self.checkpointed_guided_eps(z_t, s.timesteps[j], c)
        else:
            eps_cond, eps_uncond = self.guided_eps(z_t, s.timesteps[j], c)
        return self.update(j, z_t, eps_cond, eps_uncond, anchor, step_noise)

    def update(self, j: int, z_t, eps_cond, eps_uncond, anchor, step_noise=None):
        """The fused LD3M update of step j from the denoiser's answers."""
        s = self.schedule
        # The chain state stays in Z's dtype; under autocast the denoiser may answer in bf16.
        eps_cond, eps_uncond, anchor = (None if x is None else x.to(z_t.dtype)
                                        for x in (eps_cond, eps_uncond, anchor))
        return ops.ld3m_step(
            z_t, eps_cond, anchor, a_t=s.a_t[j], a_prev=s.a_prev[j],
            skip_weight=s.skip_weight[j], skip=self.skip, eps_uncond=eps_uncond,
            guidance=self.guidance, sigma=s.sigma[j],
            noise=None if s.sigma[j] == 0.0 else step_noise[j])

    def step_gradient(self, j: int, z_t, c, anchor, step_noise, grad_out):
        """(dz_t, dc, danchor or None) of step j for the upstream gradient `grad_out`,
        recomputing the step with grad (called with grad enabled).

        At guidance != 1 the conditional and the null denoiser calls are back-propagated one
        after the other, each holding the graph of B images instead of 2B (the same FLOPs):
        the fused update is linear in eps_cond, eps_uncond, z_t and the anchor, so its
        vector-Jacobian product needs no eps values (zeros stand in for them) and comes first.
        """
        z_in = z_t.detach().requires_grad_()
        c_in = c.detach().requires_grad_()
        anchor_in = None if anchor is None else anchor.detach().requires_grad_()
        tail = () if anchor_in is None else (anchor_in,)
        if self.guidance == 1.0:
            grads = _grads_or_zeros(self.step(j, z_in, c_in, anchor_in, step_noise), (z_in, c_in) + tail,
                                    grad_out)
            return grads[0], grads[1], grads[2] if tail else None
        eps_cond, eps_uncond = (torch.zeros_like(z_in).requires_grad_() for _ in range(2))
        z_out = self.update(j, z_in, eps_cond, eps_uncond, anchor_in, step_noise)
        grads = _grads_or_zeros(z_out, (z_in, eps_cond, eps_uncond) + tail, grad_out)
        del z_out
        grad_z, grad_cond, grad_null = grads[:3]
        timestep = torch.full((z_in.shape[0],), self.schedule.timesteps[j], device=z_in.device,
                              dtype=torch.long)
        eps = self.denoise(z_in, timestep, c_in).to(z_in.dtype)
        grad_from_cond, grad_c = torch.autograd.grad(eps, (z_in, c_in), grad_cond)
        del eps
        eps = self.denoise(z_in, timestep, self.null_like(c_in)).to(z_in.dtype)
        (grad_from_null,) = torch.autograd.grad(eps, z_in, grad_null)
        return grad_z + grad_from_cond + grad_from_null, grad_c, grads[3] if tail else None

    def stored_step(self, j: int, z_t, c, anchor, step_noise=None):
        """Step j with grad for the stored part of the chain: its whole graph, or under
        selective activation checkpointing (only the costly ops' outputs kept), one
        checkpoint per denoiser call so that backward recomputes B images at a time."""
        if self.sac_min_flops is None:
            return self.step(j, z_t, c, anchor, step_noise)
        timestep = torch.full((z_t.shape[0],), self.schedule.timesteps[j], device=z_t.device,
                              dtype=torch.long)
        eps_cond = self.selective_denoise(z_t, timestep, c)
        eps_uncond = None if self.guidance == 1.0 else self.selective_denoise(z_t, timestep, self.null_like(c))
        return self.update(j, z_t, eps_cond, eps_uncond, anchor, step_noise)

    def to_images(self, z_0: torch.Tensor) -> torch.Tensor:
        """Decode final latents and map them to the shared normalisation (and size);
        with `clamp`, the released order: resize, then clamp to [0, 1], then normalise."""
        decoded = self.prior.decode(z_0)
        if self.clamp:
            return normalize_unit(((self.resize(decoded) + 1.0) * 0.5).clamp(0.0, 1.0))
        return self.resize(from_autoencoder(decoded))

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """Images at `output_size` (antialiased, differentiable bilinear), when it differs."""
        if self.output_size is not None and images.shape[-1] != self.output_size:
            images = F.interpolate(images, size=(self.output_size, self.output_size),
                                   mode="bilinear", align_corners=False, antialias=True)
        return images

    def decode_pieces(self, z_0: torch.Tensor) -> torch.Tensor:
        """`to_images` in pieces of `decoder_chunk` images (one call when None)."""
        parts = pieces(z_0.shape[0], self.decoder_chunk)
        if len(parts) == 1:
            return self.to_images(z_0)
        return torch.cat([self.to_images(z_0[p]) for p in parts])

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
        images = self.decode_pieces(z)
        return (images, torch.stack(latents)) if keep_latents else images

    def render_for_backward(self, Z, c, noise: ChainNoise):
        """The render pass of "recompute" on one chunk (called without grad).

        Steps 0..T-k-1 run without grad; the last k = `store_steps` run with grad from
        detached leaves, keeping their graph (or selected op outputs) for backward.
        Returns (images, latents (T+1, B, C, h, w), stored) with stored None or
        (z_0 with its graph, (z_{T-k}, c, anchor) leaves).
        """
        z = self.start_state(Z, noise.start)
        anchor = self.anchor(Z, z)
        latents = [z]
        first_stored = self.steps - self.store_steps
        for j in range(first_stored):
            z = self.step(j, z, c, anchor, noise.steps)
            latents.append(z)
        stored = None
        if self.store_steps:
            with torch.enable_grad():
                leaves = (z.detach().requires_grad_(), c.detach().requires_grad_(),
                          None if anchor is None else anchor.detach().requires_grad_())
                # Views, not the leaves themselves: autocast caches its casts of leaves that
                # require grad, so a checkpoint's recompute would see fewer casts than its
                # forward did and selective checkpointing would refuse the mismatch.
                z, c_used = leaves[0].view_as(leaves[0]), leaves[1].view_as(leaves[1])
                for j in range(first_stored, self.steps):
                    z = self.stored_step(j, z, c_used, leaves[2], noise.steps)
                    latents.append(z.detach())
            stored, z = (z, leaves), z.detach()
        return self.decode_pieces(z), torch.stack(latents), stored

    # --------------------------------------------------------------- forward
    def chunks(self, batch: int):
        return pieces(batch, self.chunk_size)

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
    """Render without grad keeping z_T..z_0 (and the stored steps' state); backward
    recomputes one step at a time below the stored ones."""

    @staticmethod
    def forward(ctx, gen: LD3MGenerator, Z, c, start_noise, step_noise):
        noise = ChainNoise(start_noise, step_noise)
        images, latents, stored = [], [], []
        for s in gen.chunks(Z.shape[0]):
            chunk_images, chunk_latents, chunk_stored = gen.render_for_backward(Z[s], c[s], noise.select(s))
            images.append(chunk_images)
            latents.append(chunk_latents)
            stored.append(chunk_stored)
        ctx.gen = gen
        ctx.autocast = _autocast_state(Z.device.type)
        # Graphs of the stored steps: held as attributes (they are no inputs or outputs
        # of this function) and dropped chunk by chunk as backward consumes them.
        ctx.stored = stored
        ctx.save_for_backward(Z, c, start_noise, step_noise, torch.cat(latents, dim=1))
        return torch.cat(images)

    @staticmethod
    def backward(ctx, grad_images):
        gen = ctx.gen
        Z, c, start_noise, step_noise, latents = ctx.saved_tensors
        stored, ctx.stored = ctx.stored, None
        grad_Z, grad_c = torch.zeros_like(Z), torch.zeros_like(c)
        with _autocast(ctx.autocast):
            for i, s in enumerate(gen.chunks(Z.shape[0])):
                box, stored[i] = [stored[i]], None  # the callee takes the only reference
                grad_Z[s], grad_c[s] = _recompute_chunk(
                    gen, Z[s], c[s], ChainNoise(start_noise, step_noise).select(s),
                    latents[:, s], grad_images[s], box)
        return None, grad_Z, grad_c, None, None


def _decoder_gradient(gen: LD3MGenerator, z_0: torch.Tensor, grad_images: torch.Tensor) -> torch.Tensor:
    """dL/dz_0, re-running the decoder with grad in pieces of `decoder_chunk` images."""
    grads = []
    for p in pieces(z_0.shape[0], gen.decoder_chunk):
        z = z_0[p].detach().requires_grad_()
        grads.append(torch.autograd.grad(gen.to_images(z), z, grad_images[p])[0])
    return grads[0] if len(grads) == 1 else torch.cat(grads)


def _grads_or_zeros(outputs, inputs, grad_outputs):
    """torch.autograd.grad with zeros for inputs the graph does not use."""
    grads = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


def _recompute_chunk(gen: LD3MGenerator, Z, c, noise: ChainNoise, latents, grad_images, box=None):
    """Gradients (dZ, dc) of one chunk, holding one step's graph at a time (below the stored steps).

    box: None or [stored] from `render_for_backward`; emptied here so that the stored
    state is freed as soon as it has been back-propagated.
    """
    Z_leaf = Z.detach().requires_grad_()
    c_leaf = c.detach().requires_grad_()
    with torch.enable_grad():
        z_T = gen.start_state(Z_leaf, noise.start)
        anchor = gen.anchor(Z_leaf, z_T)
        # Decoder first (its own graph, in pieces, freed before the chain's).
        grad_z = _decoder_gradient(gen, latents[-1], grad_images)
        grad_c = torch.zeros_like(c)
        grad_anchor = None if anchor is None else torch.zeros_like(anchor)
        recompute_below = gen.steps
        stored = box.pop() if box else None
        if stored is not None:
            # The last k steps: back through what the render pass kept (its graph, or
            # the selected op outputs, with the rest recomputed by checkpoint).
            z_0, leaves = stored
            del stored
            inputs = tuple(x for x in leaves if x is not None)
            grads = _grads_or_zeros(z_0, inputs, grad_z)
            del z_0, leaves, inputs
            grad_z, grad_c = grads[0], grad_c + grads[1]
            if grad_anchor is not None:
                grad_anchor = grad_anchor + grads[2]
            recompute_below = gen.steps - gen.store_steps
        anchor_in = None if anchor is None else anchor.detach()
        for j in reversed(range(recompute_below)):
            grad_z, step_c, step_anchor = gen.step_gradient(j, latents[j], c_leaf, anchor_in,
                                                            noise.steps, grad_z)
            grad_c = grad_c + step_c
            if step_anchor is not None:
                grad_anchor = grad_anchor + step_anchor
        # Back through q_sample and the anchor into Z in one autograd call.
        outputs, grads = [z_T], [grad_z]
        if anchor is not None:
            outputs.append(anchor)
            grads.append(grad_anchor)
        (grad_Z,) = torch.autograd.grad(outputs, Z_leaf, grads)
    return grad_Z, grad_c
