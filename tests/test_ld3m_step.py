"""ld3m_step: every backend against the float64 reference, forward and backward."""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from _assertions import assert_close, assert_within_plain_error
from ld3m_fast.errors import LD3MError
from ld3m_fast.ops import _backend, _native, backend_report, ld3m_step
from ld3m_fast.ops.ld3m_step import _forward_triton, _present_inputs, step_coefficients
from ld3m_fast.reference import ld3m_step_ref

BACKENDS = ["reference", "cpp", "triton"]
SCHEDULE = dict(a_t=0.3, a_prev=0.55, skip_weight=0.4)


def use_backend(monkeypatch, backend: str) -> None:
    """Force `backend` through LD3M_FAST_BACKEND, skipping when it cannot run here."""
    if backend == "cpp" and _native.get_extension() is None:
        pytest.skip(f"C++ extension unavailable: {_native.status()}")
    if backend == "triton" and not _backend.triton_usable_on("cpu"):
        pytest.skip("triton not installed or TRITON_INTERPRET!=1")
    monkeypatch.setenv("LD3M_FAST_BACKEND", backend)


def make_inputs(shape, dtype, *, guidance: bool, sigma: float, generator_seed=0, layout="contiguous"):
    """z_t, eps_cond, anchor, eps_uncond, noise in `dtype`; non-contiguous layouts on request."""
    generator = torch.Generator().manual_seed(generator_seed)

    def draw():
        if layout == "strided":  # every other column of a wider tensor: not dense
            wide = torch.randn(*shape[:-1], 2 * shape[-1], generator=generator)
            return wide[..., ::2].to(dtype) if dtype == torch.float32 else wide.to(dtype)[..., ::2]
        base = torch.randn(*shape, generator=generator).to(dtype)
        if layout == "channels_last":
            return base.contiguous(memory_format=torch.channels_last)
        return base

    z_t, eps_cond, anchor = draw(), draw(), draw()
    eps_uncond = draw() if guidance else None
    noise = draw() if sigma else None
    return z_t, eps_cond, anchor, eps_uncond, noise


def step_kwargs(skip, eps_uncond, sigma, noise, guidance_scale=3.0):
    return dict(SCHEDULE, skip=skip, eps_uncond=eps_uncond, guidance=guidance_scale, sigma=sigma, noise=noise)


def run_forward_backward(fn, tensors, skip, sigma, grad_out):
    """Forward + backward of fn; returns (z_prev, {input name: grad})."""
    z_t, eps_cond, anchor, eps_uncond, noise = [None if t is None else t.detach().clone().requires_grad_()
                                                 for t in tensors]
    if skip is None:
        anchor = None
    out = fn(z_t, eps_cond, anchor, **step_kwargs(skip, eps_uncond, sigma, noise))
    named = {"z_t": z_t, "eps_cond": eps_cond, "anchor": anchor, "eps_uncond": eps_uncond, "noise": noise}
    named = {k: v for k, v in named.items() if v is not None}
    grads = torch.autograd.grad(out, list(named.values()), grad_out.to(out.dtype), allow_unused=True)
    return out, dict(zip(named, grads))


def check_against_reference(op_fn, tensors, skip, sigma, dtype):
    """op vs float64 oracle, bounded by the plain low-precision reference's error; returns the
    op's output. The upstream gradient lives on the inputs' device (autograd refuses a CPU
    gradient for a CUDA output)."""
    generator = torch.Generator().manual_seed(1)
    grad_out = torch.randn(tensors[0].shape, generator=generator).to(device=tensors[0].device, dtype=dtype)
    out, grads = run_forward_backward(op_fn, tensors, skip, sigma, grad_out)
    wide = [None if t is None else t.to(torch.float64) for t in tensors]
    oracle, oracle_grads = run_forward_backward(ld3m_step_ref, wide, skip, sigma, grad_out.to(torch.float64))
    plain, plain_grads = run_forward_backward(ld3m_step_ref, tensors, skip, sigma, grad_out)
    assert out.dtype == dtype and out.shape == tensors[0].shape
    assert_within_plain_error(out, plain, oracle, name="z_prev")
    for name, oracle_grad in oracle_grads.items():
        if oracle_grad is None:
            assert grads[name] is None or not grads[name].any(), name
            continue
        assert_within_plain_error(grads[name], plain_grads[name], oracle_grad, name=f"grad {name}")
    return out


