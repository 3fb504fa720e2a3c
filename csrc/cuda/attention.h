// CUDA kernels of the attention maps (kdops::attention_reduce, kdops::class_attention_scores and
// their backward ops): launch parameters and launchers (torch-free; included by attention.cu and
// by attention_api.cpp, which fills them from tensors). Math: csrc/common/attention.h.
//
// Features are passed as data pointers with (N, C, L) element strides (spatial dims merged), so
// any layout whose spatial dims merge runs without a copy. Every output element is computed by
// one thread (or summed by one block in a fixed order): the same bits on every run.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/attention.h"
#include "common/strides.h"

namespace kdops {
namespace cuda {

enum class AttentionDType : int32_t { kFloat32, kFloat16, kBFloat16 };

// map[n, l] = scale · Σ_c |x[n, c, l]|^p.
struct AttentionReduceParams {
  const void* x;
  Strides3 x_strides;
  int64_t n, c, l;
  AttentionDType dtype;
  PowerKind kind;
  float p;
  float scale;  // 1, or 1/C for reduce="mean"
  float* map;   // (N, L) contiguous
};

// grad_x[n, c, l] = grad_map[n, l] · scale · ∂|x|^p/∂x (0 at x = 0).
struct AttentionReduceBackwardParams : AttentionReduceParams {
  const float* grad_map;  // (N, L) contiguous
  void* grad_x;
  Strides3 grad_x_strides;
};

// A batch of products out[n, i, m] = Σ_j A[n, i, j] · B[n, j, m] (float32 accumulation, float32
// FMAs: float32-accurate for every input dtype), with element strides for each operand:
//   forward    A = W (K, C) float32, B = x (C, L) per image, out = ReLU(out + bias) float32 maps;
//   grad_x     A = Wᵀ (C, K) float32, B = g' (K, L) float32, out = grad_x in x's dtype;
//   grad_w     A = g' (K, L) float32, B = xᵀ (L, C) per image, out = per-image partials float32.
// With splits > 1 (no bias, no ReLU) the inner dimension is cut into `splits` chunks of whole
// 16-deep slices and image n's chunk s is written at out + (n·splits + s)·out_stride_n: partial
// products for the caller to sum.
struct ClassGemmParams {
  const float* a;
  int64_t a_stride_n, a_stride_i, a_stride_j;
  const void* b;
  int64_t b_stride_n, b_stride_j, b_stride_m;
  AttentionDType b_dtype;  // b's element type (float32 when it is g')
  void* out;
  int64_t out_stride_n, out_stride_i, out_stride_m;
  AttentionDType out_dtype;
  const float* bias;  // (I,) float32, or null; only with relu
  bool relu;
  int64_t batch, rows, inner, cols;  // N, I, J, M
  int64_t splits;                     // ≥ 1
};

// Each launcher enqueues its kernel on `stream` and returns cudaGetLastError().
cudaError_t launch_attention_reduce(const AttentionReduceParams& params, cudaStream_t stream);
cudaError_t launch_attention_reduce_backward(const AttentionReduceBackwardParams& params,
                                             cudaStream_t stream);
cudaError_t launch_class_gemm(const ClassGemmParams& params, cudaStream_t stream);

// The splits of the inner dimension that give a product of few output tiles about four blocks
// per SM of `device`, each chunk at least 512 deep (1 when the output tiles fill the device).
cudaError_t class_gemm_inner_splits(int64_t batch, int64_t rows, int64_t inner, int64_t cols,
                                    int device, int64_t* splits);

}  // namespace cuda
}  // namespace kdops
