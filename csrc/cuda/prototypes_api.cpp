// The torch side of the CUDA kernels of the prototype family
// (csrc/cuda/prototypes_{pool,kl,variation}.cu): checks the arguments, reads the features as
// (N, C, L) element strides and the labels in their own dtype and strides, fills the launch
// parameters, launches on the current stream of the inputs' device, and registers the ops for the
// CUDA dispatch key: the same ops, outputs, saved tensors and semantics as
// csrc/cpu/prototypes_*.cpp. Nothing here synchronises with the device: the incoming gradient is
// read by the kernels, and a label outside [0, num_classes) that is not ignore_index becomes a
// device-side assert.
//
// Features whose spatial dims merge into one stride run without a copy (coalesced when that stride
// is 1, contiguous NCHW); others are copied once into contiguous tensors. A gradient of a feature
// is returned in the tensor empty_like(input) gives (what the fake kernels promise); when its
// spatial dims cannot merge it is written to a contiguous buffer and copied in once. The small
// (K, C) tensors (prototypes, their normalised copies and gradients) are float32 (float64 for
// float64 features), contiguous.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "common/prototypes.h"
#include "common/tensor_layout.h"
#include "cuda/device_assert.h"
#include "cuda/prototypes.h"

namespace kdops {
namespace cuda {
namespace {

using at::Tensor;

constexpr int64_t kTilePixels = 32;  // the kernels' pixel tile


ProtoDType dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return ProtoDType::kFloat32;
    case at::kHalf: return ProtoDType::kFloat16;
    case at::kBFloat16: return ProtoDType::kBFloat16;
    case at::kDouble: return ProtoDType::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, "features must be float32, float16, bfloat16 or float64, got ",
                       x.scalar_type());
  }
}

at::ScalarType acc_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

ProtoDType acc_of(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? ProtoDType::kFloat64 : ProtoDType::kFloat32;
}

ProtoFeatures features_of(const Tensor& x /* readable */) {
  return ProtoFeatures{x.const_data_ptr(), *row_strides(x), x.size(1)};
}

void check_features(const char* name, const Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4, name, " must have shape (N, C, H, W), got ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                       dtype == at::kDouble,
                   name, " must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK_VALUE(x.is_cuda(), name, " must be a CUDA tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.numel() > 0, name, " must not be empty, got shape ", x.sizes());
}

void check_pair(const Tensor& student, const Tensor& teacher) {
  check_features("student", student);
  check_features("teacher", teacher);
  TORCH_CHECK_TYPE(teacher.scalar_type() == student.scalar_type(),
                   "teacher must have the dtype of student (", student.scalar_type(), "), got ",
                   teacher.scalar_type());
  TORCH_CHECK_VALUE(teacher.device() == student.device(), "teacher must be on the device of student (",
                    student.device(), "), got ", teacher.device());
  TORCH_CHECK_VALUE(teacher.size(0) == student.size(0) && teacher.size(2) == student.size(2) &&
                        teacher.size(3) == student.size(3),
                    "teacher must have the N, H, W of student (", student.sizes(), "), got ",
                    teacher.sizes());
}

void check_on_device(const char* name, const Tensor& x, const Tensor& like) {
  TORCH_CHECK_VALUE(x.device() == like.device(), name, " must be on the device of the features (",
                    like.device(), "), got ", x.device());
}

// (groups, K, C) view of (N, K, C) or (K, C) prototypes of features with `channels` channels.
void check_protos(const char* name, const Tensor& protos, const Tensor& features) {
  TORCH_CHECK_VALUE(protos.dim() == 2 || protos.dim() == 3, name,
                    " must have shape (N, K, C) or (K, C), got ", protos.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(protos.scalar_type()), name,
                   " must be a floating tensor, got ", protos.scalar_type());
  TORCH_CHECK_VALUE(protos.dim() == 2 || protos.size(0) == features.size(0), name, " must have N=",
                    features.size(0), " images, got ", protos.sizes());
  TORCH_CHECK_VALUE(protos.size(-1) == features.size(1), name, " must have C=", features.size(1),
                    " channels, got ", protos.sizes());
  TORCH_CHECK_VALUE(protos.size(-2) >= 1, name, " must have K >= 1 classes, got ", protos.sizes());
  check_on_device(name, protos, features);
}

