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
  // unscaled units) no more than 8τ below its maximum (the kernels raise running maxima
  // lazily) and z_x = Σ exp((x − max_x)/τ), so that log softmax(x/τ) = (x − max_x)/τ − log z_x
  // is formed shift-safe; float32 (float64 for float64 inputs).
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
  // resized_pixel_kl: pixel_kl of both logits (N, C, h, w) resized bilinearly to size = (H, W)
  // (F.interpolate's source positions for align_corners; a corner of weight 0 is not read), the
  // resized logits never stored; target (N, H, W). Outputs as pixel_kl's.
  m.def(
      "resized_pixel_kl(Tensor student, Tensor teacher, Tensor? target, int ignore_index, "
      "float tau, int[2] size, bool align_corners) -> (Tensor loss, Tensor num_valid)");
  m.def(
      "resized_pixel_kl_backward(Tensor grad_loss, Tensor student, Tensor teacher, "
      "Tensor? target, Tensor num_valid, int ignore_index, float tau, int[2] size, "
      "bool align_corners, bool student_requires_grad, bool teacher_requires_grad) "
      "-> (Tensor grad_student, Tensor grad_teacher)");

  // Attention maps (kdops/ops/attention.py). x: (N, C, *spatial). The feature-sized steps only;
  // resize, spatial normalisation and the squared difference act on the maps in Python.
  // attention_reduce: map (N, *spatial) = scale·Σ_c |x_c|^p (scale 1, or 1/C when mean), float32
  // (float64 for float64 x); its backward returns grad_x (x's dtype, the layout of empty_like(x)).
  // class_attention_scores: maps (N, K, *spatial) = ReLU(Σ_c weight[k,c]·x[n,c] + bias[k]) in
  // float32 (float64 for float64 x); its backward returns (grad_x, grad_weight (K, C) and
  // grad_bias (K,) in the maps' dtype), an empty tensor for each gradient not requested.
  m.def("attention_reduce(Tensor x, float p, bool mean) -> Tensor map");
  m.def("attention_reduce_backward(Tensor grad_map, Tensor x, float p, bool mean) -> Tensor grad_x");
  // attention_loss: the whole loss in one op (x: (N, C, H, W)); loss (0-dim), and the two raw
  // maps resized to `size` (default the student's (H, W)), (N, H', W') each, for the backward.
  m.def(
      "attention_loss(Tensor student, Tensor teacher, float p, bool mean, str norm, int[]? size) "
      "-> (Tensor loss, Tensor student_map, Tensor teacher_map)");
  m.def(
      "attention_loss_backward(Tensor grad_loss, Tensor student, Tensor teacher, "
      "Tensor student_map, Tensor teacher_map, float p, bool mean, str norm, "
      "bool student_requires_grad, bool teacher_requires_grad) "
      "-> (Tensor grad_student, Tensor grad_teacher)");
  m.def("class_attention_scores(Tensor x, Tensor weight, Tensor? bias) -> Tensor maps");
  // class_attention_loss (CPU): the whole CAMD loss in one op; the maps are the two sides'
  // ReLU(W·x + b), (N, K, *spatial), for the backward. output_mask: which of (grad_student,
  // grad_teacher, grad_student_weight, grad_teacher_weight, grad_student_bias,
  // grad_teacher_bias) to compute (weights' and biases' gradients in the maps' dtype).
  m.def(
      "class_attention_loss(Tensor student, Tensor teacher, Tensor student_weight, "
      "Tensor teacher_weight, Tensor? student_bias, Tensor? teacher_bias, str norm) "
      "-> (Tensor loss, Tensor student_maps, Tensor teacher_maps)");
  m.def(
      "class_attention_loss_backward(Tensor grad_loss, Tensor student, Tensor teacher, "
      "Tensor student_weight, Tensor teacher_weight, Tensor student_maps, Tensor teacher_maps, "
      "str norm, int[] output_mask) -> Tensor[]");
  m.def(
      "class_attention_scores_backward(Tensor grad_maps, Tensor maps, Tensor x, Tensor weight, "
      "bool x_requires_grad, bool weight_requires_grad, bool bias_requires_grad) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");

  // Class prototypes (kdops/ops/prototypes.py). Features (N, C, H, W); labels (N, H_l, W_l)
  // integers, read at (H, W) by nearest neighbour. Prototypes and losses are float32 (float64
  // for float64 features); counts int64. prototype_pool: protos (N, K, C) per image or (K, C)
  // per batch, counts (N, K) or (K,); normalize_features pools x / max(‖x‖, 1e-12) per pixel.
  // class_variation_loss also returns what its backward
  // needs: both sides' per-image prototypes (N, K, C) and the counts (N, K).
  // The backward ops return an empty tensor for a gradient not requested.
  m.def(
      "prototype_pool(Tensor x, Tensor labels, int num_classes, int ignore_index, bool per_image, "
      "bool normalize_features) -> (Tensor protos, Tensor counts)");
  m.def(
      "prototype_pool_backward(Tensor grad_protos, Tensor x, Tensor labels, Tensor counts, "
      "int ignore_index, bool normalize_features) -> Tensor grad_x");
  m.def(
      "prototype_kl(Tensor student, Tensor teacher, Tensor student_protos, Tensor teacher_protos, "
      "Tensor counts, float tau) -> Tensor loss");
  m.def(
      "prototype_kl_backward(Tensor grad_loss, Tensor student, Tensor teacher, "
      "Tensor student_protos, Tensor teacher_protos, Tensor counts, float tau, "
      "bool student_requires_grad, bool teacher_requires_grad, bool student_protos_requires_grad, "
      "bool teacher_protos_requires_grad) -> (Tensor grad_student, Tensor grad_teacher, "
      "Tensor grad_student_protos, Tensor grad_teacher_protos)");
  m.def(
      "class_variation_loss(Tensor student, Tensor teacher, Tensor labels, int num_classes, "
      "int ignore_index) -> (Tensor loss, Tensor student_protos, Tensor teacher_protos, "
      "Tensor counts)");
  m.def(
      "class_variation_loss_backward(Tensor grad_loss, Tensor student, Tensor teacher, "
      "Tensor labels, Tensor student_protos, Tensor teacher_protos, Tensor counts, "
      "int ignore_index, bool student_requires_grad, bool teacher_requires_grad) "
      "-> (Tensor grad_student, Tensor grad_teacher)");

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

  // The label check of the public API on CUDA tensors (kdops/_checks.py): bad is a 0-dim tensor,
  // non-zero when a label is out of range; the CUDA kernel turns it into a device-side assert
  // that names `argument` ("labels" or "target"), without synchronising the host.
  m.def("assert_no_bad_label(Tensor bad, str argument) -> ()");
}
