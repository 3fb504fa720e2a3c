// float32 products on cuBLAS that stay float32-accurate: a scope in which at::mm / at::bmm of
// float32 tensors run with TF32 off (DESIGN.md: float32 inputs get float32-accurate products),
// whatever the caller set; the caller's setting is restored when the scope ends. Torch side only
// (included by the *_api.cpp files).
#pragma once

#include <ATen/Context.h>

namespace kdops {
namespace cuda {

class IeeeCublasGuard {
 public:
  IeeeCublasGuard()
      : previous_(at::globalContext().float32Precision(at::Float32Backend::CUDA,
                                                       at::Float32Op::MATMUL)) {
    if (previous_ != at::Float32Precision::IEEE) set(at::Float32Precision::IEEE);
  }
  ~IeeeCublasGuard() {
    if (previous_ != at::Float32Precision::IEEE) set(previous_);
  }
  IeeeCublasGuard(const IeeeCublasGuard&) = delete;
  IeeeCublasGuard& operator=(const IeeeCublasGuard&) = delete;

 private:
  static void set(at::Float32Precision precision) {
    at::globalContext().setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL,
                                            precision);
  }
  at::Float32Precision previous_;
};

}  // namespace cuda
}  // namespace kdops
