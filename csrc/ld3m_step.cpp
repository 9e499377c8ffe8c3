// Fused LD3M reverse step for CPU.
//
// z_prev is affine in its tensor inputs (see ld3m_fast/ops/ld3m_step.py, which
// folds a_t, a_prev, the skip weight, guidance and sigma into one coefficient per
// input, in float64):
//     z_prev = c_z z_t + c_cond eps_cond [+ c_uncond eps_uncond] [+ c_anchor anchor] [+ c_noise noise]
// so the forward is one weighted sum (every input read once, z_prev written once)
// and the backward is one pass that reads grad once and writes c_k * grad for
// every input that needs a gradient.
#include "ld3m_fast_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <array>

namespace ld3m_fast {
namespace {

// Elements per parallel task: large enough to amortise the task, small enough
// to keep every thread busy on batch-1 latents.
constexpr int64_t kBlock = 1 << 15;

template <typename scalar_t, int K>
void weighted_sum(const std::vector<at::Tensor>& inputs, const std::vector<double>& coefficients,
                  at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  std::array<const scalar_t*, K> src;
  std::array<acc_t, K> coef;
  for (int k = 0; k < K; ++k) {
    src[k] = inputs[k].const_data_ptr<scalar_t>();
    coef[k] = static_cast<acc_t>(coefficients[k]);
  }
  scalar_t* __restrict__ dst = out.mutable_data_ptr<scalar_t>();
  const int64_t n = out.numel();
  const int64_t n_blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, n_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t begin = block * kBlock;
      const int64_t end = std::min(n, begin + kBlock);
#pragma omp simd
      for (int64_t j = begin; j < end; ++j) {
        acc_t acc = coef[0] * static_cast<acc_t>(src[0][j]);
        for (int k = 1; k < K; ++k) {  // K is a compile-time constant: fully unrolled
          acc += coef[k] * static_cast<acc_t>(src[k][j]);
        }
        dst[j] = static_cast<scalar_t>(acc);
      }
    }
  });
}

template <typename scalar_t, int K>
void scaled_copies(const at::Tensor& grad, const std::vector<double>& coefficients,
                   std::vector<at::Tensor>& outs) {
  using acc_t = at::opmath_type<scalar_t>;
  std::array<scalar_t*, K> dst;
  std::array<acc_t, K> coef;
  for (int k = 0; k < K; ++k) {
    dst[k] = outs[k].mutable_data_ptr<scalar_t>();
    coef[k] = static_cast<acc_t>(coefficients[k]);
  }
  const scalar_t* __restrict__ src = grad.const_data_ptr<scalar_t>();
  const int64_t n = grad.numel();
  const int64_t n_blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, n_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t begin = block * kBlock;
      const int64_t end = std::min(n, begin + kBlock);
#pragma omp simd
      for (int64_t j = begin; j < end; ++j) {
        const acc_t g = static_cast<acc_t>(src[j]);
        for (int k = 0; k < K; ++k) {
          dst[k][j] = static_cast<scalar_t>(coef[k] * g);
        }
      }
    }
  });
}

void check_same_layout(const at::Tensor& reference, const at::Tensor& other, const char* what) {
  TORCH_CHECK(other.device().is_cpu(), "ld3m_step (C++): ", what, " must be a CPU tensor");
  TORCH_CHECK(other.scalar_type() == reference.scalar_type(), "ld3m_step (C++): ", what,
              " has dtype ", other.scalar_type(), ", expected ", reference.scalar_type());
  TORCH_CHECK(other.sizes() == reference.sizes() && other.strides() == reference.strides(),
              "ld3m_step (C++): ", what, " must have the output's shape and strides");
  TORCH_CHECK(other.is_non_overlapping_and_dense(), "ld3m_step (C++): ", what,
              " must be dense (the launcher copies it otherwise)");
}

}  // namespace

void ld3m_step_forward(const std::vector<at::Tensor>& inputs,
                       const std::vector<double>& coefficients, at::Tensor& out) {
  const int64_t K = static_cast<int64_t>(inputs.size());
  TORCH_CHECK(K >= 2 && K <= 5, "ld3m_step_forward takes 2 to 5 inputs, got ", K);
  TORCH_CHECK(coefficients.size() == inputs.size(), "one coefficient per input");
  check_same_layout(out, out, "out");
  for (const auto& input : inputs) check_same_layout(out, input, "an input");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "ld3m_step_forward", [&] {
    switch (K) {
      case 2: weighted_sum<scalar_t, 2>(inputs, coefficients, out); break;
      case 3: weighted_sum<scalar_t, 3>(inputs, coefficients, out); break;
      case 4: weighted_sum<scalar_t, 4>(inputs, coefficients, out); break;
      default: weighted_sum<scalar_t, 5>(inputs, coefficients, out); break;
    }
  });
}

void ld3m_step_backward(const at::Tensor& grad, const std::vector<double>& coefficients,
                        std::vector<at::Tensor>& outs) {
  const int64_t K = static_cast<int64_t>(outs.size());
  TORCH_CHECK(K >= 1 && K <= 5, "ld3m_step_backward writes 1 to 5 outputs, got ", K);
  TORCH_CHECK(coefficients.size() == outs.size(), "one coefficient per output");
  check_same_layout(grad, grad, "grad");
  for (const auto& out : outs) check_same_layout(grad, out, "a gradient output");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ld3m_step_backward", [&] {
    switch (K) {
      case 1: scaled_copies<scalar_t, 1>(grad, coefficients, outs); break;
      case 2: scaled_copies<scalar_t, 2>(grad, coefficients, outs); break;
      case 3: scaled_copies<scalar_t, 3>(grad, coefficients, outs); break;
      case 4: scaled_copies<scalar_t, 4>(grad, coefficients, outs); break;
      default: scaled_copies<scalar_t, 5>(grad, coefficients, outs); break;
    }
  });
}

}  // namespace ld3m_fast
