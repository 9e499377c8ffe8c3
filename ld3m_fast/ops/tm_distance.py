"""Trajectory-matching distance and truncated-MTT terms, fused (launchers, registration, autograd).

Device code: `kernels/tm_distance.py` (Triton), `csrc/tm_distance.cpp` (C++); oracles:
`ld3m_fast.reference.tm_distance`. Registered ops:

    ld3m_fast::tm_distance(student, start, target) -> stats (3,) = [loss, N, D]
    ld3m_fast::tm_distance_backward(grad_stats, student, start, target, stats, needs) -> grads
    ld3m_fast::mtt_truncated_terms(start, grad_sum, target, alpha) -> (stats (3,) = [loss, dloss_dalpha, D], v)

with N = ||student - target||^2, D = ||start - target||^2. The stats vector is in float32
(float64 for float64 inputs): sums are accumulated in float32 in fixed-size blocks and the block
partials added in a fixed order, so a result is bit-identical from run to run.

Inputs are read as flat vectors. A non-contiguous input is copied once with `.contiguous()`:
the reductions address elements linearly, and parameter vectors (torch.cat of flattened
tensors) are contiguous in practice, so strided kernels would buy nothing.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import LD3MError
from ..reference.tm_distance import mtt_truncated_terms_ref
from . import _backend, _native

_TRITON_BLOCK = 1024  # elements per program of the reduction / elementwise kernels
_TRITON_CHUNK = 1024  # partials per iteration of the single-program finishing kernel


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(-1)


def _blocks(n: int) -> int:
    return (n + _TRITON_BLOCK - 1) // _TRITON_BLOCK


# ---------------------------------------------------------------- distance: forward

def _distance_reference(student, start, target):
    work = _stats_dtype(student.dtype)
    numerator = (student.to(work) - target.to(work)).pow(2).sum()
    denominator = (start.to(work) - target.to(work)).pow(2).sum()
    return torch.stack([numerator / denominator, numerator, denominator])


def _distance_triton(student, start, target):
    kernels = _backend.load_kernels("tm_distance")
    n, n_blocks = student.numel(), _blocks(student.numel())
    partials = torch.empty((2, n_blocks), dtype=torch.float32, device=student.device)
    stats = torch.empty(3, dtype=torch.float32, device=student.device)
    kernels._tm_distance_partials_kernel[(n_blocks,)](student, start, target, partials, n,
                                                      BLOCK=_TRITON_BLOCK)
    kernels._tm_distance_finish_kernel[(1,)](partials, stats, n_blocks, CHUNK=_TRITON_CHUNK)
    return stats


def _run_distance(device_type, student, start, target):
    backend = _backend.choose("trajectory_matching_distance", device_type, student.dtype)
    if backend == "reference":
        return _distance_reference(student, start, target)
    student, start, target = _flat(student), _flat(start), _flat(target)
    if backend == "cpp":
        return _native.get_extension().tm_distance_forward(student, start, target)
    return _distance_triton(student, start, target)


@torch.library.custom_op("ld3m_fast::tm_distance", mutates_args=())
def _tm_distance_op(student: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Devices without a kernel: the reference."""
    return _distance_reference(student, start, target)


@_tm_distance_op.register_kernel("cpu")
def _tm_distance_cpu(student, start, target):
    return _run_distance("cpu", student, start, target)


@_tm_distance_op.register_kernel("cuda")
def _tm_distance_cuda(student, start, target):
    return _run_distance("cuda", student, start, target)


@_tm_distance_op.register_fake
def _tm_distance_fake(student, start, target):
    return student.new_empty(3, dtype=_stats_dtype(student.dtype))


# ---------------------------------------------------------------- distance: backward

def _grad_coefficients(grad_stats, stats):
    """(coef_student, coef_start) such that g_student = coef_student (student - target) etc.

    With stats = [L = N / D, N, D] and upstream gradients [gL, gN, gD]:
    dN = gL / D + gN, dD = gD - gL N / D^2, coef_student = 2 dN, coef_start = 2 dD.
    """
    g_loss, g_num, g_den = grad_stats.to(stats.dtype).unbind()
    numerator, denominator = stats[1], stats[2]
    coef_student = 2.0 * (g_loss / denominator + g_num)
    coef_start = 2.0 * (g_den - g_loss * numerator / (denominator * denominator))
    return coef_student, coef_start


def _distance_grad_outputs(student, needs):
    return [torch.empty(student.shape, dtype=student.dtype, device=student.device)
            for need in needs if need]


