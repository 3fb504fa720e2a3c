// The torch side of the CUDA kernels of channel_kl and pixel_kl (csrc/cuda/softmax_kl.cu) and of
// resized_pixel_kl (csrc/cuda/resized_pixel_kl.cu): checks the arguments, reads the tensors as
// (N, C, L) element strides (resized_pixel_kl: (N, C, h, w), any strides, never copied), fills
// the launch parameters, launches on the current stream of the inputs' device, and registers the
// ops for the CUDA dispatch key.
//
// Inputs whose spatial dims merge into one stride run without a copy (any such strides; which are
// fast is said in softmax_kl.cu); others are copied once into contiguous tensors. A gradient is
// returned in the tensor empty_like(input) gives (what the fake kernels promise); when its
// spatial dims cannot merge it is written to a contiguous buffer and copied in once.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "common/softmax_kl.h"
#include "common/tensor_layout.h"
#include "cuda/resized_pixel_kl.h"
#include "cuda/softmax_kl.h"

namespace kdops {
namespace cuda {
namespace {

using at::Tensor;


DType dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "the CUDA kernels take float32, float16 or bfloat16 student, got ",
                       x.scalar_type(), " (float64 runs on the reference backend)");
  }
}

void check_pair(const Tensor& student, const Tensor& teacher) {
  TORCH_CHECK_VALUE(student.dim() >= 2, "student must have shape (N, C, *spatial), got ",
                    student.sizes());
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "teacher must have the shape of student (",
                    student.sizes(), "), got ", teacher.sizes());
  dtype_of(student);
  TORCH_CHECK_TYPE(teacher.scalar_type() == student.scalar_type(),
                   "teacher must have the dtype of student (", student.scalar_type(), "), got ",
                   teacher.scalar_type());
  TORCH_CHECK_VALUE(student.is_cuda() && teacher.device() == student.device(),
                    "student and teacher must be on one CUDA device, got ", student.device(),
                    " and ", teacher.device());
  TORCH_CHECK_VALUE(student.numel() > 0, "student must not be empty, got shape ", student.sizes());
}

void check_tau(double tau) {
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, "tau must be finite and > 0, got ", tau);
}

void check_on_device(const char* name, const Tensor& x, const Tensor& student) {
  TORCH_CHECK_VALUE(x.numel() == 1, name, " must hold one element, got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.device() == student.device(), name, " must be on the device of student (",
                    student.device(), "), got ", x.device());
}

// target: integers of shape (N, *spatial), on the device of student; `spatial_name` says what the
// spatial dims are in the message.
void check_target_shape(const std::optional<Tensor>& target, const Tensor& student,
                        at::IntArrayRef spatial, const char* spatial_name) {
  if (!target.has_value()) return;
  TORCH_CHECK_TYPE(at::isIntegralType(target->scalar_type(), /*includeBool=*/false),
                   "target must be an integer tensor, got ", target->scalar_type());
  std::vector<int64_t> expected{student.size(0)};
  expected.insert(expected.end(), spatial.begin(), spatial.end());
  TORCH_CHECK_VALUE(target->sizes() == at::IntArrayRef(expected), "target must have shape ",
                    at::IntArrayRef(expected), " (N, ", spatial_name, "), got ", target->sizes());
  TORCH_CHECK_VALUE(target->device() == student.device(),
                    "target must be on the device of student (", student.device(), "), got ",
                    target->device());
}

void check_target(const std::optional<Tensor>& target, const Tensor& student) {
  check_target_shape(target, student, student.sizes().slice(2), "*spatial of student");
}

// resized_pixel_kl: 4-D inputs, size = (H, W) positive, target (N, H, W).
void check_resize(const Tensor& student, at::IntArrayRef size,
                  const std::optional<Tensor>& target) {
  TORCH_CHECK_VALUE(student.dim() == 4, "student must have shape (N, C, h, w), got ",
                    student.sizes());
  TORCH_CHECK_VALUE(size.size() == 2 && size[0] >= 1 && size[1] >= 1,
                    "size must be (H, W) with H, W >= 1, got ", size);
  check_target_shape(target, student, size, "*size");
}

// Labels as int64 with mergeable spatial dims (O(pixels), C times smaller than the logits:
// other integer dtypes are copied once).
Tensor labels_of(const std::optional<Tensor>& target) {
  if (!target.has_value()) return Tensor();
  Tensor labels = target->to(at::kLong);
  return merged_stride(labels, 1) ? labels : labels.contiguous();
}

int num_sms(const Tensor& x) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, x.get_device()));
  return count;
}

