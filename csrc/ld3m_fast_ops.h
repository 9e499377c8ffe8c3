// Declarations of the CPU kernels in this folder; bound to Python in bindings.cpp.
//
// Contract shared by every entry point: the Python launchers (ld3m_fast/ops/) have
// already checked shapes and dtypes and handed over tensors that are dense
// (non-overlapping, no gaps) with identical strides, so each kernel walks the
// storage as one flat array of numel() elements. Supported dtypes: float32,
// float16, bfloat16 (math in float32) and float64 (math in float64).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace ld3m_fast {

// out = sum_k coefficients[k] * inputs[k]   (2 <= K <= 5 inputs, one pass)
void ld3m_step_forward(const std::vector<at::Tensor>& inputs,
                       const std::vector<double>& coefficients, at::Tensor& out);

// outs[k] = coefficients[k] * grad           (1 <= K <= 5 outputs, grad read once)
void ld3m_step_backward(const at::Tensor& grad, const std::vector<double>& coefficients,
                        std::vector<at::Tensor>& outs);

// Returns [loss, numerator, denominator] with numerator = ||student - target||^2 and
// denominator = ||start - target||^2, both accumulated in one pass.
at::Tensor tm_distance_forward(const at::Tensor& student, const at::Tensor& start,
                               const at::Tensor& target);

// grad_student = coef_student * (student - target), grad_start = coef_start * (start - target),
// grad_target = -(grad_student + grad_start); each output is optional.
void tm_distance_backward(const at::Tensor& student, const at::Tensor& start,
                          const at::Tensor& target, double coef_student, double coef_start,
                          std::optional<at::Tensor> grad_student,
                          std::optional<at::Tensor> grad_start,
                          std::optional<at::Tensor> grad_target);

// Fills v = -2 alpha r / D with r = start - alpha * grad_sum - target and returns
// [loss = r.r / D, dloss_dalpha = -2 (G.r) / D, D = ||start - target||^2].
at::Tensor mtt_truncated_terms(const at::Tensor& start, const at::Tensor& grad_sum,
                               const at::Tensor& target, double alpha, at::Tensor& v);

}  // namespace ld3m_fast
