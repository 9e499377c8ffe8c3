"""ld3m_step: one reverse step of the LD3M chain, fused (launchers, registration, autograd).

Layers: `kernels/ld3m_step.py` (Triton) and `csrc/ld3m_step.cpp` (C++) hold the device
code; this module folds the scalars into per-input coefficients, launches the backend the
dispatcher picked (see `_backend.py`), and registers `ld3m_fast::ld3m_step` and its
backward `ld3m_fast::ld3m_step_backward` with torch.library (fake tensors + autograd),
so `torch.compile(fullgraph=True)` traces through them. The scalars stay float
arguments of the op: a new a_t never recompiles a kernel.

The math is `ld3m_fast.reference.ld3m_step_ref`'s. Because z_prev is affine in every
tensor input, the step is z_prev = sum_k c_k * input_k with c_k from `step_coefficients`
(float64, host), and its backward is grad_k = c_k * grad.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import LD3MError
from ..reference.ld3m_step import SKIP_MODES, ld3m_step_ref
from . import _backend, _native

# Elements per Triton program: 1024 fp32 = 4 KiB per input, enough to saturate
# memory bandwidth at 4 warps, and a power of two as tl.arange requires.
_TRITON_BLOCK = 1024

# Order of the tensor inputs everywhere below (coefficients, gradients).
_INPUT_NAMES = ("z_t", "eps_cond", "eps_uncond", "anchor", "noise")


def _skip_code(skip: str | None) -> str:
    if skip not in SKIP_MODES:
        raise LD3MError(f"skip must be 'x0', 'mean' or None, got {skip!r}")
    return "none" if skip is None else skip


def step_coefficients(a_t: float, a_prev: float, skip_weight: float, skip: str, guidance: float,
                      sigma: float, has_uncond: bool) -> tuple[float, float, float, float, float]:
    """Coefficients (c_z, c_cond, c_uncond, c_anchor, c_noise) with z_prev = sum c_k * input_k.

    Derived from `ld3m_step_ref` (`skip` is 'x0', 'mean' or 'none'):
        x0 = z / sqrt(a_t) - sqrt(1 - a_t) / sqrt(a_t) * eps,   dir = sqrt(1 - a_prev - sigma^2) * eps
        x0:   z_prev = sqrt(a_prev) ((1 - w) x0 + w anchor) + dir
        mean: z_prev = (1 - w) (sqrt(a_prev) x0 + dir) + w anchor
        none: z_prev = sqrt(a_prev) x0 + dir
        eps = guidance eps_cond + (1 - guidance) eps_uncond  (eps_cond without eps_uncond)
    """
    sqrt_a_t, sqrt_a_prev = math.sqrt(a_t), math.sqrt(a_prev)
    x0_per_z = 1.0 / sqrt_a_t
    x0_per_eps = -math.sqrt(1.0 - a_t) / sqrt_a_t
    dir_per_eps = math.sqrt(max(1.0 - a_prev - sigma * sigma, 0.0))
    w = skip_weight
    if skip == "x0":
        c_z = sqrt_a_prev * (1.0 - w) * x0_per_z
        c_eps = sqrt_a_prev * (1.0 - w) * x0_per_eps + dir_per_eps
        c_anchor = sqrt_a_prev * w
    elif skip == "mean":
        c_z = (1.0 - w) * sqrt_a_prev * x0_per_z
        c_eps = (1.0 - w) * (sqrt_a_prev * x0_per_eps + dir_per_eps)
        c_anchor = w
    else:
        c_z = sqrt_a_prev * x0_per_z
        c_eps = sqrt_a_prev * x0_per_eps + dir_per_eps
        c_anchor = 0.0
    if has_uncond:
        c_cond, c_uncond = guidance * c_eps, (1.0 - guidance) * c_eps
    else:
        c_cond, c_uncond = c_eps, 0.0
    return c_z, c_cond, c_uncond, c_anchor, sigma


def _present_inputs(eps_uncond, anchor, noise, skip: str, sigma: float) -> tuple[bool, ...]:
    """Which of the five inputs enter z_prev (an anchor without skip, or noise at sigma 0, do not)."""
    return (True, True, eps_uncond is not None, anchor is not None and skip != "none",
            noise is not None and sigma != 0.0)


def _match_layout(tensor: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`tensor` with `out`'s strides, copied only when they differ.

    The kernels walk dense storage as one flat array, so every operand must share the
    output's layout. Same-layout inputs (contiguous or channels_last) run without a copy;
    anything else (a strided slice, an expanded gradient) is copied once into that layout.
    """
    if tensor.stride() == out.stride():
        return tensor
    aligned = torch.empty_like(out, dtype=tensor.dtype)
    aligned.copy_(tensor)
    return aligned


