"""GPU tier: the compiled Triton kernels against the float64 reference on CUDA tensors.

What the CPU tier cannot check (the interpreter does no bf16 arithmetic and compiles nothing):
fp32, fp16 and bf16, forward and backward, every mode of the step, odd sizes, non-contiguous
inputs, and the automatic backend choice on CUDA. Every test here is gpu-marked and skips
cleanly without CUDA; run with TRITON_INTERPRET=0 (benchmarks/gpu_check.py does), or the
kernels run in the interpreter instead of compiled.

Tolerances are the CPU tier's (tests/_assertions.py): the kernel may be at most twice as wrong
as the plain computation in the same dtype, plus a per-dtype atol, both measured against float64.
"""
from __future__ import annotations

import pytest
import torch

from test_ld3m_step import CONFIGS, SHAPES, check_against_reference, make_inputs
from test_tm_distance import check_distance, check_mtt, parameter_vectors

from ld3m_fast.ops import _backend, ld3m_step

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def to_cuda(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t` on CUDA with its layout: `.cuda()` would make the helpers' every-other-element
    views (not dense) contiguous, so those are rebuilt as views of a wider CUDA tensor."""
    if t is None or t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return None if t is None else t.cuda()
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device="cuda")
    view = wide[..., ::2]
    view.copy_(t)
    return view


def cuda(tensors):
    return [to_cuda(t) for t in tensors]


def check_step(tensors, skip, sigma, dtype):
    """`test_ld3m_step.check_against_reference` of the op, whose output must stay on CUDA."""
    assert check_against_reference(ld3m_step, tensors, skip, sigma, dtype).is_cuda


@pytest.fixture
def triton_on_cuda(monkeypatch):
    monkeypatch.setenv("LD3M_FAST_BACKEND", "triton")


def test_compiled_kernels_not_the_interpreter():
    assert not _backend.triton_interpreter_on(), (
        "TRITON_INTERPRET=1: the gpu tier would run the interpreter, not compiled kernels; "
        "run it with TRITON_INTERPRET=0")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_automatic_choice_on_cuda_is_triton(monkeypatch, dtype):
    monkeypatch.delenv("LD3M_FAST_BACKEND", raising=False)
    assert _backend.choose("ld3m_step", "cuda", dtype) == "triton"
    tensors = cuda(make_inputs((2, 3, 8, 8), dtype, guidance=True, sigma=0.0))
    check_step(tensors, "x0", 0.0, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("skip,guidance,sigma", CONFIGS, ids=[f"{s}-g{int(g)}-s{v}" for s, g, v in CONFIGS])
def test_step_every_mode(triton_on_cuda, dtype, skip, guidance, sigma):
    tensors = cuda(make_inputs((3, 4, 33, 31), dtype, guidance=guidance, sigma=sigma))
    check_step(tensors, skip, sigma, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(SHAPES))
def test_step_awkward_shapes_and_layouts(triton_on_cuda, dtype, case):
    shape, layout = SHAPES[case]
    tensors = cuda(make_inputs(shape, dtype, guidance=True, sigma=0.2, layout=layout))
    if layout == "strided":
        assert not tensors[0].is_contiguous()
    check_step(tensors, "x0", 0.2, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_step_at_chain_size(triton_on_cuda, dtype):
    """One chunk of the 256² chain: 10 latents of 3x64x64, several thousand blocks."""
    tensors = cuda(make_inputs((10, 3, 64, 64), dtype, guidance=True, sigma=0.0))
    check_step(tensors, "x0", 0.0, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [1, 7, 1023, 1024, 1025, 100003])
def test_distance(triton_on_cuda, dtype, n):
    check_distance(cuda(parameter_vectors(n, dtype)), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_distance_non_contiguous(triton_on_cuda, dtype):
    vectors = cuda(parameter_vectors(1031, dtype, strided=True))
    assert not vectors[0].is_contiguous()
    check_distance(vectors, dtype)


@pytest.mark.parametrize("requires", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["student", "start", "target"])
def test_distance_grad_to_one_input(triton_on_cuda, requires):
    check_distance(cuda(parameter_vectors(1025, torch.bfloat16)), torch.bfloat16, requires)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n", [1, 1025, 70001])
@pytest.mark.parametrize("alpha_kind", ["float", "tensor"])
def test_mtt_terms(triton_on_cuda, dtype, n, alpha_kind):
    alpha = 0.7 if alpha_kind == "float" else torch.tensor(0.7, device="cuda")
    check_mtt(cuda(parameter_vectors(n, dtype, seed=5)), alpha, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_mtt_terms_non_contiguous(triton_on_cuda, dtype):
    vectors = cuda(parameter_vectors(1031, dtype, strided=True))
    assert not vectors[0].is_contiguous()
    check_mtt(vectors, torch.tensor([0.01], device="cuda"), dtype)
