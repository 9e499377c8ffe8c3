"""Triton kernels of the trajectory-matching distance and the truncated-MTT terms (device code only).

    distance: loss = N / D,  N = ||student - target||^2,  D = ||start - target||^2
    MTT:      r = start - alpha G - target,  loss = r.r / D,  dloss_dalpha = -2 (G.r) / D,
              v = -2 alpha r / D

Deterministic two-stage reductions, no atomics: stage 1 (grid = cdiv(n, BLOCK)) writes one
fp32 partial per block and per sum into `partials` laid out (n_sums, n_blocks); stage 2 is a
single program that adds the partials of each sum in block order, CHUNK at a time, then a
fixed-shape tree (tl.sum). Same input, same bits, whatever the GPU schedule.
Scalars that depend on the data (alpha, the sums, upstream gradients) are read from device
memory so the launcher never synchronises with the host.
"""
import triton
import triton.language as tl


@triton.jit
def _sum_row(partials_ptr, row, n_blocks, CHUNK: tl.constexpr):
    """Sum of partials[row, :n_blocks] in a fixed order (fp32)."""
    acc = tl.zeros([CHUNK], dtype=tl.float32)
    for start in range(0, n_blocks, CHUNK):
        offsets = start + tl.arange(0, CHUNK)
        acc += tl.load(partials_ptr + row * n_blocks + offsets, mask=offsets < n_blocks, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _tm_distance_partials_kernel(student_ptr, start_ptr, target_ptr, partials_ptr, n_elements,
                                 BLOCK: tl.constexpr):
    """partials[0, pid] = block sum of (student - target)^2, partials[1, pid] = of (start - target)^2."""
    pid = tl.program_id(0)
    n_blocks = tl.num_programs(0)
    offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    target = tl.load(target_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    d_student = tl.load(student_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - target
    d_start = tl.load(start_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - target
    tl.store(partials_ptr + pid, tl.sum(d_student * d_student, axis=0))
    tl.store(partials_ptr + n_blocks + pid, tl.sum(d_start * d_start, axis=0))


@triton.jit
def _tm_distance_finish_kernel(partials_ptr, stats_ptr, n_blocks, CHUNK: tl.constexpr):
    """stats = [N / D, N, D] (grid = (1,))."""
    numerator = _sum_row(partials_ptr, 0, n_blocks, CHUNK)
    denominator = _sum_row(partials_ptr, 1, n_blocks, CHUNK)
    tl.store(stats_ptr, numerator / denominator)
    tl.store(stats_ptr + 1, numerator)
    tl.store(stats_ptr + 2, denominator)


@triton.jit
def _tm_distance_bwd_kernel(student_ptr, start_ptr, target_ptr, grad_stats_ptr, stats_ptr,
                            g_student_ptr, g_start_ptr, g_target_ptr, n_elements,
                            HAS_STUDENT: tl.constexpr, HAS_START: tl.constexpr,
                            HAS_TARGET: tl.constexpr, BLOCK: tl.constexpr):
    """Gradients of the stats [loss, N, D] given their upstream gradients [gL, gN, gD].

    dN = gL / D + gN, dD = gD - gL N / D^2;
    g_student = 2 dN (student - target), g_start = 2 dD (start - target), g_target = -(sum of both).
    """
    g_loss = tl.load(grad_stats_ptr).to(tl.float32)
    g_num = tl.load(grad_stats_ptr + 1).to(tl.float32)
    g_den = tl.load(grad_stats_ptr + 2).to(tl.float32)
    numerator = tl.load(stats_ptr + 1).to(tl.float32)
    denominator = tl.load(stats_ptr + 2).to(tl.float32)
    coef_student = 2.0 * (g_loss / denominator + g_num)
    coef_start = 2.0 * (g_den - g_loss * numerator / (denominator * denominator))

    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    target = tl.load(target_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g_student = coef_student * (tl.load(student_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - target)
    g_start = coef_start * (tl.load(start_ptr + offsets, mask=mask, other=0.0).to(tl.float32) - target)
    if HAS_STUDENT:
        tl.store(g_student_ptr + offsets, g_student.to(g_student_ptr.dtype.element_ty), mask=mask)
    if HAS_START:
        tl.store(g_start_ptr + offsets, g_start.to(g_start_ptr.dtype.element_ty), mask=mask)
    if HAS_TARGET:
        tl.store(g_target_ptr + offsets, (-(g_student + g_start)).to(g_target_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mtt_partials_kernel(start_ptr, grad_sum_ptr, target_ptr, alpha_ptr, v_ptr, partials_ptr,
                         n_elements, BLOCK: tl.constexpr):
    """Block sums of r.r, G.r and (start - target)^2; parks r in v for the scale pass."""
    pid = tl.program_id(0)
    n_blocks = tl.num_programs(0)
    alpha = tl.load(alpha_ptr).to(tl.float32)
    offsets = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    start = tl.load(start_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    grad_sum = tl.load(grad_sum_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    target = tl.load(target_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    residual = start - alpha * grad_sum - target
    d_start = start - target
    tl.store(v_ptr + offsets, residual.to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(partials_ptr + pid, tl.sum(residual * residual, axis=0))
    tl.store(partials_ptr + n_blocks + pid, tl.sum(grad_sum * residual, axis=0))
    tl.store(partials_ptr + 2 * n_blocks + pid, tl.sum(d_start * d_start, axis=0))


@triton.jit
def _mtt_finish_kernel(partials_ptr, stats_ptr, n_blocks, CHUNK: tl.constexpr):
    """stats = [r.r / D, -2 G.r / D, D] (grid = (1,))."""
    rr = _sum_row(partials_ptr, 0, n_blocks, CHUNK)
    gr = _sum_row(partials_ptr, 1, n_blocks, CHUNK)
    denominator = _sum_row(partials_ptr, 2, n_blocks, CHUNK)
    tl.store(stats_ptr, rr / denominator)
    tl.store(stats_ptr + 1, -2.0 * gr / denominator)
    tl.store(stats_ptr + 2, denominator)


@triton.jit
def _mtt_scale_kernel(v_ptr, alpha_ptr, stats_ptr, n_elements, BLOCK: tl.constexpr):
    """v = -2 alpha r / D in place (v holds r from the partials pass)."""
    scale = -2.0 * tl.load(alpha_ptr).to(tl.float32) / tl.load(stats_ptr + 2).to(tl.float32)
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    residual = tl.load(v_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(v_ptr + offsets, (scale * residual).to(v_ptr.dtype.element_ty), mask=mask)
