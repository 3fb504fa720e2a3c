// The torch side of the CUDA channel-correlation ops: the algorithm of
// csrc/common/correlation_ops.h with its GEMMs on cuBLAS (at::bmm, float32 with TF32 off while an
// op of this family runs: DESIGN.md wants float32-accurate products), its C × C / L × L epilogues
// as small ATen ops in float64 (no host synchronisation: the incoming gradient stays on the
// device), and the per-pixel work (norms, normalised operands, the chain rule through the
// normalisation) in the kernels of csrc/cuda/correlation.cu. Registers the ops for the CUDA key.
//
// A gradient is returned in the tensor empty_like(input) gives (what the fake kernels promise).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "common/correlation_ops.h"
#include "common/ieee_matmul.h"
#include "common/tensor_layout.h"
#include "cuda/correlation.h"

namespace kdops {
namespace cuda {
namespace {

using at::Tensor;
using IeeeCublasGuard = IeeeMatmulGuard<at::Float32Backend::CUDA>;

FeatureDType dtype_of(const Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return FeatureDType::kFloat32;
    case at::kHalf:
      return FeatureDType::kFloat16;
    case at::kBFloat16:
      return FeatureDType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "the CUDA kernels take float32, float16 or bfloat16 student, got ",
                       x.scalar_type(), " (float64 runs on the reference backend)");
  }
}

void check_cuda(const Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.is_cuda(), name, " must be a CUDA tensor, got ", x.device());
  dtype_of(x);
}

Strides3 strides_of(const Tensor& x) { return *row_strides(x); }

// The per-pixel work of pairwise_affinity_loss on the kernels of correlation.cu.
struct CudaPixelKernels {
  static Tensor pixel_norms(const Tensor& x) {  // x: (N, C, L) float32 features
    Tensor norms = at::empty({x.size(0), x.size(2)}, x.options().dtype(at::kDouble));
    PixelNormsParams p{};
    p.x = x.const_data_ptr();
    p.strides = Strides3{x.stride(0), x.stride(1), x.stride(2)};
    p.n = x.size(0);
    p.c = x.size(1);
    p.l = x.size(2);
    p.dtype = dtype_of(x);
    p.norms = norms.data_ptr<double>();
    p.norms_stride_n = x.size(2);
    C10_CUDA_CHECK(launch_pixel_norms(p, at::cuda::getCurrentCUDAStream()));
    return norms;
  }

  static Tensor operands(const Tensor& xs, const Tensor& xt, const Tensor& norms) {
    const int64_t n = xs.size(0), cs = xs.size(1), ct = xt.size(1), l = xs.size(2);
    const int64_t c = std::max(cs, ct);
    const Tensor norms_c = norms.contiguous();
    Tensor operands = at::empty({n, 2 * c, l}, xs.options().dtype(at::kFloat));
    PairwiseOperandsParams p{};
    p.student = xs.const_data_ptr();
    p.teacher = xt.const_data_ptr();
    p.student_strides = Strides3{xs.stride(0), xs.stride(1), xs.stride(2)};
    p.teacher_strides = Strides3{xt.stride(0), xt.stride(1), xt.stride(2)};
    p.n = n;
    p.cs = cs;
    p.ct = ct;
    p.l = l;
    p.dtype = dtype_of(xs);
    p.norms = norms_c.const_data_ptr<double>();
    p.operands = operands.data_ptr<float>();
    C10_CUDA_CHECK(launch_pairwise_operands(p, at::cuda::getCurrentCUDAStream()));
    return operands;
  }