CONFIGS = list(itertools.product(["x0", "mean", None], [False, True], [0.0, 0.2]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("skip,guidance,sigma", CONFIGS, ids=[f"{s}-g{int(g)}-s{v}" for s, g, v in CONFIGS])
def test_every_mode_matches_reference(monkeypatch, backend, dtype, skip, guidance, sigma):
    use_backend(monkeypatch, backend)
    tensors = make_inputs((2, 3, 5, 7), dtype, guidance=guidance, sigma=sigma)
    check_against_reference(ld3m_step, tensors, skip, sigma, dtype)


@pytest.mark.parametrize("skip,guidance,sigma", CONFIGS, ids=[f"{s}-g{int(g)}-s{v}" for s, g, v in CONFIGS])
def test_cpp_bfloat16(monkeypatch, skip, guidance, sigma):
    use_backend(monkeypatch, "cpp")
    tensors = make_inputs((2, 3, 5, 7), torch.bfloat16, guidance=guidance, sigma=sigma)
    check_against_reference(ld3m_step, tensors, skip, sigma, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("skip", ["x0", "mean", None])
def test_triton_bfloat16_on_gpu(monkeypatch, skip):
    monkeypatch.setenv("LD3M_FAST_BACKEND", "triton")
    tensors = [None if t is None else t.cuda() for t in
               make_inputs((3, 4, 33, 31), torch.bfloat16, guidance=True, sigma=0.2)]
    check_against_reference(ld3m_step, tensors, skip, 0.2, torch.bfloat16)


SHAPES = {
    "batch1": ((1, 3, 8, 8), "contiguous"),
    "prime": ((3, 5, 7, 11), "contiguous"),
    "not_multiple_of_block": ((2, 3, 33, 31), "contiguous"),  # 6138 = 5 * 1024 + 1018
    "odd_single_element": ((1, 1, 1, 1), "contiguous"),
    "strided": ((2, 3, 5, 9), "strided"),
    "channels_last": ((2, 4, 6, 5), "channels_last"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(SHAPES))
def test_awkward_shapes_and_layouts(monkeypatch, backend, dtype, case):
    use_backend(monkeypatch, backend)
    shape, layout = SHAPES[case]
    tensors = make_inputs(shape, dtype, guidance=True, sigma=0.2, layout=layout)
    if layout == "strided":
        assert not tensors[0].is_contiguous()
    check_against_reference(ld3m_step, tensors, "x0", 0.2, dtype)


def test_triton_launcher_directly_matches_reference():
    """The interpreter path through the launcher itself (no dispatcher, no autograd)."""
    if not _backend.triton_usable_on("cpu"):
        pytest.skip("triton not installed or TRITON_INTERPRET!=1")
    z_t, eps_cond, anchor, eps_uncond, noise = make_inputs((2, 3, 33, 31), torch.float32, guidance=True, sigma=0.2)
    coefficients = step_coefficients(0.3, 0.55, 0.4, "mean", 3.0, 0.2, True)
    present = _present_inputs(eps_uncond, anchor, noise, "mean", 0.2)
    out = _forward_triton(z_t, eps_cond, anchor, eps_uncond, noise, coefficients, present)
    expected = ld3m_step_ref(z_t.double(), eps_cond.double(), anchor.double(), **step_kwargs(
        "mean", eps_uncond.double(), 0.2, noise.double()))
    assert_close(out, expected, atol=5e-6, rtol=1e-6, name="triton launcher")


def test_channels_last_output_keeps_layout(monkeypatch):
    use_backend(monkeypatch, "cpp")
    z_t, eps_cond, anchor, _, _ = make_inputs((2, 4, 6, 5), torch.float32, guidance=False, sigma=0.0,
                                              layout="channels_last")
    out = ld3m_step(z_t, eps_cond, anchor, **SCHEDULE)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_gradcheck_reference_float64():
    generator = torch.Generator().manual_seed(3)
    tensors = [torch.randn(1, 2, 3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
               for _ in range(5)]
    for skip in ("x0", "mean", None):
        def fn(z_t, eps_cond, anchor, eps_uncond, noise, skip=skip):
            return ld3m_step_ref(z_t, eps_cond, anchor if skip else None,
                                 **step_kwargs(skip, eps_uncond, 0.2, noise))
        assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_gradcheck_op_float64(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    generator = torch.Generator().manual_seed(4)
    tensors = [torch.randn(1, 2, 3, 3, generator=generator, dtype=torch.float64, requires_grad=True)
               for _ in range(5)]

    def fn(z_t, eps_cond, anchor, eps_uncond, noise):
        return ld3m_step(z_t, eps_cond, anchor, **step_kwargs("mean", eps_uncond, 0.2, noise))

    assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("skip", ["x0", "mean", "none"])
def test_opcheck(monkeypatch, skip):
    use_backend(monkeypatch, "cpp")
    tensors = [torch.randn(2, 3, 5, 7, requires_grad=True) for _ in range(5)]
    anchor = None if skip == "none" else tensors[2]
    args = (tensors[0], tensors[1], anchor, tensors[3], tensors[4], 0.3, 0.55, 0.4, skip, 3.0, 0.2)
    torch.library.opcheck(torch.ops.ld3m_fast.ld3m_step.default, args)
    torch.library.opcheck(torch.ops.ld3m_fast.ld3m_step_backward.default, (tensors[0].detach(), [0.5, -2.0, 1.5]))


def test_no_grad_for_unused_inputs(monkeypatch):
    """An anchor with skip=None and noise at sigma 0 do not enter z_prev: no gradient."""
    use_backend(monkeypatch, "cpp")
    z_t, eps_cond, anchor, noise = [torch.randn(1, 2, 3, 3, requires_grad=True) for _ in range(4)]
    out = ld3m_step(z_t, eps_cond, anchor, **SCHEDULE, skip=None, sigma=0.0, noise=noise)
    grads = torch.autograd.grad(out.sum(), [z_t, anchor, noise], allow_unused=True)
    assert grads[0] is not None and grads[1] is None and grads[2] is None


def test_user_errors():
    z = torch.randn(1, 2, 3, 3)
    with pytest.raises(LD3MError, match="anchor"):
        ld3m_step(z, z, None, **SCHEDULE, skip="x0")
    with pytest.raises(LD3MError, match="noise"):
        ld3m_step(z, z, z, **SCHEDULE, sigma=0.1)
    with pytest.raises(LD3MError, match="must match z_t"):
        ld3m_step(z, torch.randn(1, 2, 3, 4), z, **SCHEDULE)
    with pytest.raises(LD3MError, match="skip"):
        ld3m_step(z, z, z, **SCHEDULE, skip="both")


def test_invalid_backend_env(monkeypatch):
    monkeypatch.setenv("LD3M_FAST_BACKEND", "gpu-magic")
    z = torch.randn(1, 2, 3, 3)
    with pytest.raises(LD3MError, match="LD3M_FAST_BACKEND"):
        ld3m_step(z, z, z, **SCHEDULE)
    assert backend_report()["forced"].startswith("invalid")


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv("LD3M_FAST_BACKEND", raising=False)
    monkeypatch.setattr(_native, "_module", None)
    monkeypatch.setattr(_native, "_failure", "simulated for the test")
    monkeypatch.setattr(_native, "_warned", False)
    z_t, eps_cond, anchor, _, _ = make_inputs((1, 2, 3, 3), torch.float32, guidance=False, sigma=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ld3m_step(z_t, eps_cond, anchor, **SCHEDULE)
        ld3m_step(z_t, eps_cond, anchor, **SCHEDULE)
    messages = [str(w.message) for w in caught if "C++ extension unavailable" in str(w.message)]
    assert len(messages) == 1 and "simulated for the test" in messages[0]
    assert_close(first, ld3m_step_ref(z_t, eps_cond, anchor, **SCHEDULE), atol=1e-6, name="fallback")
    assert backend_report()["ld3m_step"].startswith("cpu=reference")


def test_backend_report_names_every_op():
    report = backend_report()
    for key in ("ld3m_step", "trajectory_matching_distance", "mtt_truncated_terms", "cpp_extension", "triton"):
        assert key in report and isinstance(report[key], str)
    assert "cpu=" in report["ld3m_step"] and "cuda=" in report["ld3m_step"]
