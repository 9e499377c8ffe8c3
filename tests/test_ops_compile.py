"""torch.compile over the fused ops: one graph, no recompile, same numbers as eager."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from _assertions import assert_close
from ld3m_fast.ops import _native, ld3m_step, mtt_truncated_terms, trajectory_matching_distance


@pytest.fixture(params=["cpp", "reference"])
def backend(request, monkeypatch):
    if request.param == "cpp" and _native.get_extension() is None:
        pytest.skip(f"C++ extension unavailable: {_native.status()}")
    monkeypatch.setenv("LD3M_FAST_BACKEND", request.param)
    torch._dynamo.reset()
    yield request.param
    torch._dynamo.reset()


def step_then_distance(z_t, eps_cond, eps_uncond, anchor, noise, student, start, target):
    """Both ops in one function: two chain steps (different a_t), then the MTT distance."""
    z = ld3m_step(z_t, eps_cond, anchor, a_t=0.3, a_prev=0.55, skip_weight=1.0, skip="x0",
                  eps_uncond=eps_uncond, guidance=3.0, sigma=0.1, noise=noise)
    z = ld3m_step(z, eps_cond, anchor, a_t=0.55, a_prev=0.8, skip_weight=0.5, skip="x0",
                  eps_uncond=eps_uncond, guidance=3.0)
    distance = trajectory_matching_distance(student, start, target)
    return z.square().mean() + distance, z


def make_inputs():
    generator = torch.Generator().manual_seed(0)
    latents = [torch.randn(2, 3, 5, 7, generator=generator, requires_grad=True) for _ in range(5)]
    vectors = [torch.randn(1001, generator=generator, requires_grad=True) for _ in range(3)]
    return latents + vectors


def run(fn, inputs):
    loss, z = fn(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    return loss.detach(), z.detach(), grads


def assert_same(compiled, eager):
    assert_close(compiled[0], eager[0], atol=1e-5, rtol=1e-5, name="loss")
    assert_close(compiled[1], eager[1], atol=1e-5, rtol=1e-5, name="z")
    for index, (a, b) in enumerate(zip(compiled[2], eager[2])):
        assert_close(a, b, atol=1e-5, rtol=1e-5, name=f"grad {index}")


def test_inductor_fullgraph_no_recompile(backend):
    inputs = make_inputs()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(step_then_distance, backend=counter, fullgraph=True)
    eager = run(step_then_distance, inputs)
    first = run(compiled, inputs)
    second = run(compiled, inputs)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"
    assert_same(first, eager)
    assert_same(second, eager)


def test_compiled_mtt_terms_match_eager(backend):
    generator = torch.Generator().manual_seed(1)
    start, grad_sum, target = torch.randn(3, 2049, generator=generator).unbind()
    alpha = torch.tensor(0.01)

    def terms(start, grad_sum, target, alpha):
        loss, v, dloss_dalpha = mtt_truncated_terms(start, grad_sum, target, alpha)
        return loss * 2.0, v, dloss_dalpha

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(terms, backend=counter, fullgraph=True)
    eager = terms(start, grad_sum, target, alpha)
    for _ in range(2):
        result = compiled(start, grad_sum, target, alpha)
        for name, a, b in zip(("loss", "v", "dloss_dalpha"), result, eager):
            assert_close(a, b, atol=0.0, name=name)
    assert counter.frame_count == 1