def _run_distance_backward(device_type, grad_stats, student, start, target, stats, needs):
    outs = _distance_grad_outputs(student, needs)
    if not outs:
        return outs
    backend = _backend.choose("trajectory_matching_distance", device_type, student.dtype)
    slots = iter(outs)
    g_student, g_start, g_target = [next(slots) if need else None for need in needs]
    grad_stats = grad_stats.contiguous()
    if backend == "reference":
        coef_student, coef_start = _grad_coefficients(grad_stats, stats)
        work = stats.dtype
        d_student = coef_student * (student.to(work) - target.to(work))
        d_start = coef_start * (start.to(work) - target.to(work))
        for out, value in ((g_student, d_student), (g_start, d_start), (g_target, -(d_student + d_start))):
            if out is not None:
                out.copy_(value)
        return outs
    flat_inputs = (_flat(student), _flat(start), _flat(target))
    flat_outs = [None if out is None else out.view(-1) for out in (g_student, g_start, g_target)]
    if backend == "cpp":
        coef_student, coef_start = (float(c) for c in _grad_coefficients(grad_stats, stats))
        _native.get_extension().tm_distance_backward(*flat_inputs, coef_student, coef_start, *flat_outs)
    else:
        kernels = _backend.load_kernels("tm_distance")
        n = student.numel()
        pointers = [out if out is not None else flat_inputs[0] for out in flat_outs]  # unused: never written
        kernels._tm_distance_bwd_kernel[(_blocks(n),)](
            *flat_inputs, grad_stats, stats.contiguous(), *pointers, n,
            HAS_STUDENT=needs[0], HAS_START=needs[1], HAS_TARGET=needs[2], BLOCK=_TRITON_BLOCK)
    return outs


@torch.library.custom_op("ld3m_fast::tm_distance_backward", mutates_args=())
def _tm_distance_backward_op(grad_stats: torch.Tensor, student: torch.Tensor, start: torch.Tensor,
                             target: torch.Tensor, stats: torch.Tensor,
                             needs: Sequence[bool]) -> list[torch.Tensor]:
    """Gradients w.r.t. (student, start, target), only those flagged in `needs`, in that order."""
    return _run_distance_backward(student.device.type, grad_stats, student, start, target, stats, needs)


@_tm_distance_backward_op.register_kernel("cpu")
def _tm_distance_backward_cpu(grad_stats, student, start, target, stats, needs):
    return _run_distance_backward("cpu", grad_stats, student, start, target, stats, needs)


@_tm_distance_backward_op.register_kernel("cuda")
def _tm_distance_backward_cuda(grad_stats, student, start, target, stats, needs):
    return _run_distance_backward("cuda", grad_stats, student, start, target, stats, needs)


@_tm_distance_backward_op.register_fake
def _tm_distance_backward_fake(grad_stats, student, start, target, stats, needs):
    return _distance_grad_outputs(student, needs)


def _distance_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, output)


def _distance_backward(ctx, grad_stats):
    student, start, target, stats = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    if not any(needs):
        return None, None, None
    slots = iter(torch.ops.ld3m_fast.tm_distance_backward(grad_stats, student, start, target, stats, needs))
    return tuple(next(slots) if need else None for need in needs)


_tm_distance_op.register_autograd(_distance_backward, setup_context=_distance_setup_context)


# ---------------------------------------------------------------- truncated-MTT terms

def _mtt_reference(start, grad_sum, target, alpha):
    loss, v, dloss_dalpha = mtt_truncated_terms_ref(start, grad_sum, target, alpha, upcast=True)
    work = _stats_dtype(start.dtype)
    denominator = (start.to(work) - target.to(work)).pow(2).sum()
    return torch.stack([loss, dloss_dalpha, denominator]), v


def _mtt_triton(start, grad_sum, target, alpha):
    kernels = _backend.load_kernels("tm_distance")
    n, n_blocks = start.numel(), _blocks(start.numel())
    v = torch.empty_like(start)
    partials = torch.empty((3, n_blocks), dtype=torch.float32, device=start.device)
    stats = torch.empty(3, dtype=torch.float32, device=start.device)
    alpha = alpha.to(torch.float32).reshape(1)
    kernels._mtt_partials_kernel[(n_blocks,)](start, grad_sum, target, alpha, v, partials, n,
                                              BLOCK=_TRITON_BLOCK)
    kernels._mtt_finish_kernel[(1,)](partials, stats, n_blocks, CHUNK=_TRITON_CHUNK)
    # Second, elementwise pass: v needs D, which is known only once every block is summed.
    kernels._mtt_scale_kernel[(n_blocks,)](v, alpha, stats, n, BLOCK=_TRITON_BLOCK)
    return stats, v