# ---------------------------------------------------------------- forward backends

def _forward_reference(z_t, eps_cond, anchor, eps_uncond, noise, a_t, a_prev, skip_weight, skip,
                       guidance, sigma):
    out = ld3m_step_ref(z_t, eps_cond, anchor if skip != "none" else None, a_t=a_t, a_prev=a_prev,
                        skip_weight=skip_weight, skip=None if skip == "none" else skip,
                        eps_uncond=eps_uncond, guidance=guidance, sigma=sigma,
                        noise=noise if sigma != 0.0 else None, upcast=True)
    result = torch.empty_like(z_t)
    result.copy_(out)  # same layout as the fake (empty_like(z_t))
    return result


def _forward_operands(z_t, eps_cond, anchor, eps_uncond, noise, coefficients, present):
    """(out, aligned inputs, their coefficients) for the inputs that enter z_prev."""
    out = torch.empty_like(z_t)
    tensors = (z_t, eps_cond, eps_uncond, anchor, noise)
    inputs = [_match_layout(t, out) for t, used in zip(tensors, present) if used]
    used_coefficients = [c for c, used in zip(coefficients, present) if used]
    return out, inputs, used_coefficients


def _forward_cpp(z_t, eps_cond, anchor, eps_uncond, noise, coefficients, present):
    out, inputs, used_coefficients = _forward_operands(z_t, eps_cond, anchor, eps_uncond, noise,
                                                       coefficients, present)
    if out.numel():
        _native.get_extension().ld3m_step_forward(inputs, used_coefficients, out)
    return out