Tensor workspace(size_t bytes, const Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// The inputs' pointers, (N, C, L) strides and sizes, dtype, 1/τ and the device's SM count.
void fill_inputs(KLInputs& p, const Tensor& s, const Tensor& t, double tau) {
  p.student = s.const_data_ptr();
  p.teacher = t.const_data_ptr();
  p.student_strides = *row_strides(s);
  p.teacher_strides = *row_strides(t);
  p.n = s.size(0);
  p.c = s.size(1);
  p.l = s.numel() / (p.n * p.c);
  p.dtype = dtype_of(s);
  p.inv_tau = static_cast<float>(1.0 / tau);
  p.num_sms = num_sms(s);
}

void fill_target(PixelTarget& p, const Tensor& labels, int64_t ignore_index) {
  if (labels.defined()) {
    p.target = labels.const_data_ptr<int64_t>();
    p.target_stride_n = labels.stride(0);
    p.target_stride_l = *merged_stride(labels, 1);
  }
  p.ignore_index = ignore_index;
}

void fill_gradients(KLGradients& p, const std::optional<GradOut>& grad_s,
                    const std::optional<GradOut>& grad_t) {
  if (grad_s) {
    p.grad_student = grad_s->written.data_ptr();
    p.grad_student_strides = *row_strides(grad_s->written);
  }
  if (grad_t) {
    p.grad_teacher = grad_t->written.data_ptr();
    p.grad_teacher_strides = *row_strides(grad_t->written);
  }
}

std::tuple<Tensor, Tensor> channel_kl_cuda(const Tensor& student, const Tensor& teacher,
                                           double tau) {
  check_pair(student, teacher);
  check_tau(tau);
  const c10::cuda::CUDAGuard device_guard(student.device());
  const Tensor s = readable(student), t = readable(teacher);
  const int64_t n = s.size(0), c = s.size(1);
  const auto f32 = s.options().dtype(at::kFloat);
  Tensor loss = at::empty({}, f32);
  Tensor row_stats = at::empty({n * c, kKLRowStats}, f32);

  ChannelKLForwardParams p{};
  fill_inputs(p, s, t, tau);
  p.loss_scale = static_cast<float>(tau * tau / static_cast<double>(n * c));
  p.loss = loss.data_ptr<float>();
  p.row_stats = row_stats.data_ptr<float>();
  const Tensor scratch = workspace(channel_kl_forward_workspace_bytes(p), s);
  p.workspace = scratch.data_ptr();
  C10_CUDA_CHECK(launch_channel_kl_forward(p, c10::cuda::getCurrentCUDAStream()));
  return {loss, row_stats};
}

std::tuple<Tensor, Tensor> channel_kl_backward_cuda(const Tensor& grad_loss, const Tensor& student,
                                                    const Tensor& teacher, const Tensor& row_stats,
                                                    double tau, bool student_requires_grad,
                                                    bool teacher_requires_grad) {
  check_pair(student, teacher);
  check_tau(tau);
  check_on_device("grad_loss", grad_loss, student);
  const int64_t n = student.size(0), c = student.size(1);
  TORCH_CHECK_VALUE(
      row_stats.dim() == 2 && row_stats.size(0) == n * c && row_stats.size(1) == kKLRowStats,
      "row_stats must have shape (N*C, ", kKLRowStats, ") = (", n * c, ", ", kKLRowStats, "), got ",
      row_stats.sizes());
  TORCH_CHECK_TYPE(row_stats.scalar_type() == at::kFloat, "row_stats must be float32, got ",
                   row_stats.scalar_type());
  TORCH_CHECK_VALUE(row_stats.device() == student.device(),
                    "row_stats must be on the device of student (", student.device(), "), got ",
                    row_stats.device());
  const Tensor none = at::empty({0}, student.options());
  if (!student_requires_grad && !teacher_requires_grad) return {none, none};

  const c10::cuda::CUDAGuard device_guard(student.device());
  const Tensor s = readable(student), t = readable(teacher);
  const Tensor stats = row_stats.contiguous();
  const Tensor g = grad_loss.to(at::kFloat).contiguous();
  std::optional<GradOut> grad_s, grad_t;
  if (student_requires_grad) grad_s.emplace(student);
  if (teacher_requires_grad) grad_t.emplace(teacher);

  ChannelKLBackwardParams p{};
  fill_inputs(p, s, t, tau);
  fill_gradients(p, grad_s, grad_t);
  p.tau_over_rows = static_cast<float>(tau / static_cast<double>(n * c));
  p.grad_loss = g.const_data_ptr<float>();
  p.row_stats = stats.const_data_ptr<float>();
  C10_CUDA_CHECK(launch_channel_kl_backward(p, c10::cuda::getCurrentCUDAStream()));
  if (grad_s) grad_s->finish();
  if (grad_t) grad_t->finish();
  return {grad_s ? grad_s->result : none, grad_t ? grad_t->result : none};
}

std::tuple<Tensor, Tensor> pixel_kl_cuda(const Tensor& student, const Tensor& teacher,
                                         const std::optional<Tensor>& target, int64_t ignore_index,
                                         double tau) {
  check_pair(student, teacher);
  check_tau(tau);
  check_target(target, student);
  const c10::cuda::CUDAGuard device_guard(student.device());
  const Tensor s = readable(student), t = readable(teacher);
  const Tensor labels = labels_of(target);
  Tensor loss = at::empty({}, s.options().dtype(at::kFloat));
  Tensor num_valid = at::empty({}, s.options().dtype(at::kLong));

  PixelKLForwardParams p{};
  fill_inputs(p, s, t, tau);
  fill_target(p, labels, ignore_index);
  p.tau_sq = static_cast<float>(tau * tau);
  p.loss = loss.data_ptr<float>();
  p.num_valid = num_valid.data_ptr<int64_t>();
  const Tensor scratch = workspace(pixel_kl_forward_workspace_bytes(p), s);
  p.workspace = scratch.data_ptr();
  C10_CUDA_CHECK(launch_pixel_kl_forward(p, c10::cuda::getCurrentCUDAStream()));
  return {loss, num_valid};
}

std::tuple<Tensor, Tensor> pixel_kl_backward_cuda(const Tensor& grad_loss, const Tensor& student,
                                                  const Tensor& teacher,
                                                  const std::optional<Tensor>& target,
                                                  const Tensor& num_valid, int64_t ignore_index,
                                                  double tau, bool student_requires_grad,
                                                  bool teacher_requires_grad) {
  check_pair(student, teacher);
  check_tau(tau);
  check_target(target, student);
  check_on_device("grad_loss", grad_loss, student);
  check_on_device("num_valid", num_valid, student);
  const Tensor none = at::empty({0}, student.options());
  if (!student_requires_grad && !teacher_requires_grad) return {none, none};

  const c10::cuda::CUDAGuard device_guard(student.device());
  const Tensor s = readable(student), t = readable(teacher);
  const Tensor labels = labels_of(target);
  const Tensor g = grad_loss.to(at::kFloat).contiguous();
  const Tensor count = num_valid.to(at::kLong).contiguous();
  std::optional<GradOut> grad_s, grad_t;
  if (student_requires_grad) grad_s.emplace(student);
  if (teacher_requires_grad) grad_t.emplace(teacher);

  PixelKLBackwardParams p{};
  fill_inputs(p, s, t, tau);
  fill_target(p, labels, ignore_index);
  fill_gradients(p, grad_s, grad_t);
  p.tau = static_cast<float>(tau);
  p.grad_loss = g.const_data_ptr<float>();
  p.num_valid = count.const_data_ptr<int64_t>();
  C10_CUDA_CHECK(launch_pixel_kl_backward(p, c10::cuda::getCurrentCUDAStream()));
  if (grad_s) grad_s->finish();
  if (grad_t) grad_t->finish();
  return {grad_s ? grad_s->result : none, grad_t ? grad_t->result : none};
}

Strides4 strides4(const Tensor& x) {
  return Strides4{x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
}

// The inputs' pointers and strides, the resize, the labels (int64, any strides), 1/τ and the
// device's SM count.
void fill_resized_inputs(ResizedKLInputs& p, const Tensor& s, const Tensor& t, double tau,
                         at::IntArrayRef size, bool align_corners, const Tensor& labels,
                         int64_t ignore_index) {
  p.student = s.const_data_ptr();
  p.teacher = t.const_data_ptr();
  p.student_strides = strides4(s);
  p.teacher_strides = strides4(t);
  p.n = s.size(0);
  p.c = s.size(1);
  p.rows = bilinear_axis(s.size(2), size[0], align_corners);
  p.cols = bilinear_axis(s.size(3), size[1], align_corners);
  p.dtype = dtype_of(s);
  p.inv_tau = static_cast<float>(1.0 / tau);
  p.num_sms = num_sms(s);
  if (labels.defined()) {
    p.target = labels.const_data_ptr<int64_t>();
    p.target_stride_n = labels.stride(0);
    p.target_stride_h = labels.stride(1);
    p.target_stride_w = labels.stride(2);
  }
  p.ignore_index = ignore_index;
}

std::tuple<Tensor, Tensor> resized_pixel_kl_cuda(const Tensor& student, const Tensor& teacher,
                                                 const std::optional<Tensor>& target,
                                                 int64_t ignore_index, double tau,
                                                 at::IntArrayRef size, bool align_corners) {
  check_pair(student, teacher);
  check_tau(tau);
  check_resize(student, size, target);
  const c10::cuda::CUDAGuard device_guard(student.device());
  const Tensor labels = target.has_value() ? target->to(at::kLong) : Tensor();
  Tensor loss = at::empty({}, student.options().dtype(at::kFloat));
  Tensor num_valid = at::empty({}, student.options().dtype(at::kLong));

  ResizedPixelKLForwardParams p{};
  fill_resized_inputs(p, student, teacher, tau, size, align_corners, labels, ignore_index);
  p.tau_sq = static_cast<float>(tau * tau);
  p.loss = loss.data_ptr<float>();
  p.num_valid = num_valid.data_ptr<int64_t>();
  const Tensor scratch = workspace(resized_pixel_kl_forward_workspace_bytes(p), student);
  p.workspace = scratch.data_ptr();
  C10_CUDA_CHECK(launch_resized_pixel_kl_forward(p, c10::cuda::getCurrentCUDAStream()));
  return {loss, num_valid};
}

std::tuple<Tensor, Tensor> resized_pixel_kl_backward_cuda(
    const Tensor& grad_loss, const Tensor& student, const Tensor& teacher,
    const std::optional<Tensor>& target, const Tensor& num_valid, int64_t ignore_index, double tau,
    at::IntArrayRef size, bool align_corners, bool student_requires_grad,
    bool teacher_requires_grad) {
  check_pair(student, teacher);
  check_tau(tau);
  check_resize(student, size, target);
  check_on_device("grad_loss", grad_loss, student);
  check_on_device("num_valid", num_valid, student);
  const Tensor none = at::empty({0}, student.options());
  if (!student_requires_grad && !teacher_requires_grad) return {none, none};

  const c10::cuda::CUDAGuard device_guard(student.device());
  const Tensor labels = target.has_value() ? target->to(at::kLong) : Tensor();
  const Tensor g = grad_loss.to(at::kFloat).contiguous();
  const Tensor count = num_valid.to(at::kLong).contiguous();
  // empty_like keeps the input's layout (dense strides, or contiguous): written in place.
  const Tensor grad_s = student_requires_grad ? at::empty_like(student) : none;
  const Tensor grad_t = teacher_requires_grad ? at::empty_like(teacher) : none;

  ResizedPixelKLBackwardParams p{};
  fill_resized_inputs(p, student, teacher, tau, size, align_corners, labels, ignore_index);
  if (student_requires_grad) {
    p.grad_student = grad_s.data_ptr();
    p.grad_student_strides = strides4(grad_s);
  }
  if (teacher_requires_grad) {
    p.grad_teacher = grad_t.data_ptr();
    p.grad_teacher_strides = strides4(grad_t);
  }
  p.tau = static_cast<float>(tau);
  p.grad_loss = g.const_data_ptr<float>();
  p.num_valid = count.const_data_ptr<int64_t>();
  const Tensor scratch = workspace(resized_pixel_kl_backward_workspace_bytes(p), student);
  p.workspace = scratch.data_ptr();
  C10_CUDA_CHECK(launch_resized_pixel_kl_backward(p, c10::cuda::getCurrentCUDAStream()));
  return {grad_s, grad_t};
}

}  // namespace
}  // namespace cuda
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("channel_kl", &kdops::cuda::channel_kl_cuda);
  m.impl("channel_kl_backward", &kdops::cuda::channel_kl_backward_cuda);
  m.impl("pixel_kl", &kdops::cuda::pixel_kl_cuda);
  m.impl("pixel_kl_backward", &kdops::cuda::pixel_kl_backward_cuda);
  m.impl("resized_pixel_kl", &kdops::cuda::resized_pixel_kl_cuda);
  m.impl("resized_pixel_kl_backward", &kdops::cuda::resized_pixel_kl_backward_cuda);
}
