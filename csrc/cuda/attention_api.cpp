// The torch side of the CUDA kernels of the attention maps (csrc/cuda/attention.cu): checks the
// arguments, reads the features as (N, C, L) element strides, fills the launch parameters,
// launches on the current stream of the inputs' device, and registers the ops for the CUDA
// dispatch key. Nothing here synchronises with the device.
//
// Features whose spatial dims merge into one stride run without a copy; others are copied once
// into contiguous tensors. A gradient of x is returned in the tensor empty_like(x) gives (what the
// fake kernels promise); when its spatial dims cannot merge it is written to a contiguous buffer
// and copied in once. The class maps' small operands (the weight, the bias, g' = g·[maps > 0])
// are float32 tensors of the maps' or the weight's size.
//
// The class products: float32 features on cuBLAS (SGEMM with TF32 off, float32-accurate), which
// runs these skinny products near the memory bound — on the H200 the reference's whole forward
// on at::bmm took 0.22 ms at (8, 512, 64, 128) where the hand-written kernel's took 0.54 ms;
// 16-bit features on the kernel of attention.cu, which multiplies them by the float32 weight (a
// 16-bit cuBLAS product would round the weight to 16 bits).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "common/attention_loss.h"
#include "common/ieee_matmul.h"
#include "common/tensor_layout.h"
#include "cuda/attention.h"

namespace kdops {
namespace cuda {
namespace {

using at::Tensor;
using IeeeCublasGuard = IeeeMatmulGuard<at::Float32Backend::CUDA>;

AttentionDType dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return AttentionDType::kFloat32;
    case at::kHalf: return AttentionDType::kFloat16;
    case at::kBFloat16: return AttentionDType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "the CUDA kernels take float32, float16 or bfloat16 x, got ",
                       x.scalar_type(), " (float64 runs on the reference backend)");
  }
}

void check_features(const Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 3, "x must have shape (N, C, *spatial), got ", x.sizes());
  dtype_of(x);
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.numel() > 0, "x must not be empty, got shape ", x.sizes());
}

void check_p(double p) {
  TORCH_CHECK_VALUE(std::isfinite(p) && p > 0, "p must be finite and > 0, got ", p);
}

std::vector<int64_t> map_shape(const Tensor& x, std::optional<int64_t> classes = std::nullopt) {
  std::vector<int64_t> shape{x.size(0)};
  if (classes) shape.push_back(*classes);
  for (int64_t d = 2; d < x.dim(); ++d) shape.push_back(x.size(d));
  return shape;
}

AttentionReduceParams reduce_params(const Tensor& x, double p, bool mean) {
  AttentionReduceParams params{};
  params.x = x.const_data_ptr();
  params.x_strides = *row_strides(x);
  params.n = x.size(0);
  params.c = x.size(1);
  params.l = x.numel() / (params.n * params.c);
  params.dtype = dtype_of(x);
  params.kind = power_kind(p);
  params.p = static_cast<float>(p);
  params.scale = mean ? 1.f / static_cast<float>(params.c) : 1.f;
  return params;
}

Tensor attention_reduce_cuda(const Tensor& x_in, double p, bool mean) {
  check_features(x_in);
  check_p(p);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const Tensor x = readable(x_in);
  Tensor map = at::empty(map_shape(x), x.options().dtype(at::kFloat));
  AttentionReduceParams params = reduce_params(x, p, mean);
  params.map = map.data_ptr<float>();
  C10_CUDA_CHECK(launch_attention_reduce(params, c10::cuda::getCurrentCUDAStream()));
  return map;
}

Tensor attention_reduce_backward_cuda(const Tensor& grad_map, const Tensor& x_in, double p,
                                      bool mean) {
  check_features(x_in);
  check_p(p);
  TORCH_CHECK_VALUE(grad_map.sizes() == at::IntArrayRef(map_shape(x_in)),
                    "grad_map must have the map's shape ", at::IntArrayRef(map_shape(x_in)),
                    ", got ", grad_map.sizes());
  TORCH_CHECK_TYPE(grad_map.scalar_type() == at::kFloat, "grad_map must be float32, got ",
                   grad_map.scalar_type());
  TORCH_CHECK_VALUE(grad_map.device() == x_in.device(), "grad_map must be on x's device ",
                    x_in.device());
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const Tensor x = readable(x_in);
  const Tensor g = grad_map.contiguous();
  Tensor grad_x = at::empty_like(x_in);
  Tensor written = row_strides(grad_x) ? grad_x : at::empty(x_in.sizes(), x_in.options());
  AttentionReduceBackwardParams params{};
  static_cast<AttentionReduceParams&>(params) = reduce_params(x, p, mean);
  params.grad_map = g.const_data_ptr<float>();
  params.grad_x = written.data_ptr();
  params.grad_x_strides = *row_strides(written);
  C10_CUDA_CHECK(launch_attention_reduce_backward(params, c10::cuda::getCurrentCUDAStream()));
  if (!written.is_same(grad_x)) grad_x.copy_(written);
  return grad_x;
}