// (groups, K, C) acc-type contiguous copy (or the tensor itself) of (N, K, C) or (K, C) protos.
Tensor as_groups(const Tensor& protos, at::ScalarType dtype) {
  const Tensor p = protos.dim() == 2 ? protos.unsqueeze(0) : protos;
  return p.to(dtype).contiguous();
}

Tensor grad_scalar(const Tensor& grad_loss, const Tensor& like) {
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "grad_loss must hold one element, got shape ",
                    grad_loss.sizes());
  check_on_device("grad_loss", grad_loss, like);
  return grad_loss.to(acc_dtype(like)).contiguous();
}

// The labels as the kernels read them, and the flag a kernel sets on a bad label.
struct Labels {
  Tensor tensor;  // the labels, or an int64 copy for a dtype the kernels do not read
  Tensor bad;     // 0-dim int32
  ProtoLabels params{};

  // The flag becomes a device-side assert naming `labels` (no host synchronisation).
  void assert_in_range() const {
    C10_CUDA_CHECK(launch_assert_no_bad_label(bad.const_data_ptr<int32_t>(), LabelArgument::kLabels,
                                              c10::cuda::getCurrentCUDAStream()));
  }
};

Labels labels_of(const Tensor& labels, const Tensor& features, int64_t num_classes, int64_t ignore_index) {
  TORCH_CHECK_TYPE(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
                   "labels must be an integer tensor, got ", labels.scalar_type());
  const int64_t batch = features.size(0);
  TORCH_CHECK_VALUE(labels.dim() == 3 && labels.size(0) == batch && labels.numel() > 0,
                    "labels must have shape (N, H, W) with N=", batch, " and H, W >= 1, got ",
                    labels.sizes());
  check_on_device("labels", labels, features);
  TORCH_CHECK_VALUE(num_classes >= 1, "num_classes must be >= 1, got ", num_classes);
  Labels out;
  ProtoLabelDType dtype = ProtoLabelDType::kInt64;
  out.tensor = labels;
  switch (labels.scalar_type()) {
    case at::kLong: dtype = ProtoLabelDType::kInt64; break;
    case at::kInt: dtype = ProtoLabelDType::kInt32; break;
    case at::kShort: dtype = ProtoLabelDType::kInt16; break;
    case at::kChar: dtype = ProtoLabelDType::kInt8; break;
    case at::kByte: dtype = ProtoLabelDType::kUInt8; break;
    default: out.tensor = labels.to(at::kLong); break;  // the unsigned 16/32/64-bit types
  }
  out.bad = at::zeros({}, labels.options().dtype(at::kInt));
  ProtoLabels& p = out.params;
  p.data = out.tensor.const_data_ptr();
  p.dtype = dtype;
  p.stride_n = out.tensor.stride(0);
  p.stride_h = out.tensor.stride(1);
  p.stride_w = out.tensor.stride(2);
  p.in_h = out.tensor.size(1);
  p.in_w = out.tensor.size(2);
  p.height = features.size(2);
  p.width = features.size(3);
  p.scale_h = nearest_scale(p.in_h, p.height);
  p.scale_w = nearest_scale(p.in_w, p.width);
  p.num_classes = num_classes;
  p.ignore_index = ignore_index;
  p.bad_label = out.bad.data_ptr<int32_t>();
  return out;
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// Per-image class sums of (weights ·) x: (N, units, K, C) float64 partial sums and their
// (N, units, K) int32 counts.
std::tuple<Tensor, Tensor> class_sums(const Tensor& x /* readable */, const Labels& labels,
                                      const Tensor& weights = Tensor(), int64_t weights_stride_n = 0) {
  const int64_t n = x.size(0), c = x.size(1), k = labels.params.num_classes;
  const int64_t units = class_sum_units(x.size(2) * x.size(3), k);
  TORCH_CHECK_VALUE((c + 31) / 32 <= 65535, "the CUDA kernels take at most ", 65535 * 32,
                    " channels, got ", c);
  Tensor sums = at::empty({n, units, k, c}, x.options().dtype(at::kDouble));
  Tensor unit_counts = at::empty({n, units, k}, x.options().dtype(at::kInt));
  ClassSumsParams p{};
  p.x = features_of(x);
  p.labels = labels.params;
  p.n = n;
  p.dtype = dtype_of(x);
  p.weights = weights.defined() ? weights.const_data_ptr() : nullptr;
  p.weights_stride_n = weights_stride_n;
  p.sums = sums.data_ptr<double>();
  p.unit_counts = unit_counts.data_ptr<int32_t>();
  C10_CUDA_CHECK(launch_class_sums(p, stream()));
  return {sums, unit_counts};
}

// Means of the class sums: protos (N, K, C) or (K, C) in the acc type and counts (N, K) or (K,).
std::tuple<Tensor, Tensor> class_means(const Tensor& x, const Tensor& sums, const Tensor& unit_counts,
                                       bool per_image) {
  const int64_t n = x.size(0), c = x.size(1), k = sums.size(2);
  const auto options = x.options().dtype(acc_dtype(x));
  Tensor protos = per_image ? at::empty({n, k, c}, options) : at::empty({k, c}, options);
  Tensor counts = per_image ? at::empty({n, k}, x.options().dtype(at::kLong))
                            : at::empty({k}, x.options().dtype(at::kLong));
  ClassMeansParams p{};
  p.sums = sums.const_data_ptr<double>();
  p.unit_counts = unit_counts.const_data_ptr<int32_t>();
  p.n = n;
  p.units = sums.size(1);
  p.k = k;
  p.c = c;
  p.per_image = per_image;
  p.dtype = acc_of(x);
  p.protos = protos.data_ptr();
  p.counts = counts.data_ptr<int64_t>();
  C10_CUDA_CHECK(launch_class_means(p, stream()));
  return {protos, counts};
}

// Normalised prototypes: (hat, norm, inv) of (groups, K, C) acc-type contiguous prototypes.
std::tuple<Tensor, Tensor, Tensor> normalise(const Tensor& protos) {
  Tensor hat = at::empty_like(protos);
  Tensor norm = at::empty({protos.size(0), protos.size(1)}, protos.options());
  Tensor inv = at::empty_like(norm);
  NormaliseProtosParams p{};
  p.protos = protos.const_data_ptr();
  p.rows = protos.size(0) * protos.size(1);
  p.c = protos.size(2);
  p.dtype = protos.scalar_type() == at::kDouble ? ProtoDType::kFloat64 : ProtoDType::kFloat32;
  p.hat = hat.data_ptr();
  p.norm = norm.data_ptr();
  p.inv = inv.data_ptr();
  C10_CUDA_CHECK(launch_normalise_protos(p, stream()));
  return {hat, norm, inv};
}

// The gradient of (groups, K, C) prototypes from per-unit partial sums of ∂P̂ (launch_protos_grad).
Tensor protos_grad(const Tensor& partials, const Tensor& unit_counts, const Tensor& slot,
                   int64_t units_per_group, const Tensor& hat, const Tensor& norm, const Tensor& inv,
                   const Tensor& counts) {
  Tensor out = at::empty_like(hat);
  ProtosGradParams p{};
  p.partials = partials.const_data_ptr<double>();
  p.unit_counts = unit_counts.defined() ? unit_counts.const_data_ptr<int32_t>() : nullptr;
  p.slot = slot.defined() ? slot.const_data_ptr<int32_t>() : nullptr;
  p.groups = hat.size(0);
  p.units_per_group = units_per_group;
  p.k = hat.size(1);
  p.c = hat.size(2);
  p.dtype = hat.scalar_type() == at::kDouble ? ProtoDType::kFloat64 : ProtoDType::kFloat32;
  p.hat = hat.const_data_ptr();
  p.norm = norm.const_data_ptr();
  p.inv = inv.const_data_ptr();
  p.counts = counts.defined() ? counts.const_data_ptr<int64_t>() : nullptr;
  p.out = out.data_ptr();
  C10_CUDA_CHECK(launch_protos_grad(p, stream()));
  return out;
}

Tensor fixed_order_sum(const Tensor& values /* float64 */, double scale, const Tensor& like) {
  Tensor loss = at::empty({}, like.options().dtype(acc_dtype(like)));
  SumParams p{};
  p.values = values.const_data_ptr<double>();
  p.count = values.numel();
  p.scale = scale;
  p.dtype = acc_of(like);
  p.loss = loss.data_ptr();
  C10_CUDA_CHECK(launch_sum(p, stream()));
  return loss;
}

int64_t tiles_of(const Tensor& x) { return (x.size(2) * x.size(3) + kTilePixels - 1) / kTilePixels; }

// ---------------------------------------------------------------------------------------------
// prototype_pool

std::tuple<Tensor, Tensor> prototype_pool_cuda(const Tensor& x_in, const Tensor& labels_in,
                                               int64_t num_classes, int64_t ignore_index,
                                               bool per_image, bool normalize_features) {
  check_features("x", x_in);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const Labels labels = labels_of(labels_in, x_in, num_classes, ignore_index);
  const Tensor x = readable(x_in);
  const int64_t n = x.size(0), l = x.size(2) * x.size(3);
  Tensor inv_norms;
  if (normalize_features) {
    inv_norms = at::empty({n, l}, x.options().dtype(acc_dtype(x)));
    PixelInverseNormsParams p{};
    p.x = features_of(x);
    p.n = n;
    p.l = l;
    p.dtype = dtype_of(x);
    p.inv_norms = inv_norms.data_ptr();
    C10_CUDA_CHECK(launch_pixel_inverse_norms(p, stream()));
  }
  auto [sums, unit_counts] = class_sums(x, labels, inv_norms, l);
  labels.assert_in_range();
  return class_means(x, sums, unit_counts, per_image);
}

Tensor prototype_pool_backward_cuda(const Tensor& grad_protos, const Tensor& x_in, const Tensor& labels_in,
                                    const Tensor& counts, int64_t ignore_index, bool normalize_features) {
  check_features("x", x_in);
  check_protos("grad_protos", grad_protos, x_in);
  const int64_t num_classes = grad_protos.size(-2);
  TORCH_CHECK_VALUE(counts.sizes() == grad_protos.sizes().slice(0, grad_protos.dim() - 1),
                    "counts must have shape ", grad_protos.sizes().slice(0, grad_protos.dim() - 1),
                    " to match grad_protos, got ", counts.sizes());
  TORCH_CHECK_TYPE(at::isIntegralType(counts.scalar_type(), /*includeBool=*/false),
                   "counts must be an integer tensor, got ", counts.scalar_type());
  check_on_device("counts", counts, x_in);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const Labels labels = labels_of(labels_in, x_in, num_classes, ignore_index);
  const Tensor x = readable(x_in);
  const Tensor grad_groups = as_groups(grad_protos, acc_dtype(x));
  const Tensor counts64 = counts.to(at::kLong).contiguous();
  GradOut grad(x_in);
  PoolBackwardParams p{};
  p.x = features_of(x);
  p.labels = labels.params;
  p.n = x.size(0);
  p.l = x.size(2) * x.size(3);
  p.dtype = dtype_of(x);
  p.grad_protos = grad_groups.const_data_ptr();
  p.counts = counts64.const_data_ptr<int64_t>();
  p.per_image = grad_protos.dim() == 3;
  p.normalize = normalize_features;
  p.grad = grad.written.data_ptr();
  p.grad_strides = *row_strides(grad.written);
  C10_CUDA_CHECK(launch_pool_backward(p, stream()));
  labels.assert_in_range();
  grad.finish();
  return grad.result;
}

// ---------------------------------------------------------------------------------------------
// prototype_kl

void check_kl_args(const Tensor& student, const Tensor& teacher, const Tensor& student_protos,
                   const Tensor& teacher_protos, const Tensor& counts, double tau) {
  check_pair(student, teacher);
  check_protos("student_protos", student_protos, student);
  check_protos("teacher_protos", teacher_protos, teacher);
  TORCH_CHECK_VALUE(teacher_protos.sizes().slice(0, teacher_protos.dim() - 1) ==
                        student_protos.sizes().slice(0, student_protos.dim() - 1),
                    "teacher_protos must have the leading shape of student_protos (",
                    student_protos.sizes(), "), got ", teacher_protos.sizes());
  TORCH_CHECK_TYPE(at::isIntegralType(counts.scalar_type(), /*includeBool=*/false),
                   "counts must be an integer tensor, got ", counts.scalar_type());
  TORCH_CHECK_VALUE(counts.sizes() == student_protos.sizes().slice(0, student_protos.dim() - 1),
                    "counts must have shape ", student_protos.sizes().slice(0, student_protos.dim() - 1),
                    " to match student_protos, got ", counts.sizes());
  check_on_device("counts", counts, student);
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, "tau must be finite and > 0, got ", tau);
  const int64_t num_classes = student_protos.size(-2);
  TORCH_CHECK_VALUE(prototype_kl_shared_bytes(num_classes, dtype_of(student)) <= prototype_kl_max_shared_bytes(),
                    "the CUDA prototype_kl kernels hold every class's cosines of a tile in shared "
                    "memory: num_classes=", num_classes, " is too many for ", student.scalar_type(),
                    " (use backend=\"triton\" or \"reference\")");
}

