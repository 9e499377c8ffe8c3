"""Triton kernels of the fused LD3M reverse step (device code only).

z_prev is affine in its tensor inputs. With eps = eps_uncond + guidance (eps_cond - eps_uncond),
x0 = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t), dir = sqrt(1 - a_prev - sigma^2) eps and the skip
mode's mix of x0 (or the DDIM mean) with the anchor, the launcher
(`ld3m_fast/ops/ld3m_step.py::step_coefficients`) folds every scalar into one float64
coefficient per input, so that

    z_prev = c_z z_t + c_cond eps_cond + c_uncond eps_uncond + c_anchor anchor + c_noise noise

Forward: one weighted sum (each input read once). Backward: d z_prev / d input_k = c_k, so
one pass reads grad once and writes c_k * grad for every input that needs a gradient.
Math in float32 whatever the storage dtype. Launch grid: (cdiv(n_elements, BLOCK),).
"""
import triton
import triton.language as tl


@triton.jit
def _ld3m_step_fwd_kernel(
    z_ptr, cond_ptr, uncond_ptr, anchor_ptr, noise_ptr, out_ptr,
    c_z, c_cond, c_uncond, c_anchor, c_noise,
    n_elements,
    HAS_UNCOND: tl.constexpr, HAS_ANCHOR: tl.constexpr, HAS_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out = sum of coefficient * input over the inputs present (flags say which)."""
    # int64 offsets: latent batches can exceed 2^31 elements.
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    # Scalars arrive as fp32 from Python but as fp64 under Inductor: cast once here.
    acc = tl.cast(c_z, tl.float32) * tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    acc += tl.cast(c_cond, tl.float32) * tl.load(cond_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        acc += tl.cast(c_uncond, tl.float32) * tl.load(uncond_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_ANCHOR:
        acc += tl.cast(c_anchor, tl.float32) * tl.load(anchor_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        acc += tl.cast(c_noise, tl.float32) * tl.load(noise_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ld3m_step_bwd_kernel(
    grad_ptr, out0_ptr, out1_ptr, out2_ptr, out3_ptr, out4_ptr,
    c0, c1, c2, c3, c4,
    n_elements,
    N_OUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out_k = c_k * grad for k < N_OUT (unused pointers alias out0 and are never written)."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    out_ty = out0_ptr.dtype.element_ty
    tl.store(out0_ptr + offsets, (tl.cast(c0, tl.float32) * grad).to(out_ty), mask=mask)
    if N_OUT > 1:
        tl.store(out1_ptr + offsets, (tl.cast(c1, tl.float32) * grad).to(out_ty), mask=mask)
    if N_OUT > 2:
        tl.store(out2_ptr + offsets, (tl.cast(c2, tl.float32) * grad).to(out_ty), mask=mask)
    if N_OUT > 3:
        tl.store(out3_ptr + offsets, (tl.cast(c3, tl.float32) * grad).to(out_ty), mask=mask)
    if N_OUT > 4:
        tl.store(out4_ptr + offsets, (tl.cast(c4, tl.float32) * grad).to(out_ty), mask=mask)