// ---------------------------------------------------------------------------------------------
// attention_loss: the reductions around the map-sized steps of common/attention_loss.h

void check_loss_pair(const Tensor& student, const Tensor& teacher) {
  check_features(student);
  check_features(teacher);
  TORCH_CHECK_VALUE(student.dim() == 4 && teacher.dim() == 4,
                    "student and teacher must have shape (N, C, H, W), got ", student.sizes(),
                    " and ", teacher.sizes());
  TORCH_CHECK_VALUE(teacher.size(0) == student.size(0) && teacher.device() == student.device(),
                    "teacher must have the batch size and device of student, got ",
                    teacher.sizes(), " on ", teacher.device());
  TORCH_CHECK_TYPE(teacher.scalar_type() == student.scalar_type(),
                   "teacher must have the dtype of student (", student.scalar_type(), "), got ",
                   teacher.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor> attention_loss_cuda(const Tensor& student, const Tensor& teacher,
                                                       double p, bool mean, c10::string_view norm,
                                                       at::OptionalIntArrayRef size) {
  check_loss_pair(student, teacher);
  const MapNorm map_norm_kind = map_norm(std::string_view(norm.data(), norm.size()));
  const auto out_size = loss_size(student, size);
  return attention_loss_from_maps(attention_reduce_cuda(student, p, mean),
                                  attention_reduce_cuda(teacher, p, mean), map_norm_kind, out_size);
}

std::tuple<Tensor, Tensor> attention_loss_backward_cuda(
    const Tensor& grad_loss, const Tensor& student, const Tensor& teacher,
    const Tensor& student_map, const Tensor& teacher_map, double p, bool mean,
    c10::string_view norm, bool student_requires_grad, bool teacher_requires_grad) {
  check_loss_pair(student, teacher);
  const MapNorm map_norm_kind = map_norm(std::string_view(norm.data(), norm.size()));
  TORCH_CHECK_VALUE(student_map.dim() == 3 && teacher_map.sizes() == student_map.sizes() &&
                        student_map.size(0) == student.size(0),
                    "student_map and teacher_map must be the forward's (N, H', W') maps, got ",
                    student_map.sizes(), " and ", teacher_map.sizes());
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "grad_loss must hold one element, got shape ",
                    grad_loss.sizes());
  const c10::cuda::CUDAGuard device_guard(student.device());
  auto [grad_s_map, grad_t_map] = attention_loss_map_grads(
      grad_loss, student_map, teacher_map, map_norm_kind, {student.size(2), student.size(3)},
      {teacher.size(2), teacher.size(3)}, student_requires_grad, teacher_requires_grad);
  Tensor grad_s = student_requires_grad
                      ? attention_reduce_backward_cuda(grad_s_map.contiguous(), student, p, mean)
                      : at::empty({0}, student.options());
  Tensor grad_t = teacher_requires_grad
                      ? attention_reduce_backward_cuda(grad_t_map.contiguous(), teacher, p, mean)
                      : at::empty({0}, teacher.options());
  return {grad_s, grad_t};
}

// ---------------------------------------------------------------------------------------------
// class_attention_scores

void check_class_args(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  check_features(x);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(1) && weight.size(0) >= 1,
                    "weight must have shape (K, C) with C = ", x.size(1), ", got ", weight.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(weight.scalar_type()), "weight must be floating point, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), "weight must be on x's device ", x.device());
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0),
                      "bias must have shape (K,) = (", weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->device() == x.device(), "bias must be on x's device ", x.device());
  }
}

// out[n] = A[n] · B[n] through launch_class_gemm (strides of each operand as given).
void class_gemm(const Tensor& a, std::array<int64_t, 3> a_strides, const Tensor& b,
                std::array<int64_t, 3> b_strides, const Tensor& out,
                std::array<int64_t, 3> out_strides, const float* bias, bool relu,
                int64_t batch, int64_t rows, int64_t inner, int64_t cols, int64_t splits = 1) {
  ClassGemmParams params{};
  params.a = a.const_data_ptr<float>();
  params.a_stride_n = a_strides[0];
  params.a_stride_i = a_strides[1];
  params.a_stride_j = a_strides[2];
  params.b = b.const_data_ptr();
  params.b_stride_n = b_strides[0];
  params.b_stride_j = b_strides[1];
  params.b_stride_m = b_strides[2];
  params.b_dtype = dtype_of(b);
  params.out = out.data_ptr();
  params.out_stride_n = out_strides[0];
  params.out_stride_i = out_strides[1];
  params.out_stride_m = out_strides[2];
  params.out_dtype = dtype_of(out);
  params.bias = bias;
  params.relu = relu;
  params.batch = batch;
  params.rows = rows;
  params.inner = inner;
  params.cols = cols;
  params.splits = splits;
  C10_CUDA_CHECK(launch_class_gemm(params, c10::cuda::getCurrentCUDAStream()));
}