// Everything the prototype_kl kernels read, prepared on the device.
struct KLSetup {
  Tensor s, t;                       // readable features
  Tensor hat_s, norm_s, inv_s;       // (G, K, Cs) ...
  Tensor hat_t, norm_t, inv_t;
  Tensor present, num_present, slot;
  PrototypeKLParams params{};
};

KLSetup kl_setup(const Tensor& student, const Tensor& teacher, const Tensor& student_protos,
                 const Tensor& teacher_protos, const Tensor& counts, double tau, bool backward) {
  KLSetup k;
  k.s = readable(student);
  k.t = readable(teacher);
  const auto acc = acc_dtype(student);
  std::tie(k.hat_s, k.norm_s, k.inv_s) = normalise(as_groups(student_protos, acc));
  std::tie(k.hat_t, k.norm_t, k.inv_t) = normalise(as_groups(teacher_protos, acc));
  const Tensor counts_groups = (counts.dim() == 1 ? counts.unsqueeze(0) : counts).to(at::kLong).contiguous();
  const int64_t groups = counts_groups.size(0), num_classes = counts_groups.size(1);
  const auto int32 = student.options().dtype(at::kInt);
  k.present = at::empty({groups, num_classes}, int32);
  k.num_present = at::empty({groups}, int32);
  k.slot = at::empty({groups, num_classes}, int32);
  PresentClassesParams pc{};
  pc.counts = counts_groups.const_data_ptr<int64_t>();
  pc.groups = groups;
  pc.k = num_classes;
  pc.present = k.present.data_ptr<int32_t>();
  pc.num_present = k.num_present.data_ptr<int32_t>();
  pc.slot = k.slot.data_ptr<int32_t>();
  C10_CUDA_CHECK(launch_present_classes(pc, stream()));

  PrototypeKLParams& p = k.params;
  p.student = features_of(k.s);
  p.teacher = features_of(k.t);
  p.n = student.size(0);
  p.l = student.size(2) * student.size(3);
  p.cs = student.size(1);
  p.ct = teacher.size(1);
  p.k = num_classes;
  p.groups = groups;
  p.dtype = dtype_of(student);
  p.hat_s = k.hat_s.const_data_ptr();
  p.hat_t = k.hat_t.const_data_ptr();
  p.present = k.present.const_data_ptr<int32_t>();
  p.num_present = k.num_present.const_data_ptr<int32_t>();
  p.inv_tau = 1.0 / tau;
  p.tiles_per_chunk = prototype_kl_tiles_per_chunk(num_classes, backward);
  p.chunks_per_image = (tiles_of(student) + p.tiles_per_chunk - 1) / p.tiles_per_chunk;
  return k;
}

