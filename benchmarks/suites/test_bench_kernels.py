"""The fused ops against their plain-PyTorch references, forward + backward (pytest-benchmark).

The same cases as benchmarks/bench_kernels.py (its table also times torch.compile of the reference).
"""
from __future__ import annotations

import pytest
import torch

from ld3m_fast.ops import ld3m_step, trajectory_matching_distance
from ld3m_fast.reference import ld3m_step_ref, trajectory_matching_distance_ref

STEP_SHAPES = [(100, 3, 32, 32), (100, 3, 64, 64), (200, 4, 32, 32)]
STEP_SCALARS = dict(a_t=0.3, a_prev=0.55, skip_weight=0.4, skip="x0", guidance=3.0)
PARAMETERS = [600_000, 11_000_000]


@pytest.mark.parametrize("shape", STEP_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_ld3m_step_forward_backward(benchmark, shape, impl):
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=g).requires_grad_() for _ in range(4)]
    z_t, eps_cond, eps_uncond, anchor = inputs
    grad_out = torch.randn(shape, generator=g)
    fn = ld3m_step if impl == "op" else ld3m_step_ref
    benchmark.group = f"ld3m_step {shape}"

    def run():
        out = fn(z_t, eps_cond, anchor, eps_uncond=eps_uncond, **STEP_SCALARS)
        torch.autograd.grad(out, inputs, grad_out)

    benchmark(run)


@pytest.mark.parametrize("parameters", PARAMETERS)
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_trajectory_matching_distance_forward_backward(benchmark, parameters, impl):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(parameters, generator=g).requires_grad_()
    start, target = torch.randn(parameters, generator=g), torch.randn(parameters, generator=g)
    fn = trajectory_matching_distance if impl == "op" else trajectory_matching_distance_ref
    benchmark.group = f"trajectory_matching_distance {parameters}"

    def run():
        torch.autograd.grad(fn(student, start, target), student)

    benchmark(run)