Tensor class_attention_scores_cuda(const Tensor& x_in, const Tensor& weight,
                                   const std::optional<Tensor>& bias) {
  check_class_args(x_in, weight, bias);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const Tensor x = readable(x_in);
  const Strides3 xs = *row_strides(x);
  const int64_t N = x.size(0), C = x.size(1), K = weight.size(0), L = x.numel() / (N * C);
  const Tensor w = weight.to(at::kFloat).contiguous();
  const Tensor b = bias ? bias->to(at::kFloat).contiguous() : Tensor();
  if (x.scalar_type() == at::kFloat) {
    const IeeeCublasGuard ieee;
    Tensor scores = at::matmul(w, x.as_strided({N, C, L}, {xs.n, xs.c, xs.l}));  // (N, K, L)
    if (bias) scores.add_(b.view({1, K, 1}));
    return scores.relu_().view(map_shape(x, K));
  }
  Tensor maps = at::empty(map_shape(x, K), x.options().dtype(at::kFloat));
  class_gemm(w, {0, C, 1}, x, {xs.n, xs.c, xs.l}, maps, {K * L, L, 1},
             bias ? b.const_data_ptr<float>() : nullptr, /*relu=*/true, N, K, C, L);
  return maps;
}

std::tuple<Tensor, Tensor, Tensor> class_attention_scores_backward_cuda(
    const Tensor& grad_maps, const Tensor& maps, const Tensor& x_in, const Tensor& weight,
    bool x_requires_grad, bool weight_requires_grad, bool bias_requires_grad) {
  check_class_args(x_in, weight, std::nullopt);
  const int64_t K = weight.size(0);
  const auto shape = map_shape(x_in, K);
  TORCH_CHECK_VALUE(maps.sizes() == at::IntArrayRef(shape) && grad_maps.sizes() == maps.sizes(),
                    "maps and grad_maps must have shape ", at::IntArrayRef(shape), ", got ",
                    maps.sizes(), " and ", grad_maps.sizes());
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const Tensor x = readable(x_in);
  const Strides3 xs = *row_strides(x);
  const int64_t N = x.size(0), C = x.size(1), L = x.numel() / (N * C);
  // g' = g·[maps > 0]: the gradient through the ReLU (ReLU'(0) = 0), map-sized, float32.
  const Tensor g = grad_maps.to(at::kFloat).mul(maps.gt(0)).contiguous();
  Tensor grad_x = at::empty({0}, x.options()), grad_w = at::empty({0}, x.options()),
         grad_b = at::empty({0}, x.options());
  if (x_requires_grad) {
    grad_x = at::empty_like(x_in);
    Tensor written = row_strides(grad_x) ? grad_x : at::empty(x_in.sizes(), x_in.options());
    const Strides3 gs = *row_strides(written);
    const Tensor w = weight.to(at::kFloat).contiguous();
    if (x.scalar_type() == at::kFloat) {
      const IeeeCublasGuard ieee;
      Tensor written3 = written.as_strided({N, C, L}, {gs.n, gs.c, gs.l});
      at::bmm_out(written3, w.t().expand({N, C, K}), g.view({N, K, L}));
    } else {
      class_gemm(w, {0, 1, C}, g, {K * L, L, 1}, written, {gs.n, gs.c, gs.l}, nullptr, false, N,
                 C, K, L);
    }
    if (!written.is_same(grad_x)) grad_x.copy_(written);
  }
  if (weight_requires_grad && x.scalar_type() == at::kFloat) {
    const IeeeCublasGuard ieee;
    grad_w = at::bmm(g.view({N, K, L}), x.as_strided({N, L, C}, {xs.n, xs.l, xs.c})).sum(0);
  } else if (weight_requires_grad) {
    // K×C outputs per image over L positions: the (N, splits, K, C) partial products of the
    // split inner dimension are summed in at::sum's fixed order.
    int64_t splits = 1;
    C10_CUDA_CHECK(class_gemm_inner_splits(N, K, L, C, x.get_device(), &splits));
    Tensor partial = at::empty({N, splits, K, C}, x.options().dtype(at::kFloat));
    class_gemm(g, {K * L, L, 1}, x, {xs.n, xs.l, xs.c}, partial, {K * C, C, 1}, nullptr, false, N,
               K, L, C, splits);
    grad_w = partial.sum(at::IntArrayRef{0, 1});
  }
  // g is (N, K, *spatial): Σ over images and positions, (K,).
  if (bias_requires_grad) grad_b = g.reshape({N, K, -1}).sum(at::IntArrayRef{0, 2});
  return {grad_x, grad_w, grad_b};
}

}  // namespace
}  // namespace cuda
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("attention_reduce", &kdops::cuda::attention_reduce_cuda);
  m.impl("attention_reduce_backward", &kdops::cuda::attention_reduce_backward_cuda);
  m.impl("attention_loss", &kdops::cuda::attention_loss_cuda);
  m.impl("attention_loss_backward", &kdops::cuda::attention_loss_backward_cuda);
  m.impl("class_attention_scores", &kdops::cuda::class_attention_scores_cuda);
  m.impl("class_attention_scores_backward", &kdops::cuda::class_attention_scores_backward_cuda);
}
