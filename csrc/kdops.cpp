// kdops._C: every op schema, declared once. Kernels register per device in csrc/cpu/*.cpp
// (TORCH_LIBRARY_IMPL(kdops, CPU, m)) and csrc/cuda/*_api.cpp (TORCH_LIBRARY_IMPL(kdops, CUDA, m));
// autograd and fake (meta) kernels are registered from Python (kdops/ops/*.py).
#include <Python.h>
#include <torch/library.h>

#ifndef KDOPS_WITH_CUDA
#define KDOPS_WITH_CUDA 0
#endif

// An importable module so that `import kdops._C` loads this library and runs the
// registrations below; the ops themselves are reached through torch.ops.kdops.
static struct PyModuleDef kdops_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&kdops_module);
  if (module != nullptr) {
    PyModule_AddIntConstant(module, "with_cuda", KDOPS_WITH_CUDA);
  }
  return module;
}

TORCH_LIBRARY(kdops, m) {
  // Softmax-normalised KL (kdops/ops/softmax_kl.py). student, teacher: (N, C, *spatial).
  // channel_kl: loss (0-dim) and row_stats (N*C, 5) = per row (n, c)
  // [max_s, log z_s, max_t, log z_t, KL of the row], where max_x is a logit of the row (raw,
  // unscaled units) and z_x = Σ exp((x − max_x)/τ), so that log softmax(x/τ) =
  // (x − max_x)/τ − log z_x is formed shift-safe; float32 (float64 for float64 inputs).
  // pixel_kl: loss and num_valid (0-dim int64, the pixels counted).
  // The backward ops return an empty tensor for a gradient not requested.
  m.def("channel_kl(Tensor student, Tensor teacher, float tau) -> (Tensor loss, Tensor row_stats)");
  m.def(
      "channel_kl_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor row_stats, "
      "float tau, bool student_requires_grad, bool teacher_requires_grad) "
      "-> (Tensor grad_student, Tensor grad_teacher)");
  m.def(
      "pixel_kl(Tensor student, Tensor teacher, Tensor? target, int ignore_index, float tau) "
      "-> (Tensor loss, Tensor num_valid)");
  m.def(
      "pixel_kl_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? target, "
      "Tensor num_valid, int ignore_index, float tau, bool student_requires_grad, "
      "bool teacher_requires_grad) -> (Tensor grad_student, Tensor grad_teacher)");

  // Channel correlations (kdops/ops/correlation.py). x, student, teacher: (N, C, *spatial).
  // channel_correlation: gram (N, C, C) normalised per norm ("row" | "l" | "none") and row_norms
  // (N, C), the L2 norms of the raw Gram's rows. pairwise_affinity_loss: loss and norms (N, 2, L),
  // the per-pixel channel norms of student and teacher (float64). The rest in float32 (float64
  // for float64 inputs). The backward ops recompute the Gram matrices; they return an empty tensor for a
  // gradient not requested. detach_norm: the per-pixel norm is a constant for the gradient (the
  // forward op takes it only for its autograd formula; the loss does not depend on it).
  m.def("channel_correlation(Tensor x, str norm) -> (Tensor gram, Tensor row_norms)");
  m.def(
      "channel_correlation_backward(Tensor grad_gram, Tensor x, Tensor gram, Tensor row_norms, "
      "str norm) -> Tensor grad_x");
  m.def("channel_correlation_loss(Tensor student, Tensor teacher, str norm) -> Tensor loss");
  m.def(
      "channel_correlation_loss_backward(Tensor grad_loss, Tensor student, Tensor teacher, "
      "str norm, bool student_requires_grad, bool teacher_requires_grad) "
      "-> (Tensor grad_student, Tensor grad_teacher)");
  m.def(
      "pairwise_affinity_loss(Tensor student, Tensor teacher, bool detach_norm) "
      "-> (Tensor loss, Tensor norms)");
  m.def(
      "pairwise_affinity_loss_backward(Tensor grad_loss, Tensor student, Tensor teacher, "
      "Tensor norms, bool detach_norm, bool student_requires_grad, bool teacher_requires_grad) "
      "-> (Tensor grad_student, Tensor grad_teacher)");
}
