// CPU kernels of the channel-correlation family (kdops::channel_correlation,
// channel_correlation_loss, pairwise_affinity_loss and their backward ops): the algorithm of
// csrc/common/correlation_ops.h (GEMMs through at::bmm, i.e. MKL sgemm/dgemm; C×C work in
// float64), run with float32 matmuls pinned to IEEE precision. Specification:
// kdops/reference/correlation.py.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <tuple>

#include "common/correlation_ops.h"

namespace kdops {
namespace cpu {
namespace {

using at::Tensor;

// torch.set_float32_matmul_precision("medium") / torch.backends.mkldnn.matmul.fp32_precision =
// "bf16" lets oneDNN run float32 matmuls in bfloat16 on CPUs that have it. DESIGN.md forbids that
// for these ops (the products must be float32-accurate), so the precision is IEEE while an op of
// this family runs, and the caller's setting is restored after.
class IeeeMatmulGuard {
 public:
  IeeeMatmulGuard()
      : previous_(at::globalContext().float32Precision(at::Float32Backend::MKLDNN,
                                                       at::Float32Op::MATMUL)) {
    if (previous_ != at::Float32Precision::IEEE) set(at::Float32Precision::IEEE);
  }
  ~IeeeMatmulGuard() {
    if (previous_ != at::Float32Precision::IEEE) set(previous_);
  }
  IeeeMatmulGuard(const IeeeMatmulGuard&) = delete;
  IeeeMatmulGuard& operator=(const IeeeMatmulGuard&) = delete;

 private:
  static void set(at::Float32Precision precision) {
    at::globalContext().setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL,
                                            precision);
  }
  at::Float32Precision previous_;
};

void check_cpu(const Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), name, " must be a CPU tensor, got ", x.device());
}

std::tuple<Tensor, Tensor> channel_correlation_cpu(const Tensor& x, c10::string_view norm) {
  check_cpu(x, "x");
  IeeeMatmulGuard guard;
  return correlation::channel_correlation_forward(x, norm);
}

Tensor channel_correlation_backward_cpu(const Tensor& grad_gram, const Tensor& x, const Tensor& gram,
                                        const Tensor& row_norms, c10::string_view norm) {
  check_cpu(x, "x");
  IeeeMatmulGuard guard;
  return correlation::channel_correlation_backward(grad_gram, x, gram, row_norms, norm);
}

Tensor channel_correlation_loss_cpu(const Tensor& student, const Tensor& teacher,
                                    c10::string_view norm) {
  check_cpu(student, "student");
  IeeeMatmulGuard guard;
  return correlation::channel_correlation_loss_forward(student, teacher, norm);
}

std::tuple<Tensor, Tensor> channel_correlation_loss_backward_cpu(
    const Tensor& grad_loss, const Tensor& student, const Tensor& teacher, c10::string_view norm,
    bool student_requires_grad, bool teacher_requires_grad) {
  check_cpu(student, "student");
  IeeeMatmulGuard guard;
  return correlation::channel_correlation_loss_backward(grad_loss, student, teacher, norm,
                                                        student_requires_grad, teacher_requires_grad);
}

std::tuple<Tensor, Tensor> pairwise_affinity_loss_cpu(const Tensor& student, const Tensor& teacher,
                                                      bool /*detach_norm: backward only*/) {
  check_cpu(student, "student");
  IeeeMatmulGuard guard;
  return correlation::pairwise_affinity_loss_forward(student, teacher);
}

std::tuple<Tensor, Tensor> pairwise_affinity_loss_backward_cpu(
    const Tensor& grad_loss, const Tensor& student, const Tensor& teacher, const Tensor& norms,
    bool detach_norm, bool student_requires_grad, bool teacher_requires_grad) {
  check_cpu(student, "student");
  IeeeMatmulGuard guard;
  return correlation::pairwise_affinity_loss_backward(grad_loss, student, teacher, norms, detach_norm,
                                                      student_requires_grad, teacher_requires_grad);
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("channel_correlation", &kdops::cpu::channel_correlation_cpu);
  m.impl("channel_correlation_backward", &kdops::cpu::channel_correlation_backward_cpu);
  m.impl("channel_correlation_loss", &kdops::cpu::channel_correlation_loss_cpu);
  m.impl("channel_correlation_loss_backward", &kdops::cpu::channel_correlation_loss_backward_cpu);
  m.impl("pairwise_affinity_loss", &kdops::cpu::pairwise_affinity_loss_cpu);
  m.impl("pairwise_affinity_loss_backward", &kdops::cpu::pairwise_affinity_loss_backward_cpu);
}
