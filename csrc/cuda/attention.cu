// CUDA kernels of the attention maps: the channel reduction Σ_c |x_c|^p with its backward, and
// the batched products of the class attention maps. Torch-free: compiled by nvcc alone.
//
// attention_reduce. Two layouts, each coalesced without a copy:
//   rows      (stride_l == 1, contiguous NCHW): a block owns 32 consecutive positions of one image;
//             its 8 warps take every 8th channel (each warp reads 32 consecutive positions of a
//             channel row), and the 8 partial sums meet in shared memory in warp order;
//   channels  (stride_c == 1, channels_last): a warp owns a pixel, its lanes take every 32nd
//             channel, and a fixed butterfly of shuffles sums them.
// Any other strides run the rows kernel (correct, not coalesced). The backward is elementwise:
// one thread per element of x, walked in the order of the unit stride.
//
// class GEMM: 32×64 output tiles, 16-deep slices of the inner dimension staged in shared memory
// as float32, 2×4 outputs per thread accumulated with float32 FMAs in a fixed order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/convert.cuh"
#include "cuda/attention.h"

namespace kdops {
namespace cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;

// ---------------------------------------------------------------------------------------------
// attention_reduce forward

template <typename T, PowerKind kKind>
__global__ void __launch_bounds__(kThreads) reduce_rows_kernel(AttentionReduceParams p) {
  __shared__ float partial[kWarps][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t tiles = (p.l + 31) / 32;
  const int64_t n = blockIdx.x / tiles;
  const int64_t l = (blockIdx.x % tiles) * 32 + lane;
  float sum = 0.f;
  if (l < p.l) {
    const T* x = static_cast<const T*>(p.x) + n * p.x_strides.n + l * p.x_strides.l;
    for (int64_t c = warp; c < p.c; c += kWarps) {
      sum += abs_power<float>(to_float(x[c * p.x_strides.c]), p.p, kKind);
    }
  }
  partial[warp][lane] = sum;
  __syncthreads();
  if (warp == 0 && l < p.l) {
    float total = partial[0][lane];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) total += partial[w][lane];
    p.map[n * p.l + l] = total * p.scale;
  }
}

template <typename T, PowerKind kKind>
__global__ void __launch_bounds__(kThreads) reduce_channels_kernel(AttentionReduceParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t pixel = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (pixel >= p.n * p.l) return;
  const int64_t n = pixel / p.l, l = pixel % p.l;
  const T* x = static_cast<const T*>(p.x) + n * p.x_strides.n + l * p.x_strides.l;
  float sum = 0.f;
  for (int64_t c = lane; c < p.c; c += 32) {
    sum += abs_power<float>(to_float(x[c * p.x_strides.c]), p.p, kKind);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) p.map[pixel] = sum * p.scale;
}

// ---------------------------------------------------------------------------------------------
// attention_reduce backward: one thread per element, the unit-stride dim fastest

template <typename T, PowerKind kKind, bool kChannelsFastest>
__global__ void __launch_bounds__(kThreads) reduce_backward_kernel(AttentionReduceBackwardParams p) {
  const int64_t total = p.n * p.c * p.l;
  const T* x = static_cast<const T*>(p.x);
  T* gx = static_cast<T*>(p.grad_x);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    int64_t n, c, l;
    if (kChannelsFastest) {
      c = i % p.c;
      l = (i / p.c) % p.l;
      n = i / (p.c * p.l);
    } else {
      l = i % p.l;
      c = (i / p.l) % p.c;
      n = i / (p.c * p.l);
    }
    const float v = to_float(x[n * p.x_strides.n + c * p.x_strides.c + l * p.x_strides.l]);
    const float g = p.grad_map[n * p.l + l] * p.scale;
    gx[n * p.grad_x_strides.n + c * p.grad_x_strides.c + l * p.grad_x_strides.l] =
        from_float<T>(g * abs_power_grad<float>(v, p.p, kKind));
  }
}

// ---------------------------------------------------------------------------------------------
// class GEMM

constexpr int kTileI = 32, kTileM = 64, kTileJ = 16;