  static Tensor input_grad(const Tensor& x_in, const Tensor& /*features*/, const Tensor& norms,
                           int64_t which, const Tensor& grad_hat, bool detach_norm) {
    const Tensor x = readable(x_in);
    Tensor result = at::empty_like(x_in);
    Tensor written = row_strides(result) ? result : at::empty(x_in.sizes(), x_in.options());
    const Tensor hat = grad_hat.to(at::kFloat).contiguous();
    NormalisationBackwardParams p{};
    p.x = x.const_data_ptr();
    p.x_strides = strides_of(x);
    p.grad_hat = hat.const_data_ptr<float>();
    p.norms = norms.const_data_ptr<double>() + which * norms.size(2);
    p.norms_stride_n = 2 * norms.size(2);
    p.n = x.size(0);
    p.c = x.size(1);
    p.l = norms.size(2);
    p.detach_norm = detach_norm;
    p.dtype = dtype_of(x);
    p.grad = written.data_ptr();
    p.grad_strides = strides_of(written);
    C10_CUDA_CHECK(launch_normalisation_backward(p, at::cuda::getCurrentCUDAStream()));
    if (!written.is_same(result)) result.copy_(written);
    return result;
  }
};

std::tuple<Tensor, Tensor> channel_correlation_cuda(const Tensor& x, c10::string_view norm) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard device_guard(x.device());
  IeeeCublasGuard guard;
  return correlation::channel_correlation_forward(x, norm);
}

Tensor channel_correlation_backward_cuda(const Tensor& grad_gram, const Tensor& x, const Tensor& gram,
                                         const Tensor& row_norms, c10::string_view norm) {
  check_cuda(x, "x");
  const c10::cuda::CUDAGuard device_guard(x.device());
  IeeeCublasGuard guard;
  return correlation::channel_correlation_backward(grad_gram, x, gram, row_norms, norm);
}

Tensor channel_correlation_loss_cuda(const Tensor& student, const Tensor& teacher,
                                     c10::string_view norm) {
  check_cuda(student, "student");
  const c10::cuda::CUDAGuard device_guard(student.device());
  IeeeCublasGuard guard;
  return correlation::channel_correlation_loss_forward(student, teacher, norm);
}

std::tuple<Tensor, Tensor> channel_correlation_loss_backward_cuda(
    const Tensor& grad_loss, const Tensor& student, const Tensor& teacher, c10::string_view norm,
    bool student_requires_grad, bool teacher_requires_grad) {
  check_cuda(student, "student");
  const c10::cuda::CUDAGuard device_guard(student.device());
  IeeeCublasGuard guard;
  return correlation::channel_correlation_loss_backward(grad_loss, student, teacher, norm,
                                                        student_requires_grad, teacher_requires_grad);
}

std::tuple<Tensor, Tensor> pairwise_affinity_loss_cuda(const Tensor& student, const Tensor& teacher,
                                                       bool /*detach_norm: backward only*/) {
  check_cuda(student, "student");
  const c10::cuda::CUDAGuard device_guard(student.device());
  IeeeCublasGuard guard;
  return correlation::pairwise_affinity_loss_forward<CudaPixelKernels>(student, teacher);
}

std::tuple<Tensor, Tensor> pairwise_affinity_loss_backward_cuda(
    const Tensor& grad_loss, const Tensor& student, const Tensor& teacher, const Tensor& norms,
    bool detach_norm, bool student_requires_grad, bool teacher_requires_grad) {
  check_cuda(student, "student");
  const c10::cuda::CUDAGuard device_guard(student.device());
  IeeeCublasGuard guard;
  return correlation::pairwise_affinity_loss_backward<CudaPixelKernels>(
      grad_loss, student, teacher, norms, detach_norm, student_requires_grad, teacher_requires_grad);
}

}  // namespace
}  // namespace cuda
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("channel_correlation", &kdops::cuda::channel_correlation_cuda);
  m.impl("channel_correlation_backward", &kdops::cuda::channel_correlation_backward_cuda);
  m.impl("channel_correlation_loss", &kdops::cuda::channel_correlation_loss_cuda);
  m.impl("channel_correlation_loss_backward", &kdops::cuda::channel_correlation_loss_backward_cuda);
  m.impl("pairwise_affinity_loss", &kdops::cuda::pairwise_affinity_loss_cuda);
  m.impl("pairwise_affinity_loss_backward", &kdops::cuda::pairwise_affinity_loss_backward_cuda);
}
