"""Assertion helpers for kernel tests: errors measured against a high-precision oracle.

The rule (STYLE.md): a kernel may be at most `factor` times as wrong as the plain
low-precision computation, plus a small `atol`; both errors are measured against the same
float64 oracle. On failure the message says how many elements are out of bounds, where the
worst one is, and whether NaN/inf appear in different places.
"""
from __future__ import annotations

import torch

# Absolute slack per storage dtype, added to the "2x the plain error" bound: roughly one
# rounding of an O(10) value in that dtype.
ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-2, torch.bfloat16: 8e-2}


def _nonfinite_mismatch(actual: torch.Tensor, expected: torch.Tensor) -> str | None:
    nan_mismatch = torch.isnan(actual) != torch.isnan(expected)
    inf_mismatch = (torch.isinf(actual) | torch.isinf(expected)) & (actual != expected)
    bad = nan_mismatch | inf_mismatch
    if not bad.any():
        return None
    first = tuple(int(i) for i in torch.nonzero(bad)[0])
    return (f"{int(nan_mismatch.sum())} NaN and {int(inf_mismatch.sum())} inf mismatches, first at "
            f"{first}: actual {actual[first].item()!r}, expected {expected[first].item()!r}")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0,
                 name: str = "tensor") -> None:
    """|actual - expected| <= atol + rtol |expected| elementwise, compared in float64."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    problem = _nonfinite_mismatch(actual, expected)
    assert problem is None, f"{name}: {problem}"
    finite = torch.isfinite(expected)
    error = torch.where(finite, (actual - expected).abs(), torch.zeros_like(actual))
    bound = atol + rtol * expected.abs()
    over = error > bound
    if over.any():
        worst = tuple(int(i) for i in torch.nonzero(error == error.max())[0]) if error.dim() else ()
        raise AssertionError(
            f"{name}: {int(over.sum())} of {error.numel()} elements exceed atol={atol:g} rtol={rtol:g}; "
            f"worst at {worst}: actual {actual[worst].item():.9g}, expected {expected[worst].item():.9g}, "
            f"error {error[worst].item():.3g}")


def assert_within_plain_error(kernel: torch.Tensor, plain: torch.Tensor, oracle: torch.Tensor, *,
                              factor: float = 2.0, atol: float | None = None,
                              name: str = "tensor") -> None:
    """Kernel error <= factor * (max error of the plain low-precision result) + atol.

    `oracle` is the float64 (or float32) ground truth; `plain` is the same computation done
    the ordinary way in the kernel's storage dtype. `atol` defaults to ATOL[kernel.dtype].
    """
    atol = ATOL[kernel.dtype] if atol is None else atol
    oracle64 = oracle.detach().to(torch.float64).cpu()
    plain_error = (plain.detach().to(torch.float64).cpu() - oracle64).abs()
    finite = torch.isfinite(plain_error)
    plain_max = float(plain_error[finite].max()) if finite.any() else 0.0
    assert_close(kernel, oracle64, atol=factor * plain_max + atol, name=f"{name} (plain max error {plain_max:.3g})")
