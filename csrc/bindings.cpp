// Python bindings of the CPU kernels: one extension module, `ld3m_fast._C` when
// built ahead of time by setup.py, or the just-in-time build of
// ld3m_fast/ops/_native.py. The torch.library registration (dispatch, fake
// tensors, autograd) lives in ld3m_fast/ops/; these functions are the raw kernels.
#include <torch/extension.h>

#include "ld3m_fast_ops.h"

// Hash of the C++ sources this module was compiled from (`source_hash()` in
// ld3m_fast/ops/_native.py, passed as -DLD3M_FAST_SOURCE_HASH=<hex> by both
// builds): an ahead-of-time build older than csrc/ is detected and not used.
#ifndef LD3M_FAST_SOURCE_HASH
#define LD3M_FAST_SOURCE_HASH unknown
#endif
#define LD3M_FAST_STRINGIFY_(x) #x
#define LD3M_FAST_STRINGIFY(x) LD3M_FAST_STRINGIFY_(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  // The kernels never touch Python objects: release the GIL while they run.
  auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.attr("source_hash") = LD3M_FAST_STRINGIFY(LD3M_FAST_SOURCE_HASH);
  m.def("ld3m_step_forward", &ld3m_fast::ld3m_step_forward, no_gil,
        "out = sum_k coefficients[k] * inputs[k] (one pass)");
  m.def("ld3m_step_backward", &ld3m_fast::ld3m_step_backward, no_gil,
        "outs[k] = coefficients[k] * grad (grad read once)");
  m.def("tm_distance_forward", &ld3m_fast::tm_distance_forward, no_gil,
        "[loss, ||student-target||^2, ||start-target||^2] in one pass");
  m.def("tm_distance_backward", &ld3m_fast::tm_distance_backward, no_gil,
        "gradients of the distance w.r.t. student/start/target (optional outputs)");
  m.def("mtt_truncated_terms", &ld3m_fast::mtt_truncated_terms, no_gil,
        "fills v, returns [loss, dloss_dalpha, denominator]");
}
