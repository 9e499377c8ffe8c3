"""Trajectory-matching distance and truncated-MTT terms: every backend against float64 references."""
from __future__ import annotations

import pytest
import torch

from _assertions import assert_close, assert_within_plain_error
from ld3m_fast.errors import LD3MError
from ld3m_fast.ops import _backend, _native, mtt_truncated_terms, trajectory_matching_distance
from ld3m_fast.reference import mtt_truncated_terms_ref, trajectory_matching_distance_ref

BACKENDS = ["reference", "cpp", "triton"]
# 1, prime, block - 1, block, block + 1 (Triton block 1024), several C++ blocks (8192) plus a tail.
SIZES = [1, 7, 1023, 1024, 1025, 4099]


def use_backend(monkeypatch, backend: str) -> None:
    if backend == "cpp" and _native.get_extension() is None:
        pytest.skip(f"C++ extension unavailable: {_native.status()}")
    if backend == "triton" and not _backend.triton_usable_on("cpu"):
        pytest.skip("triton not installed or TRITON_INTERPRET!=1")
    monkeypatch.setenv("LD3M_FAST_BACKEND", backend)


def parameter_vectors(n, dtype, seed=0, strided=False):
    """student, start, target like an MTT step: start and student near the target."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.randn(n, generator=generator)
    start = target + 0.5 * torch.randn(n, generator=generator)
    student = target + 0.3 * torch.randn(n, generator=generator)
    vectors = [v.to(dtype) for v in (student, start, target)]
    if strided:  # every other element of a twice-as-long vector
        vectors = [torch.stack([v, torch.zeros_like(v)], dim=1).view(-1)[::2] for v in vectors]
        assert not vectors[0].is_contiguous()
    return vectors


def distance_and_grads(fn, vectors, requires=(True, True, True)):
    leaves = [v.detach().clone().requires_grad_(r) for v, r in zip(vectors, requires)]
    loss = fn(*leaves)
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    return loss, torch.autograd.grad(loss, wanted)


def check_distance(vectors, dtype, requires=(True, True, True)):
    loss, grads = distance_and_grads(trajectory_matching_distance, vectors, requires)
    oracle, oracle_grads = distance_and_grads(trajectory_matching_distance_ref,
                                              [v.double() for v in vectors], requires)
    plain, plain_grads = distance_and_grads(trajectory_matching_distance_ref, vectors, requires)
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # The fused loss accumulates in float32, so it is held to float32's bound, not fp16's.
    assert_within_plain_error(loss, plain, oracle, atol=2e-6 * float(oracle.detach().abs()), name="loss")
    for index, (grad, plain_grad, oracle_grad) in enumerate(zip(grads, plain_grads, oracle_grads)):
        assert grad.dtype == dtype and grad.shape == vectors[0].shape
        assert_within_plain_error(grad, plain_grad, oracle_grad, name=f"grad {index}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n", SIZES)
def test_distance_matches_reference(monkeypatch, backend, dtype, n):
    use_backend(monkeypatch, backend)
    check_distance(parameter_vectors(n, dtype), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("requires", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["student", "start", "target"])
def test_distance_grad_to_one_input(monkeypatch, backend, requires):
    use_backend(monkeypatch, backend)
    check_distance(parameter_vectors(1025, torch.float32), torch.float32, requires)


@pytest.mark.parametrize("backend", BACKENDS)
def test_distance_non_contiguous(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    check_distance(parameter_vectors(1031, torch.float32, strided=True), torch.float32)


@pytest.mark.parametrize("n", [1, 8193, 70001])
def test_distance_cpp_bfloat16_and_several_blocks(monkeypatch, n):
    use_backend(monkeypatch, "cpp")
    check_distance(parameter_vectors(n, torch.bfloat16), torch.bfloat16)


@pytest.mark.gpu
def test_distance_triton_bfloat16_on_gpu(monkeypatch):
    monkeypatch.setenv("LD3M_FAST_BACKEND", "triton")
    check_distance([v.cuda() for v in parameter_vectors(100003, torch.bfloat16)], torch.bfloat16)


def check_mtt(vectors, alpha, dtype):
    start, grad_sum, target = vectors
    loss, v, dloss_dalpha = mtt_truncated_terms(start, grad_sum, target, alpha)
    wide_alpha = alpha.double() if isinstance(alpha, torch.Tensor) else alpha
    oracle = mtt_truncated_terms_ref(start.double(), grad_sum.double(), target.double(), wide_alpha)
    plain = mtt_truncated_terms_ref(start, grad_sum, target, alpha)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == work and dloss_dalpha.dtype == work and v.dtype == dtype and v.shape == start.shape
    assert_within_plain_error(loss, plain[0], oracle[0], atol=2e-6 * float(oracle[0].detach().abs()), name="loss")
    assert_within_plain_error(v, plain[1], oracle[1], name="v")
    assert_within_plain_error(dloss_dalpha, plain[2], oracle[2], atol=2e-6 * float(oracle[2].detach().abs()) + 1e-7,
                              name="dloss_dalpha")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n", [1, 1025, 4099])
@pytest.mark.parametrize("alpha_kind", ["float", "tensor"])
def test_mtt_terms_match_reference(monkeypatch, backend, dtype, n, alpha_kind):
    use_backend(monkeypatch, backend)
    alpha = 0.7 if alpha_kind == "float" else torch.tensor(0.7)
    check_mtt(parameter_vectors(n, dtype, seed=5), alpha, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mtt_terms_non_contiguous(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    check_mtt(parameter_vectors(1031, torch.float32, strided=True), torch.tensor([0.01]), torch.float32)


def test_mtt_terms_cpp_bfloat16(monkeypatch):
    use_backend(monkeypatch, "cpp")
    check_mtt(parameter_vectors(70001, torch.bfloat16, seed=2), 0.01, torch.bfloat16)


def test_mtt_terms_are_the_gradients_of_the_loss():
    """v = dloss/dG and dloss_dalpha = dloss/dalpha: the formulas the truncated MTT relies on."""
    generator = torch.Generator().manual_seed(6)
    start, grad_sum, target = torch.randn(3, 257, generator=generator, dtype=torch.float64).unbind()
    grad_sum.requires_grad_()
    alpha = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    loss, v, dloss_dalpha = mtt_truncated_terms_ref(start, grad_sum, target, alpha)
    d_grad_sum, d_alpha = torch.autograd.grad(loss, [grad_sum, alpha])
    assert_close(v, d_grad_sum, atol=1e-12, name="v vs dloss/dG")
    assert_close(dloss_dalpha, d_alpha, atol=1e-12, name="dloss_dalpha vs autograd")
    fused = mtt_truncated_terms(start, grad_sum, target, alpha)
    assert_close(fused[1], d_grad_sum, atol=1e-12, name="fused v")
    assert_close(fused[2], d_alpha, atol=1e-12, name="fused dloss_dalpha")


def test_gradcheck_references_float64():
    generator = torch.Generator().manual_seed(7)
    vectors = [t.requires_grad_() for t in torch.randn(3, 11, generator=generator, dtype=torch.float64).unbind()]
    assert torch.autograd.gradcheck(trajectory_matching_distance_ref, vectors)
    alpha = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, g, t, a: mtt_truncated_terms_ref(s, g, t, a)[0], (*vectors, alpha))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_gradcheck_op_float64(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    generator = torch.Generator().manual_seed(8)
    vectors = [t.requires_grad_() for t in torch.randn(3, 13, generator=generator, dtype=torch.float64).unbind()]
    assert torch.autograd.gradcheck(trajectory_matching_distance, vectors)


def test_opcheck(monkeypatch):
    use_backend(monkeypatch, "cpp")
    student, start, target = [v.requires_grad_() for v in parameter_vectors(1025, torch.float32)]
    torch.library.opcheck(torch.ops.ld3m_fast.tm_distance.default, (student, start, target))
    stats = torch.ops.ld3m_fast.tm_distance(student, start, target).detach()
    torch.library.opcheck(torch.ops.ld3m_fast.tm_distance_backward.default,
                          (torch.tensor([1.0, 0.5, -0.25]), student.detach(), start.detach(), target.detach(),
                           stats, [True, False, True]))
    torch.library.opcheck(torch.ops.ld3m_fast.mtt_truncated_terms.default,
                          (start.detach(), student.detach(), target.detach(), torch.tensor(0.1)))


def test_gradient_of_numerator_and_denominator_outputs(monkeypatch):
    """The op's stats [loss, N, D] are all differentiable, not only the loss."""
    use_backend(monkeypatch, "cpp")
    vectors = [v.double().requires_grad_() for v in parameter_vectors(37, torch.float32)]
    weights = torch.tensor([0.3, -1.2, 2.5], dtype=torch.float64)

    def fn(student, start, target):
        return (torch.ops.ld3m_fast.tm_distance(student, start, target) * weights).sum()

    assert torch.autograd.gradcheck(fn, vectors)


