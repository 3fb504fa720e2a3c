// CUDA kernels of the channel-correlation family's per-pixel work (see correlation.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/correlation.h"

namespace kdops {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr double kNormEps = 1e-12;  // F.normalize's eps: x / max(‖x‖, eps)

__device__ __forceinline__ double load(const float* p) { return static_cast<double>(*p); }
__device__ __forceinline__ double load(const __half* p) { return static_cast<double>(__half2float(*p)); }
__device__ __forceinline__ double load(const __nv_bfloat16* p) {
  return static_cast<double>(__bfloat162float(*p));
}
__device__ __forceinline__ void store(float* p, double v) { *p = static_cast<float>(v); }
__device__ __forceinline__ void store(__half* p, double v) { *p = __float2half(static_cast<float>(v)); }
__device__ __forceinline__ void store(__nv_bfloat16* p, double v) {
  *p = __float2bfloat16(static_cast<float>(v));
}

int blocks_for(int64_t pixels) { return static_cast<int>((pixels + kThreads - 1) / kThreads); }

template <typename T>
__global__ void __launch_bounds__(kThreads) pixel_norms_kernel(PixelNormsParams p) {
  const int64_t pixel = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (pixel >= p.n * p.l) return;
  const int64_t n = pixel / p.l, l = pixel % p.l;
  const T* x = static_cast<const T*>(p.x) + n * p.strides.n + l * p.strides.l;
  double sum = 0.0;
  for (int64_t c = 0; c < p.c; ++c) {
    const double v = load(x + c * p.strides.c);
    sum = fma(v, v, sum);
  }
  p.norms[n * p.norms_stride_n + l] = sqrt(sum);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) pairwise_operands_kernel(PairwiseOperandsParams p) {
  const int64_t pixel = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (pixel >= p.n * p.l) return;
  const int64_t n = pixel / p.l, l = pixel % p.l;
  const int64_t c_max = p.cs > p.ct ? p.cs : p.ct;
  const double inv_s = 1.0 / fmax(p.norms[n * 2 * p.l + l], kNormEps);
  const double inv_t = 1.0 / fmax(p.norms[n * 2 * p.l + p.l + l], kNormEps);
  const T* s = static_cast<const T*>(p.student) + n * p.student_strides.n + l * p.student_strides.l;
  const T* t = static_cast<const T*>(p.teacher) + n * p.teacher_strides.n + l * p.teacher_strides.l;
  float* difference = p.operands + n * 2 * c_max * p.l + l;
  float* sum = difference + c_max * p.l;
  for (int64_t c = 0; c < c_max; ++c) {
    // Two separately rounded products, never fused: equal inputs give a D̂ of exactly 0.
    const double hs = c < p.cs ? __dmul_rn(load(s + c * p.student_strides.c), inv_s) : 0.0;
    const double ht = c < p.ct ? __dmul_rn(load(t + c * p.teacher_strides.c), inv_t) : 0.0;
    difference[c * p.l] = static_cast<float>(hs - ht);
    sum[c * p.l] = static_cast<float>(hs + ht);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) normalisation_backward_kernel(NormalisationBackwardParams p) {
  const int64_t pixel = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (pixel >= p.n * p.l) return;
  const int64_t n = pixel / p.l, l = pixel % p.l;
  const double r = p.norms[n * p.norms_stride_n + l];
  const double inv = 1.0 / fmax(r, kNormEps);
  const T* x = static_cast<const T*>(p.x) + n * p.x_strides.n + l * p.x_strides.l;
  const float* g = p.grad_hat + n * p.c * p.l + l;
  double radial = 0.0;
  if (!p.detach_norm && r > kNormEps) {
    for (int64_t c = 0; c < p.c; ++c) radial = fma(load(x + c * p.x_strides.c), load(g + c * p.l), radial);
    radial *= inv * inv;  // ⟨x̂, ĝ⟩ x̂ = ⟨x, ĝ⟩ x / r'²
  }
  T* out = static_cast<T*>(p.grad) + n * p.grad_strides.n + l * p.grad_strides.l;
  for (int64_t c = 0; c < p.c; ++c) {
    const double v = (load(g + c * p.l) - load(x + c * p.x_strides.c) * radial) * inv;
    store(out + c * p.grad_strides.c, v);
  }
}

template <template <typename> class Launch, typename... Args>
cudaError_t dispatch(FeatureDType dtype, Args&&... args) {
  switch (dtype) {
    case FeatureDType::kFloat32: Launch<float>::run(args...); break;
    case FeatureDType::kFloat16: Launch<__half>::run(args...); break;
    case FeatureDType::kBFloat16: Launch<__nv_bfloat16>::run(args...); break;
  }
  return cudaGetLastError();
}

template <typename T>
struct LaunchNorms {
  static void run(const PixelNormsParams& p, cudaStream_t stream) {
    pixel_norms_kernel<T><<<blocks_for(p.n * p.l), kThreads, 0, stream>>>(p);
  }
};
template <typename T>
struct LaunchOperands {
  static void run(const PairwiseOperandsParams& p, cudaStream_t stream) {
    pairwise_operands_kernel<T><<<blocks_for(p.n * p.l), kThreads, 0, stream>>>(p);
  }
};
template <typename T>
struct LaunchNormalisationBackward {
  static void run(const NormalisationBackwardParams& p, cudaStream_t stream) {
    normalisation_backward_kernel<T><<<blocks_for(p.n * p.l), kThreads, 0, stream>>>(p);
  }
};

}  // namespace

cudaError_t launch_pixel_norms(const PixelNormsParams& params, cudaStream_t stream) {
  return dispatch<LaunchNorms>(params.dtype, params, stream);
}

cudaError_t launch_pairwise_operands(const PairwiseOperandsParams& params, cudaStream_t stream) {
  return dispatch<LaunchOperands>(params.dtype, params, stream);
}

cudaError_t launch_normalisation_backward(const NormalisationBackwardParams& params,
                                          cudaStream_t stream) {
  return dispatch<LaunchNormalisationBackward>(params.dtype, params, stream);
}

}  // namespace cuda
}  // namespace kdops
