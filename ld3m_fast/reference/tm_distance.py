"""References for the trajectory-matching distance and the truncated-MTT terms.

Both are written as plainly as possible: they are the oracles that the fused
kernels (kernels/tm_distance.py, csrc/tm_distance.cpp) are tested against.
"""
from __future__ import annotations

import torch


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def trajectory_matching_distance_ref(
    student: torch.Tensor,
    start: torch.Tensor,
    target: torch.Tensor,
    upcast: bool = False,
) -> torch.Tensor:
    """Normalised trajectory-matching distance between flat parameter vectors.

        loss = ||student - target||^2 / ||start - target||^2

    Shapes: `student`, `start`, `target` are tensors of the same shape (normally
    1-D, P parameters); the sums run over every element. Returns a 0-d tensor in
    the inputs' dtype, or in float32 (float64 for float64 inputs) with `upcast=True`.
    """
    if upcast:
        work = _work_dtype(student.dtype)
        student, start, target = student.to(work), start.to(work), target.to(work)
    numerator = (student - target).pow(2).sum()
    denominator = (start - target).pow(2).sum()
    return numerator / denominator


def mtt_truncated_terms_ref(
    start: torch.Tensor,
    grad_sum: torch.Tensor,
    target: torch.Tensor,
    alpha: float | torch.Tensor,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pieces of the truncated (constant-memory) MTT gradient.

    The student takes N SGD steps theta_{i+1} = theta_i - alpha * g_i from
    `start`; with G = sum_i g_i (`grad_sum`):

        r             = start - alpha * G - target
        D             = ||start - target||^2
        loss          = r . r / D
        v             = -2 * alpha * r / D      (each step's image gradient is the VJP of g_i with v)
        dloss_dalpha  = -2 * (G . r) / D

    Shapes: `start`, `grad_sum`, `target` share one shape (normally 1-D, P);
    `alpha` is a Python float or a 0-d tensor. Returns (loss 0-d, v like `start`,
    dloss_dalpha 0-d); with `upcast=True` the math runs in float32 (float64 for
    float64 inputs), `v` is cast back to the inputs' dtype and the scalars stay
    in the working dtype.
    """
    out_dtype = start.dtype
    if upcast:
        work = _work_dtype(out_dtype)
        start, grad_sum, target = start.to(work), grad_sum.to(work), target.to(work)
        if isinstance(alpha, torch.Tensor):
            alpha = alpha.to(work)
    residual = start - alpha * grad_sum - target
    denominator = (start - target).pow(2).sum()
    loss = residual.pow(2).sum() / denominator
    v = (-2.0 * alpha * residual / denominator).to(out_dtype)
    dloss_dalpha = -2.0 * (grad_sum * residual).sum() / denominator
    return loss, v, dloss_dalpha