def test_cpp_result_independent_of_thread_count(monkeypatch):
    use_backend(monkeypatch, "cpp")
    vectors = parameter_vectors(300007, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = trajectory_matching_distance(*vectors), mtt_truncated_terms(*vectors, 0.3)
        torch.set_num_threads(max(2, threads))
        many = trajectory_matching_distance(*vectors), mtt_truncated_terms(*vectors, 0.3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], many[0])
    assert all(torch.equal(a, b) for a, b in zip(one[1], many[1]))


def check_large_reduction(n, device="cpu"):
    """Within float32 tolerance of float64, and bit-identical across two runs."""
    vectors = [v.to(device) for v in parameter_vectors(n, torch.float32, seed=9)]
    oracle = trajectory_matching_distance_ref(*[v.double() for v in vectors])
    first = trajectory_matching_distance(*vectors)
    second = trajectory_matching_distance(*vectors)
    assert torch.equal(first, second)
    assert_close(first, oracle, atol=0.0, rtol=1e-5, name=f"loss over {n} elements")
    terms_first = mtt_truncated_terms(*vectors, 0.05)
    terms_second = mtt_truncated_terms(*vectors, 0.05)
    assert all(torch.equal(a, b) for a, b in zip(terms_first, terms_second))
    terms_oracle = mtt_truncated_terms_ref(*[v.double() for v in vectors], 0.05)
    assert_close(terms_first[0], terms_oracle[0], atol=0.0, rtol=1e-5, name="mtt loss")
    assert_close(terms_first[2], terms_oracle[2], atol=0.0, rtol=1e-4, name="dloss_dalpha")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_large_reduction_accurate_and_deterministic(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    check_large_reduction((1 << 24) + 3)


@pytest.mark.slow
def test_large_reduction_triton_interpreter(monkeypatch):
    """2^20 + 3 elements: the interpreter needs ~4 min for 2^24 (that size runs in the gpu tier)."""
    use_backend(monkeypatch, "triton")
    check_large_reduction((1 << 20) + 3)


@pytest.mark.gpu
def test_large_reduction_triton_on_gpu(monkeypatch):
    monkeypatch.setenv("LD3M_FAST_BACKEND", "triton")
    check_large_reduction((1 << 24) + 3, device="cuda")


def test_user_errors():
    a = torch.randn(5)
    with pytest.raises(LD3MError, match="must match"):
        trajectory_matching_distance(a, a, torch.randn(6))
    with pytest.raises(LD3MError, match="empty"):
        trajectory_matching_distance(a[:0], a[:0], a[:0])
    with pytest.raises(LD3MError, match="alpha"):
        mtt_truncated_terms(a, a, a, torch.ones(2))
    with pytest.raises(LD3MError, match="floating-point"):
        trajectory_matching_distance(a, a, torch.ones(5, dtype=torch.long))