Tensor prototype_kl_cuda(const Tensor& student, const Tensor& teacher, const Tensor& student_protos,
                         const Tensor& teacher_protos, const Tensor& counts, double tau) {
  check_kl_args(student, teacher, student_protos, teacher_protos, counts, tau);
  const c10::cuda::CUDAGuard device_guard(student.device());
  KLSetup k = kl_setup(student, teacher, student_protos, teacher_protos, counts, tau, /*backward=*/false);
  PrototypeKLParams& p = k.params;
  Tensor chunk_kl = at::empty({p.n * p.chunks_per_image}, student.options().dtype(at::kDouble));
  p.chunk_kl = chunk_kl.data_ptr<double>();
  C10_CUDA_CHECK(launch_prototype_kl_forward(p, stream()));
  return fixed_order_sum(chunk_kl, 1.0 / static_cast<double>(p.n * p.l), student);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> prototype_kl_backward_cuda(
    const Tensor& grad_loss, const Tensor& student, const Tensor& teacher,
    const Tensor& student_protos, const Tensor& teacher_protos, const Tensor& counts, double tau,
    bool student_requires_grad, bool teacher_requires_grad, bool student_protos_requires_grad,
    bool teacher_protos_requires_grad) {
  check_kl_args(student, teacher, student_protos, teacher_protos, counts, tau);
  const Tensor none = at::empty({0}, student.options());
  const auto protos_none = [](const Tensor& protos) { return at::empty({0}, protos.options()); };
  if (!student_requires_grad && !teacher_requires_grad && !student_protos_requires_grad &&
      !teacher_protos_requires_grad) {
    return {none, none, protos_none(student_protos), protos_none(teacher_protos)};
  }
  const c10::cuda::CUDAGuard device_guard(student.device());
  const Tensor g = grad_scalar(grad_loss, student);
  KLSetup k = kl_setup(student, teacher, student_protos, teacher_protos, counts, tau, /*backward=*/true);
  PrototypeKLParams& p = k.params;
  std::optional<GradOut> grad_s, grad_t;
  if (student_requires_grad) grad_s.emplace(student);
  if (teacher_requires_grad) grad_t.emplace(teacher);
  const int64_t chunks = p.n * p.chunks_per_image;
  const auto f64 = student.options().dtype(at::kDouble);
  Tensor partials_s, partials_t;
  if (student_protos_requires_grad) partials_s = at::empty({chunks, p.k, p.cs}, f64);
  if (teacher_protos_requires_grad) partials_t = at::empty({chunks, p.k, p.ct}, f64);
  p.grad_loss = g.const_data_ptr();
  p.grad_scale = 1.0 / (static_cast<double>(p.n * p.l) * tau);
  if (grad_s) {
    p.grad_s = grad_s->written.data_ptr();
    p.grad_s_strides = *row_strides(grad_s->written);
  }
  if (grad_t) {
    p.grad_t = grad_t->written.data_ptr();
    p.grad_t_strides = *row_strides(grad_t->written);
  }
  p.partials_s = partials_s.defined() ? partials_s.data_ptr<double>() : nullptr;
  p.partials_t = partials_t.defined() ? partials_t.data_ptr<double>() : nullptr;
  C10_CUDA_CHECK(launch_prototype_kl_backward(p, stream()));
  if (grad_s) grad_s->finish();
  if (grad_t) grad_t->finish();
  // Per group: the units are its images' chunks (every image's for per-batch prototypes).
  const int64_t units_per_group = p.groups == 1 ? chunks : p.chunks_per_image;
  const auto protos_grad_of = [&](bool wanted, const Tensor& partials, const Tensor& hat,
                                  const Tensor& norm, const Tensor& inv, const Tensor& protos) {
    if (!wanted) return protos_none(protos);
    const Tensor grad = protos_grad(partials, Tensor(), k.slot, units_per_group, hat, norm, inv, Tensor());
    return (protos.dim() == 2 ? grad.squeeze(0) : grad).to(protos.scalar_type());
  };
  return {grad_s ? grad_s->result : none, grad_t ? grad_t->result : none,
          protos_grad_of(student_protos_requires_grad, partials_s, k.hat_s, k.norm_s, k.inv_s, student_protos),
          protos_grad_of(teacher_protos_requires_grad, partials_t, k.hat_t, k.norm_t, k.inv_t, teacher_protos)};
}

// ---------------------------------------------------------------------------------------------
// class_variation_loss

VariationParams variation_params(const Tensor& s, const Tensor& t, const Labels& labels,
                                 const Tensor& hat_s, const Tensor& hat_t) {
  VariationParams p{};
  p.student = features_of(s);
  p.teacher = features_of(t);
  p.labels = labels.params;
  p.n = s.size(0);
  p.l = s.size(2) * s.size(3);
  p.cs = s.size(1);
  p.ct = t.size(1);
  p.k = labels.params.num_classes;
  p.dtype = dtype_of(s);
  p.hat_s = hat_s.const_data_ptr();
  p.hat_t = hat_t.const_data_ptr();
  return p;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> class_variation_loss_cuda(const Tensor& student,
                                                                     const Tensor& teacher,
                                                                     const Tensor& labels_in,
                                                                     int64_t num_classes,
                                                                     int64_t ignore_index) {
  check_pair(student, teacher);
  const c10::cuda::CUDAGuard device_guard(student.device());
  const Labels labels = labels_of(labels_in, student, num_classes, ignore_index);
  const Tensor s = readable(student), t = readable(teacher);
  // Pass 1: the per-image prototypes of both sides.
  auto [sums_s, unit_counts_s] = class_sums(s, labels);
  auto [protos_s, counts] = class_means(s, sums_s, unit_counts_s, /*per_image=*/true);
  auto [sums_t, unit_counts_t] = class_sums(t, labels);
  auto [protos_t, counts_t] = class_means(t, sums_t, unit_counts_t, /*per_image=*/true);
  const Tensor hat_s = std::get<0>(normalise(protos_s));
  const Tensor hat_t = std::get<0>(normalise(protos_t));
  // Pass 2: each pixel's cosine to its class's prototype, both sides.
  Tensor tile_sums = at::empty({s.size(0) * tiles_of(s)}, s.options().dtype(at::kDouble));
  VariationParams p = variation_params(s, t, labels, hat_s, hat_t);
  p.tile_sums = tile_sums.data_ptr<double>();
  C10_CUDA_CHECK(launch_variation_forward(p, stream()));
  labels.assert_in_range();
  Tensor loss = fixed_order_sum(tile_sums, 1.0 / static_cast<double>(p.n * p.l), student);
  return {loss, protos_s, protos_t, counts};
}

std::tuple<Tensor, Tensor> class_variation_loss_backward_cuda(
    const Tensor& grad_loss, const Tensor& student, const Tensor& teacher, const Tensor& labels_in,
    const Tensor& student_protos, const Tensor& teacher_protos, const Tensor& counts,
    int64_t ignore_index, bool student_requires_grad, bool teacher_requires_grad) {
  check_pair(student, teacher);
  TORCH_CHECK_VALUE(student_protos.dim() == 3, "student_protos must have shape (N, K, C), got ",
                    student_protos.sizes());
  check_protos("student_protos", student_protos, student);
  check_protos("teacher_protos", teacher_protos, teacher);
  const int64_t num_classes = student_protos.size(1);
  TORCH_CHECK_VALUE(teacher_protos.dim() == 3 && teacher_protos.size(1) == num_classes,
                    "teacher_protos must have shape (N, K=", num_classes, ", C), got ",
                    teacher_protos.sizes());
  TORCH_CHECK_VALUE(counts.dim() == 2 && counts.size(0) == student.size(0) && counts.size(1) == num_classes,
                    "counts must have shape (N, K) = (", student.size(0), ", ", num_classes, "), got ",
                    counts.sizes());
  check_on_device("counts", counts, student);
  const Tensor none = at::empty({0}, student.options());
  if (!student_requires_grad && !teacher_requires_grad) return {none, none};
  const c10::cuda::CUDAGuard device_guard(student.device());
  const Labels labels = labels_of(labels_in, student, num_classes, ignore_index);
  const Tensor g = grad_scalar(grad_loss, student);
  const Tensor s = readable(student), t = readable(teacher);
  const auto acc = acc_dtype(student);
  auto [hat_s, norm_s, inv_s] = normalise(student_protos.to(acc).contiguous());
  auto [hat_t, norm_t, inv_t] = normalise(teacher_protos.to(acc).contiguous());
  const Tensor counts64 = counts.to(at::kLong).contiguous();
  const int64_t n = s.size(0), l = s.size(2) * s.size(3);
  // Pass A: per pixel e/‖x‖ (both signs), the cosines and the norms.
  Tensor stats = at::empty({n, 6, l}, s.options().dtype(acc));
  VariationParams p = variation_params(s, t, labels, hat_s, hat_t);
  p.grad_loss = g.const_data_ptr();
  p.grad_scale = 2.0 / static_cast<double>(n * l);
  p.stats = stats.data_ptr();
  C10_CUDA_CHECK(launch_variation_backward_stats(p, stream()));
  // Pass B per side: the gradient through the prototypes (class sums of ±e x̂, through the
  // normalisation, divided by the counts), then every pixel's gradient.
  const auto side = [&](const Tensor& x, const Tensor& x_in, int which, const Tensor& hat,
                        const Tensor& norm, const Tensor& inv) {
    auto [sums, unit_counts] = class_sums(x, labels, stats.select(1, which), 6 * l);
    const Tensor pooled = protos_grad(sums, unit_counts, Tensor(), sums.size(1), hat, norm, inv, counts64);
    GradOut grad(x_in);
    VariationGradParams q{};
    q.x = features_of(x);
    q.labels = labels.params;
    q.n = n;
    q.l = l;
    q.k = num_classes;
    q.dtype = dtype_of(x);
    q.hat = hat.const_data_ptr();
    q.pooled = pooled.const_data_ptr();
    q.stats = stats.const_data_ptr();
    q.side = which;
    q.grad = grad.written.data_ptr();
    q.grad_strides = *row_strides(grad.written);
    C10_CUDA_CHECK(launch_variation_grad(q, stream()));
    grad.finish();
    return grad.result;
  };
  Tensor grad_s = student_requires_grad ? side(s, student, 0, hat_s, norm_s, inv_s) : none;
  Tensor grad_t = teacher_requires_grad ? side(t, teacher, 1, hat_t, norm_t, inv_t) : none;
  labels.assert_in_range();
  return {grad_s, grad_t};
}

}  // namespace
}  // namespace cuda
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("prototype_pool", &kdops::cuda::prototype_pool_cuda);
  m.impl("prototype_pool_backward", &kdops::cuda::prototype_pool_backward_cuda);
  m.impl("prototype_kl", &kdops::cuda::prototype_kl_cuda);
  m.impl("prototype_kl_backward", &kdops::cuda::prototype_kl_backward_cuda);
  m.impl("class_variation_loss", &kdops::cuda::class_variation_loss_cuda);
  m.impl("class_variation_loss_backward", &kdops::cuda::class_variation_loss_backward_cuda);
}