def _run_mtt(device_type, start, grad_sum, target, alpha):
    backend = _backend.choose("mtt_truncated_terms", device_type, start.dtype)
    if backend == "reference":
        stats, v = _mtt_reference(start, grad_sum, target, alpha)
        return stats, v.reshape(start.shape)
    flat = [_flat(t) for t in (start, grad_sum, target)]
    if backend == "cpp":
        v = torch.empty_like(flat[0])
        stats = _native.get_extension().mtt_truncated_terms(*flat, float(alpha), v)
    else:
        stats, v = _mtt_triton(*flat, alpha)
    return stats, v.view(start.shape)


def _mtt_outputs_like(start):
    stats = start.new_empty(3, dtype=_stats_dtype(start.dtype))
    return stats, torch.empty(start.shape, dtype=start.dtype, device=start.device)


@torch.library.custom_op("ld3m_fast::mtt_truncated_terms", mutates_args=())
def _mtt_op(start: torch.Tensor, grad_sum: torch.Tensor, target: torch.Tensor,
            alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Devices without a kernel: the reference."""
    stats, v = _mtt_reference(start, grad_sum, target, alpha)
    return stats, v.reshape(start.shape).contiguous()


@_mtt_op.register_kernel("cpu")
def _mtt_cpu(start, grad_sum, target, alpha):
    stats, v = _run_mtt("cpu", start, grad_sum, target, alpha)
    return stats, v.contiguous()


@_mtt_op.register_kernel("cuda")
def _mtt_cuda(start, grad_sum, target, alpha):
    stats, v = _run_mtt("cuda", start, grad_sum, target, alpha)
    return stats, v.contiguous()


@_mtt_op.register_fake
def _mtt_fake(start, grad_sum, target, alpha):
    return _mtt_outputs_like(start)


# ---------------------------------------------------------------- public entry points

def _check_vectors(op: str, **named: torch.Tensor) -> torch.Tensor:
    tensors = list(named.values())
    first = tensors[0]
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise LD3MError(f"{op}: {name} must be a floating-point tensor")
        if tensor.shape != first.shape or tensor.dtype != first.dtype or tensor.device != first.device:
            raise LD3MError(f"{op}: {name} is {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}; all "
                            f"inputs must match ({tuple(first.shape)} {first.dtype} on {first.device})")
    if first.numel() == 0:
        raise LD3MError(f"{op}: the parameter vectors are empty; pass the flattened network parameters")
    return first


def trajectory_matching_distance(student: torch.Tensor, start: torch.Tensor,
                                 target: torch.Tensor) -> torch.Tensor:
    """||student - target||^2 / ||start - target||^2 over flat parameter vectors, fused.

    Shapes: three tensors of one shape (normally 1-D, P parameters) and dtype (float32,
    float16, bfloat16 with float32 accumulation; float64). Returns a 0-d float32 tensor
    (float64 for float64 inputs), bit-identical across runs. Differentiable w.r.t. every
    input that requires grad.
    """
    _check_vectors("trajectory_matching_distance", student=student, start=start, target=target)
    return torch.ops.ld3m_fast.tm_distance(student, start, target)[0]


def mtt_truncated_terms(start: torch.Tensor, grad_sum: torch.Tensor, target: torch.Tensor,
                        alpha: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss, image-VJP vector and learning-rate gradient of the truncated MTT objective.

    r = start - alpha * grad_sum - target, D = ||start - target||^2:
    loss = r.r / D, v = -2 alpha r / D, dloss_dalpha = -2 (grad_sum . r) / D.
    One pass over the parameters computes the three reductions (and parks r in v); a
    second elementwise pass scales v by -2 alpha / D, which needs the finished D.

    Shapes: start, grad_sum, target share one shape (normally 1-D, P) and dtype; alpha is a
    Python float or a one-element tensor. Returns (loss 0-d, v like start, dloss_dalpha 0-d),
    the scalars in float32 (float64 for float64 inputs). The outputs are constants for
    autograd (inputs are detached): the caller applies v through the per-step VJPs and
    dloss_dalpha to the learnable lr itself, which is what keeps memory flat in N.
    """
    first = _check_vectors("mtt_truncated_terms", start=start, grad_sum=grad_sum, target=target)
    work = _stats_dtype(first.dtype)
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1:
            raise LD3MError(f"mtt_truncated_terms: alpha must be a scalar, got shape {tuple(alpha.shape)}")
        alpha_tensor = alpha.detach().to(device=first.device, dtype=work).reshape(())
    else:
        alpha_tensor = torch.tensor(float(alpha), dtype=work, device=first.device)
    stats, v = torch.ops.ld3m_fast.mtt_truncated_terms(start.detach(), grad_sum.detach(),
                                                       target.detach(), alpha_tensor)
    return stats[0], v, stats[1]
