// Fused trajectory-matching distance and truncated-MTT terms for CPU.
//
// Determinism: the flat vector is cut into fixed blocks of kBlock elements,
// each handled by one thread. Inside a block, chunks of kChunk elements are
// summed in the math dtype (float32 for float32/float16/bfloat16 inputs,
// float64 for float64) with SIMD lanes, and the chunk sums are added in float64;
// the block partials are then added in block order in float64. Short float32
// runs keep the error near float32 rounding of one chunk (a single float32 sum
// over a whole block loses ~2e-6 relative), and the result depends only on the
// input, never on the thread count or scheduling.
#include "ld3m_fast_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <vector>

namespace ld3m_fast {
namespace {

constexpr int64_t kBlock = 1 << 13;
constexpr int64_t kChunk = 256;

int64_t block_count(int64_t n) { return (n + kBlock - 1) / kBlock; }

void check_flat(const at::Tensor& reference, const at::Tensor& other, const char* what) {
  TORCH_CHECK(other.device().is_cpu(), "tm_distance (C++): ", what, " must be a CPU tensor");
  TORCH_CHECK(other.scalar_type() == reference.scalar_type(), "tm_distance (C++): ", what,
              " has dtype ", other.scalar_type(), ", expected ", reference.scalar_type());
  TORCH_CHECK(other.numel() == reference.numel(), "tm_distance (C++): ", what,
              " has ", other.numel(), " elements, expected ", reference.numel());
  TORCH_CHECK(other.is_contiguous(), "tm_distance (C++): ", what,
              " must be contiguous (the launcher copies it otherwise)");
}

at::Tensor stats_tensor(const at::Tensor& like, double a, double b, double c) {
  const auto dtype = like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor stats = at::empty({3}, like.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "stats_tensor", [&] {
    scalar_t* out = stats.mutable_data_ptr<scalar_t>();
    out[0] = static_cast<scalar_t>(a);
    out[1] = static_cast<scalar_t>(b);
    out[2] = static_cast<scalar_t>(c);
  });
  return stats;
}

template <typename scalar_t>
void distance_sums(const at::Tensor& student, const at::Tensor& start, const at::Tensor& target,
                   double& numerator, double& denominator) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ s = student.const_data_ptr<scalar_t>();
  const scalar_t* __restrict__ s0 = start.const_data_ptr<scalar_t>();
  const scalar_t* __restrict__ t = target.const_data_ptr<scalar_t>();
  const int64_t n = student.numel();
  const int64_t n_blocks = block_count(n);
  std::vector<double> num_partial(n_blocks), den_partial(n_blocks);
  at::parallel_for(0, n_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t block_end_index = std::min(n, (block + 1) * kBlock);
      double block_num = 0.0, block_den = 0.0;
      for (int64_t begin = block * kBlock; begin < block_end_index; begin += kChunk) {
        const int64_t end = std::min(block_end_index, begin + kChunk);
        acc_t num = 0, den = 0;
#pragma omp simd reduction(+ : num, den)
        for (int64_t j = begin; j < end; ++j) {
          const acc_t tj = static_cast<acc_t>(t[j]);
          const acc_t d_student = static_cast<acc_t>(s[j]) - tj;
          const acc_t d_start = static_cast<acc_t>(s0[j]) - tj;
          num += d_student * d_student;
          den += d_start * d_start;
        }
        block_num += static_cast<double>(num);
        block_den += static_cast<double>(den);
      }
      num_partial[block] = block_num;
      den_partial[block] = block_den;
    }
  });
  numerator = 0.0;
  denominator = 0.0;
  for (int64_t block = 0; block < n_blocks; ++block) {
    numerator += num_partial[block];
    denominator += den_partial[block];
  }
}

template <typename scalar_t, bool kStudent, bool kStart, bool kTarget>
void distance_grads(const at::Tensor& student, const at::Tensor& start, const at::Tensor& target,
                    double coef_student, double coef_start, scalar_t* g_student,
                    scalar_t* g_start, scalar_t* g_target) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ s = student.const_data_ptr<scalar_t>();
  const scalar_t* __restrict__ s0 = start.const_data_ptr<scalar_t>();
  const scalar_t* __restrict__ t = target.const_data_ptr<scalar_t>();
  const acc_t c_student = static_cast<acc_t>(coef_student);
  const acc_t c_start = static_cast<acc_t>(coef_start);
  const int64_t n = student.numel();
  at::parallel_for(0, block_count(n), 1, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t begin = block * kBlock;
      const int64_t end = std::min(n, begin + kBlock);
#pragma omp simd
      for (int64_t j = begin; j < end; ++j) {
        const acc_t tj = static_cast<acc_t>(t[j]);
        const acc_t gs = c_student * (static_cast<acc_t>(s[j]) - tj);
        const acc_t g0 = c_start * (static_cast<acc_t>(s0[j]) - tj);
        if (kStudent) g_student[j] = static_cast<scalar_t>(gs);
        if (kStart) g_start[j] = static_cast<scalar_t>(g0);
        if (kTarget) g_target[j] = static_cast<scalar_t>(-(gs + g0));
      }
    }
  });
}