template <typename TB, typename TOut>
__global__ void __launch_bounds__(kThreads) class_gemm_kernel(ClassGemmParams p) {
  __shared__ float a_tile[kTileJ][kTileI + 1];
  __shared__ float b_tile[kTileJ][kTileM];
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;  // 16 × 16 threads
  const int64_t m_tiles = (p.cols + kTileM - 1) / kTileM;
  const int64_t i_tiles = (p.rows + kTileI - 1) / kTileI;
  const int64_t n = blockIdx.x / (m_tiles * i_tiles);
  const int64_t i0 = ((blockIdx.x / m_tiles) % i_tiles) * kTileI;
  const int64_t m0 = (blockIdx.x % m_tiles) * kTileM;
  const float* a = p.a + n * p.a_stride_n;
  const TB* b = static_cast<const TB*>(p.b) + n * p.b_stride_n;
  float acc[2][4] = {};
  for (int64_t j0 = 0; j0 < p.inner; j0 += kTileJ) {
    for (int e = threadIdx.x; e < kTileJ * kTileI; e += kThreads) {
      const int jj = e / kTileI, ii = e % kTileI;  // consecutive threads: consecutive rows i
      const int64_t i = i0 + ii, j = j0 + jj;
      a_tile[jj][ii] = (i < p.rows && j < p.inner) ? a[i * p.a_stride_i + j * p.a_stride_j] : 0.f;
    }
    for (int e = threadIdx.x; e < kTileJ * kTileM; e += kThreads) {
      const int jj = e / kTileM, mm = e % kTileM;  // consecutive threads: consecutive columns m
      const int64_t j = j0 + jj, m = m0 + mm;
      b_tile[jj][mm] =
          (j < p.inner && m < p.cols) ? to_float(b[j * p.b_stride_j + m * p.b_stride_m]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < kTileJ; ++jj) {
      const float a0 = a_tile[jj][2 * ty], a1 = a_tile[jj][2 * ty + 1];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float bv = b_tile[jj][tx + 16 * q];
        acc[0][q] = fmaf(a0, bv, acc[0][q]);
        acc[1][q] = fmaf(a1, bv, acc[1][q]);
      }
    }
    __syncthreads();
  }
  TOut* out = static_cast<TOut*>(p.out) + n * p.out_stride_n;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t i = i0 + 2 * ty + r;
    if (i >= p.rows) continue;
    const float bias = p.bias != nullptr ? p.bias[i] : 0.f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t m = m0 + tx + 16 * q;
      if (m >= p.cols) continue;
      float v = acc[r][q] + bias;
      if (p.relu) v = fmaxf(v, 0.f);
      out[i * p.out_stride_i + m * p.out_stride_m] = from_float<TOut>(v);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// dispatch

template <typename F>
cudaError_t with_dtype(AttentionDType dtype, F&& f) {
  switch (dtype) {
    case AttentionDType::kFloat32: return f(float{});
    case AttentionDType::kFloat16: return f(__half{});
    case AttentionDType::kBFloat16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

template <typename F>
cudaError_t with_kind(PowerKind kind, F&& f) {
  switch (kind) {
    case PowerKind::kAbs: return f(std::integral_constant<PowerKind, PowerKind::kAbs>{});
    case PowerKind::kSquare: return f(std::integral_constant<PowerKind, PowerKind::kSquare>{});
    case PowerKind::kCube: return f(std::integral_constant<PowerKind, PowerKind::kCube>{});
    default: return f(std::integral_constant<PowerKind, PowerKind::kGeneral>{});
  }
}

unsigned int grid_for(int64_t items, int64_t per_block) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned int>(blocks < 2147483647 ? blocks : 2147483647);
}

}  // namespace

cudaError_t launch_attention_reduce(const AttentionReduceParams& params, cudaStream_t stream) {
  const bool channels = params.x_strides.c == 1 && params.x_strides.l != 1;
  return with_dtype(params.dtype, [&](auto tag) {
    using T = decltype(tag);
    return with_kind(params.kind, [&](auto kind) {
      constexpr PowerKind kKind = decltype(kind)::value;
      if (channels) {
        reduce_channels_kernel<T, kKind>
            <<<grid_for(params.n * params.l, kWarps), kThreads, 0, stream>>>(params);
      } else {
        reduce_rows_kernel<T, kKind>
            <<<grid_for(params.n * ((params.l + 31) / 32), 1), kThreads, 0, stream>>>(params);
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_attention_reduce_backward(const AttentionReduceBackwardParams& params,
                                             cudaStream_t stream) {
  const bool channels = params.x_strides.c == 1 && params.x_strides.l != 1;
  const int64_t total = params.n * params.c * params.l;
  // Grid-stride: enough blocks to fill any GPU, each thread a few elements.
  const unsigned int blocks = grid_for(total, 4 * kThreads);
  return with_dtype(params.dtype, [&](auto tag) {
    using T = decltype(tag);
    return with_kind(params.kind, [&](auto kind) {
      constexpr PowerKind kKind = decltype(kind)::value;
      if (channels) {
        reduce_backward_kernel<T, kKind, true><<<blocks, kThreads, 0, stream>>>(params);
      } else {
        reduce_backward_kernel<T, kKind, false><<<blocks, kThreads, 0, stream>>>(params);
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_class_gemm(const ClassGemmParams& params, cudaStream_t stream) {
  const int64_t tiles =
      params.batch * ((params.rows + kTileI - 1) / kTileI) * ((params.cols + kTileM - 1) / kTileM);
  const unsigned int blocks = grid_for(tiles, 1);
  // (b, out) dtypes used: forward (x's dtype, float32), grad_x (float32, x's dtype), grad_w
  // (x's dtype, float32).
  if (params.b_dtype == AttentionDType::kFloat32) {
    return with_dtype(params.out_dtype, [&](auto tag) {
      class_gemm_kernel<float, decltype(tag)><<<blocks, kThreads, 0, stream>>>(params);
      return cudaGetLastError();
    });
  }
  if (params.out_dtype != AttentionDType::kFloat32) return cudaErrorInvalidValue;
  return with_dtype(params.b_dtype, [&](auto tag) {
    class_gemm_kernel<decltype(tag), float><<<blocks, kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace kdops
