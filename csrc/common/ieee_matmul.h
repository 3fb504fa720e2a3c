// Float32 products that stay float32-accurate (DESIGN.md: float32 inputs get float32-accurate
// products, whatever the caller set): a scope in which at::mm / at::bmm of float32 tensors run
// in IEEE float32 on one backend, the caller's setting restored when the scope ends.
//   CPU:  IeeeMatmulGuard<at::Float32Backend::MKLDNN> — torch.set_float32_matmul_precision
//         ("medium") or torch.backends.mkldnn.matmul.fp32_precision = "bf16" lets oneDNN run
//         float32 matmuls in bfloat16 on CPUs that have it;
//   CUDA: IeeeMatmulGuard<at::Float32Backend::CUDA> — TF32 off for cuBLAS.
// Torch side only.
#pragma once

#include <ATen/Context.h>

namespace kdops {

template <at::Float32Backend kBackend>
class IeeeMatmulGuard {
 public:
  IeeeMatmulGuard() : previous_(at::globalContext().float32Precision(kBackend, at::Float32Op::MATMUL)) {
    if (previous_ != at::Float32Precision::IEEE) set(at::Float32Precision::IEEE);
  }
  ~IeeeMatmulGuard() {
    if (previous_ != at::Float32Precision::IEEE) set(previous_);
  }
  IeeeMatmulGuard(const IeeeMatmulGuard&) = delete;
  IeeeMatmulGuard& operator=(const IeeeMatmulGuard&) = delete;

 private:
  static void set(at::Float32Precision precision) {
    at::globalContext().setFloat32Precision(kBackend, at::Float32Op::MATMUL, precision);
  }
  at::Float32Precision previous_;
};

}  // namespace kdops