def _forward_triton(z_t, eps_cond, anchor, eps_uncond, noise, coefficients, present):
    out = torch.empty_like(z_t)
    aligned = [_match_layout(t, out) if used else out
               for t, used in zip((z_t, eps_cond, eps_uncond, anchor, noise), present)]
    n = out.numel()
    if n:
        kernels = _backend.load_kernels("ld3m_step")
        grid = ((n + _TRITON_BLOCK - 1) // _TRITON_BLOCK,)
        kernels._ld3m_step_fwd_kernel[grid](
            *aligned, out, *[float(c) for c in coefficients], n,
            HAS_UNCOND=present[2], HAS_ANCHOR=present[3], HAS_NOISE=present[4], BLOCK=_TRITON_BLOCK)
    return out


def _run_forward(device_type, z_t, eps_cond, anchor, eps_uncond, noise, a_t, a_prev, skip_weight,
                 skip, guidance, sigma):
    backend = _backend.choose("ld3m_step", device_type, z_t.dtype)
    if backend == "reference":
        return _forward_reference(z_t, eps_cond, anchor, eps_uncond, noise, a_t, a_prev,
                                  skip_weight, skip, guidance, sigma)
    coefficients = step_coefficients(a_t, a_prev, skip_weight, skip, guidance, sigma,
                                     eps_uncond is not None)
    present = _present_inputs(eps_uncond, anchor, noise, skip, sigma)
    launch = _forward_cpp if backend == "cpp" else _forward_triton
    return launch(z_t, eps_cond, anchor, eps_uncond, noise, coefficients, present)


# ---------------------------------------------------------------- the registered ops

@torch.library.custom_op("ld3m_fast::ld3m_step", mutates_args=())
def _ld3m_step_op(z_t: torch.Tensor, eps_cond: torch.Tensor, anchor: torch.Tensor | None,
                  eps_uncond: torch.Tensor | None, noise: torch.Tensor | None, a_t: float,
                  a_prev: float, skip_weight: float, skip: str, guidance: float,
                  sigma: float) -> torch.Tensor:
    """Devices without a kernel: the reference."""
    return _forward_reference(z_t, eps_cond, anchor, eps_uncond, noise, a_t, a_prev, skip_weight,
                              skip, guidance, sigma)


@_ld3m_step_op.register_kernel("cpu")
def _ld3m_step_cpu(z_t, eps_cond, anchor, eps_uncond, noise, a_t, a_prev, skip_weight, skip,
                   guidance, sigma):
    return _run_forward("cpu", z_t, eps_cond, anchor, eps_uncond, noise, a_t, a_prev, skip_weight,
                        skip, guidance, sigma)


@_ld3m_step_op.register_kernel("cuda")
def _ld3m_step_cuda(z_t, eps_cond, anchor, eps_uncond, noise, a_t, a_prev, skip_weight, skip,
                    guidance, sigma):
    return _run_forward("cuda", z_t, eps_cond, anchor, eps_uncond, noise, a_t, a_prev, skip_weight,
                        skip, guidance, sigma)


@_ld3m_step_op.register_fake
def _ld3m_step_fake(z_t, eps_cond, anchor, eps_uncond, noise, a_t, a_prev, skip_weight, skip,
                    guidance, sigma):
    return torch.empty_like(z_t)


def _backward_outputs(grad: torch.Tensor, count: int) -> list[torch.Tensor]:
    return [torch.empty_like(grad) for _ in range(count)]


def _run_backward(device_type: str, grad: torch.Tensor, coefficients: Sequence[float]):
    outs = _backward_outputs(grad, len(coefficients))
    if not outs or grad.numel() == 0:
        return outs
    backend = _backend.choose("ld3m_step", device_type, grad.dtype)
    aligned = _match_layout(grad, outs[0])
    if backend == "reference":
        work = torch.float64 if grad.dtype == torch.float64 else torch.float32
        for out, coefficient in zip(outs, coefficients):
            out.copy_(aligned.to(work) * coefficient)
    elif backend == "cpp":
        _native.get_extension().ld3m_step_backward(aligned, [float(c) for c in coefficients], outs)
    else:
        kernels = _backend.load_kernels("ld3m_step")
        n = grad.numel()
        padded_outs = outs + [outs[0]] * (5 - len(outs))  # unused slots are never written
        padded_coefficients = [float(c) for c in coefficients] + [0.0] * (5 - len(coefficients))
        grid = ((n + _TRITON_BLOCK - 1) // _TRITON_BLOCK,)
        kernels._ld3m_step_bwd_kernel[grid](aligned, *padded_outs, *padded_coefficients, n,
                                            N_OUT=len(outs), BLOCK=_TRITON_BLOCK)
    return outs


@torch.library.custom_op("ld3m_fast::ld3m_step_backward", mutates_args=())
def _ld3m_step_backward_op(grad: torch.Tensor, coefficients: Sequence[float]) -> list[torch.Tensor]:
    """[c * grad for c in coefficients], grad read once (devices without a kernel: plain torch)."""
    work = torch.float64 if grad.dtype == torch.float64 else torch.float32
    return [(grad.to(work) * c).to(grad.dtype) for c in coefficients]


@_ld3m_step_backward_op.register_kernel("cpu")
def _ld3m_step_backward_cpu(grad, coefficients):
    return _run_backward("cpu", grad, coefficients)


@_ld3m_step_backward_op.register_kernel("cuda")
def _ld3m_step_backward_cuda(grad, coefficients):
    return _run_backward("cuda", grad, coefficients)


@_ld3m_step_backward_op.register_fake
def _ld3m_step_backward_fake(grad, coefficients):
    return _backward_outputs(grad, len(coefficients))


def _setup_context(ctx, inputs, output):
    z_t, eps_cond, anchor, eps_uncond, noise, a_t, a_prev, skip_weight, skip, guidance, sigma = inputs
    ctx.coefficients = step_coefficients(a_t, a_prev, skip_weight, skip, guidance, sigma,
                                         eps_uncond is not None)
    ctx.present = _present_inputs(eps_uncond, anchor, noise, skip, sigma)


# Position of each tensor input in the op's argument list, in _INPUT_NAMES order.
_ARG_POSITION = (0, 1, 3, 2, 4)


def _backward(ctx, grad):
    wanted = [k for k in range(5) if ctx.present[k] and ctx.needs_input_grad[_ARG_POSITION[k]]]
    grads = [None] * 11
    if wanted:
        computed = torch.ops.ld3m_fast.ld3m_step_backward(grad, [ctx.coefficients[k] for k in wanted])
        for k, value in zip(wanted, computed):
            grads[_ARG_POSITION[k]] = value
    return tuple(grads)


_ld3m_step_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- public entry point

def _check_inputs(z_t, eps_cond, anchor, eps_uncond, noise, a_t, a_prev, skip, sigma) -> None:
    named = {"z_t": z_t, "eps_cond": eps_cond, "anchor": anchor, "eps_uncond": eps_uncond, "noise": noise}
    for name, tensor in named.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise LD3MError(f"ld3m_step: {name} must be a floating-point tensor")
        if tensor.shape != z_t.shape or tensor.dtype != z_t.dtype or tensor.device != z_t.device:
            raise LD3MError(f"ld3m_step: {name} is {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}; "
                            f"every input must match z_t ({tuple(z_t.shape)} {z_t.dtype} on {z_t.device})")
    if skip != "none" and anchor is None:
        raise LD3MError(f"ld3m_step: skip={skip!r} needs an anchor tensor (pass skip=None for plain DDIM)")
    if sigma != 0.0 and noise is None:
        raise LD3MError("ld3m_step: sigma > 0 needs explicit noise (draw it with a torch.Generator)")
    if not (0.0 < a_t <= 1.0 and 0.0 < a_prev <= 1.0):
        raise LD3MError(f"ld3m_step: a_t={a_t} and a_prev={a_prev} must be cumulative alphas in (0, 1]")


def ld3m_step(z_t: torch.Tensor, eps_cond: torch.Tensor, anchor: torch.Tensor | None, *,
              a_t: float, a_prev: float, skip_weight: float, skip: str | None = "x0",
              eps_uncond: torch.Tensor | None = None, guidance: float = 1.0, sigma: float = 0.0,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """One fused LD3M/DDIM reverse step: z_prev from z_t and the denoiser's outputs.

    Shapes: z_t, eps_cond, eps_uncond, anchor, noise are (B, C, H, W) (any shape, all equal),
    one float dtype (float32/float16/bfloat16 in the kernels with float32 math; float64 too).
    `anchor` may be None when `skip` is None, `noise` may be None when `sigma` is 0.
    Math: `ld3m_fast.reference.ld3m_step_ref` (skip 'x0' = the released code's form,
    'mean' = the paper's Eq. 7, None = plain DDIM). Returns z_prev (same shape and dtype,
    z_t's memory layout when it is dense). Differentiable w.r.t. every tensor input.
    """
    skip_code = _skip_code(skip)
    _check_inputs(z_t, eps_cond, anchor, eps_uncond, noise, a_t, a_prev, skip_code, sigma)
    scalars = [_as_float(value) for value in (a_t, a_prev, skip_weight)]
    return torch.ops.ld3m_fast.ld3m_step(z_t, eps_cond, anchor, eps_uncond, noise, *scalars, skip_code,
                                         _as_float(guidance), _as_float(sigma))


def _as_float(value):
    """Python floats pass through; ints and one-element tensors convert.

    Note for torch.compile: a custom op's float argument is specialised (torch 2.13), so a
    compiled function that takes a_t as an *argument* recompiles per distinct value. Keep the
    schedule as constants inside the compiled region (e.g. compile the whole chain loop)."""
    return value if isinstance(value, (float, torch.SymFloat)) else float(value)