template <typename scalar_t>
void dispatch_distance_grads(const at::Tensor& student, const at::Tensor& start,
                             const at::Tensor& target, double cs, double c0, scalar_t* gs,
                             scalar_t* g0, scalar_t* gt) {
  // One instantiation per set of requested gradients keeps the inner loop branch-free.
  const int mask = (gs ? 4 : 0) | (g0 ? 2 : 0) | (gt ? 1 : 0);
  switch (mask) {
    case 7: distance_grads<scalar_t, true, true, true>(student, start, target, cs, c0, gs, g0, gt); break;
    case 6: distance_grads<scalar_t, true, true, false>(student, start, target, cs, c0, gs, g0, gt); break;
    case 5: distance_grads<scalar_t, true, false, true>(student, start, target, cs, c0, gs, g0, gt); break;
    case 4: distance_grads<scalar_t, true, false, false>(student, start, target, cs, c0, gs, g0, gt); break;
    case 3: distance_grads<scalar_t, false, true, true>(student, start, target, cs, c0, gs, g0, gt); break;
    case 2: distance_grads<scalar_t, false, true, false>(student, start, target, cs, c0, gs, g0, gt); break;
    case 1: distance_grads<scalar_t, false, false, true>(student, start, target, cs, c0, gs, g0, gt); break;
    default: break;
  }
}

template <typename scalar_t>
void mtt_terms(const at::Tensor& start, const at::Tensor& grad_sum, const at::Tensor& target,
               double alpha_value, at::Tensor& v, double& rr, double& gr, double& dd) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ s0 = start.const_data_ptr<scalar_t>();
  const scalar_t* __restrict__ g = grad_sum.const_data_ptr<scalar_t>();
  const scalar_t* __restrict__ t = target.const_data_ptr<scalar_t>();
  scalar_t* __restrict__ out = v.mutable_data_ptr<scalar_t>();
  const acc_t alpha = static_cast<acc_t>(alpha_value);
  const int64_t n = start.numel();
  const int64_t n_blocks = block_count(n);
  std::vector<double> rr_partial(n_blocks), gr_partial(n_blocks), dd_partial(n_blocks);
  // Pass 1: the three reductions; r is parked in v so pass 2 need not re-read the inputs.
  at::parallel_for(0, n_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t block_end_index = std::min(n, (block + 1) * kBlock);
      double block_rr = 0.0, block_gr = 0.0, block_dd = 0.0;
      for (int64_t begin = block * kBlock; begin < block_end_index; begin += kChunk) {
        const int64_t end = std::min(block_end_index, begin + kChunk);
        acc_t sum_rr = 0, sum_gr = 0, sum_dd = 0;
#pragma omp simd reduction(+ : sum_rr, sum_gr, sum_dd)
        for (int64_t j = begin; j < end; ++j) {
          const acc_t tj = static_cast<acc_t>(t[j]);
          const acc_t gj = static_cast<acc_t>(g[j]);
          const acc_t d = static_cast<acc_t>(s0[j]) - tj;
          const acc_t r = static_cast<acc_t>(s0[j]) - alpha * gj - tj;
          out[j] = static_cast<scalar_t>(r);
          sum_rr += r * r;
          sum_gr += gj * r;
          sum_dd += d * d;
        }
        block_rr += static_cast<double>(sum_rr);
        block_gr += static_cast<double>(sum_gr);
        block_dd += static_cast<double>(sum_dd);
      }
      rr_partial[block] = block_rr;
      gr_partial[block] = block_gr;
      dd_partial[block] = block_dd;
    }
  });
  rr = gr = dd = 0.0;
  for (int64_t block = 0; block < n_blocks; ++block) {
    rr += rr_partial[block];
    gr += gr_partial[block];
    dd += dd_partial[block];
  }
  // Pass 2 (elementwise): v = -2 alpha r / D needs D, known only after pass 1.
  const acc_t scale = static_cast<acc_t>(-2.0 * alpha_value / dd);
  at::parallel_for(0, n_blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t begin = block * kBlock;
      const int64_t end = std::min(n, begin + kBlock);
#pragma omp simd
      for (int64_t j = begin; j < end; ++j) {
        out[j] = static_cast<scalar_t>(scale * static_cast<acc_t>(out[j]));
      }
    }
  });
}

}  // namespace

at::Tensor tm_distance_forward(const at::Tensor& student, const at::Tensor& start,
                               const at::Tensor& target) {
  check_flat(student, student, "student");
  check_flat(student, start, "start");
  check_flat(student, target, "target");
  double numerator = 0.0, denominator = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "tm_distance_forward", [&] {
    distance_sums<scalar_t>(student, start, target, numerator, denominator);
  });
  return stats_tensor(student, numerator / denominator, numerator, denominator);
}

void tm_distance_backward(const at::Tensor& student, const at::Tensor& start,
                          const at::Tensor& target, double coef_student, double coef_start,
                          std::optional<at::Tensor> grad_student,
                          std::optional<at::Tensor> grad_start,
                          std::optional<at::Tensor> grad_target) {
  check_flat(student, student, "student");
  check_flat(student, start, "start");
  check_flat(student, target, "target");
  for (const auto* out : {&grad_student, &grad_start, &grad_target}) {
    if (out->has_value()) check_flat(student, out->value(), "a gradient output");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "tm_distance_backward", [&] {
    auto pointer = [](std::optional<at::Tensor>& t) -> scalar_t* {
      return t.has_value() ? t->mutable_data_ptr<scalar_t>() : nullptr;
    };
    dispatch_distance_grads<scalar_t>(student, start, target, coef_student, coef_start,
                                      pointer(grad_student), pointer(grad_start),
                                      pointer(grad_target));
  });
}

at::Tensor mtt_truncated_terms(const at::Tensor& start, const at::Tensor& grad_sum,
                               const at::Tensor& target, double alpha, at::Tensor& v) {
  check_flat(start, start, "start");
  check_flat(start, grad_sum, "grad_sum");
  check_flat(start, target, "target");
  check_flat(start, v, "v");
  double rr = 0.0, gr = 0.0, dd = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, start.scalar_type(), "mtt_truncated_terms", [&] {
    mtt_terms<scalar_t>(start, grad_sum, target, alpha, v, rr, gr, dd);
  });
  return stats_tensor(start, rr / dd, -2.0 * gr / dd, dd);
}

}  // namespace ld3m_fast
