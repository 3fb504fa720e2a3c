// CUDA kernels of the channel-correlation family's per-pixel work: launch parameters and
// launchers (torch-free; included by correlation.cu and by correlation_api.cpp, which fills them
// from tensors). The GEMMs are cuBLAS calls made by correlation_api.cpp (TF32 off); the C × C
// epilogues there are small ATen ops. What these kernels do is what must not be an ATen chain of
// float64 temporaries of the features' size: the per-pixel norms (float64), the normalised sum and
// difference operands of pairwise_affinity_loss, and the chain rule through the normalisation.
//
// Tensors are passed as data pointers with (N, C, L) element strides (spatial dims merged). One
// thread per pixel: it walks the channels, so a warp reads 32 consecutive pixels of one channel
// (coalesced in NCHW) and every result is summed in a fixed order: the same bits on every run.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/strides.h"

namespace kdops {
namespace cuda {

enum class FeatureDType : int32_t { kFloat32, kFloat16, kBFloat16 };

// ‖x[n, :, l]‖₂ in float64 → norms[n · norms_stride_n + l].
struct PixelNormsParams {
  const void* x;
  Strides3 strides;
  int64_t n, c, l;
  FeatureDType dtype;
  double* norms;
  int64_t norms_stride_n;
};

// operands (N, 2C, L) float32 contiguous, C = max(cs, ct): rows [0, C) D̂ = x̂_s − x̂_t, rows
// [C, 2C) Σ̂ = x̂_s + x̂_t (float64, rounded once; zero beyond an input's channels);
// norms (N, 2, L) float64 contiguous.
struct PairwiseOperandsParams {
  const void* student;
  const void* teacher;
  Strides3 student_strides, teacher_strides;
  int64_t n, cs, ct, l;
  FeatureDType dtype;
  const double* norms;
  float* operands;
};

// grad[n, c, l] = (ĝ − x̂ ⟨x̂, ĝ⟩ [r > eps]) / r'  (detach_norm: ĝ / r'), written in dtype.
// grad_hat (N, C, L) float32 contiguous; norms: this input's (N, L) float64 with row stride
// norms_stride_n.
struct NormalisationBackwardParams {
  const void* x;
  Strides3 x_strides;
  const float* grad_hat;
  const double* norms;
  int64_t norms_stride_n;
  int64_t n, c, l;
  bool detach_norm;
  FeatureDType dtype;
  void* grad;
  Strides3 grad_strides;
};

// Each launcher enqueues its kernel on `stream` and returns cudaGetLastError().
cudaError_t launch_pixel_norms(const PixelNormsParams& params, cudaStream_t stream);
cudaError_t launch_pairwise_operands(const PairwiseOperandsParams& params, cudaStream_t stream);
cudaError_t launch_normalisation_backward(const NormalisationBackwardParams& params,
                                          cudaStream_t stream);

}  // namespace cuda
}  // namespace kdops
