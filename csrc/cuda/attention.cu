// CUDA kernels of the attention maps: the channel reduction Σ_c |x_c|^p with its backward, and
// the batched products of the class attention maps. Torch-free: compiled by nvcc alone.
//
// attention_reduce. Two layouts, each coalesced without a copy:
//   rows      (stride_l == 1, contiguous NCHW): a block owns 32 consecutive positions of one image;
//             its 8 warps take every 8th channel (each warp reads 32 consecutive positions of a
//             channel row), and the 8 partial sums meet in shared memory in warp order;
//   channels  (stride_c == 1, channels_last): a warp owns a pixel, its lanes take every 32nd
//             channel, and a fixed butterfly of shuffles sums them.
// Any other strides run the rows kernel (correct, not coalesced). The channel loops are unrolled
// so that each thread has several independent loads in flight: one 128-byte load per warp at a
// time leaves an H200 at half its bandwidth (measured: the forward at 56 % of copy bandwidth).
// The backward is elementwise: a block owns a stretch of one row of the unit-stride dim, so a
// thread finds its element without the per-element 64-bit divisions that made the first backward
// four times slower than its forward on an H200.
//
// class GEMM: 32×64 output tiles, 16-deep slices of the inner dimension staged in shared memory
// as float32, 2×4 outputs per thread accumulated with float32 FMAs in a fixed order. Each operand
// tile is read along the operand's unit stride (consecutive threads, consecutive addresses),
// whichever of its two dims that is: grad_w reads x transposed. A product with few output tiles
// and a long inner dimension (grad_w: K×C outputs over L) splits the inner dimension into
// `splits` chunks written as separate partial products, summed by the caller in a fixed order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
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
#pragma unroll 4
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
#pragma unroll 4
  for (int64_t c = lane; c < p.c; c += 32) {
    sum += abs_power<float>(to_float(x[c * p.x_strides.c]), p.p, kKind);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) p.map[pixel] = sum * p.scale;
}

// ---------------------------------------------------------------------------------------------
// attention_reduce backward: grad_x = grad_map · scale · ∂|x|^p, elementwise.
//
// A "row" is one line of the unit-stride dim: a channel row (n, c) over the positions l in the
// rows layout, the channels of one pixel (n, l) in the channels layout. Blocks walk rows along
// gridDim.x and stretches of kBackwardTile elements of a row along gridDim.y; a thread takes
// elements threadIdx.x + k·kThreads of its stretch, so every load and store is coalesced across
// the warp and a thread has kBackwardPerThread loads in flight.

constexpr int kBackwardPerThread = 4;
constexpr int64_t kBackwardTile = int64_t{kThreads} * kBackwardPerThread;

template <typename T, PowerKind kKind, bool kChannelsFastest>
__global__ void __launch_bounds__(kThreads) reduce_backward_kernel(AttentionReduceBackwardParams p) {
  const int64_t row_length = kChannelsFastest ? p.c : p.l;
  const int64_t rows_per_image = kChannelsFastest ? p.l : p.c;
  const int64_t x_along = kChannelsFastest ? p.x_strides.c : p.x_strides.l;
  const int64_t x_across = kChannelsFastest ? p.x_strides.l : p.x_strides.c;
  const int64_t gx_along = kChannelsFastest ? p.grad_x_strides.c : p.grad_x_strides.l;
  const int64_t gx_across = kChannelsFastest ? p.grad_x_strides.l : p.grad_x_strides.c;
  for (int64_t row = blockIdx.x; row < p.n * rows_per_image; row += gridDim.x) {
    const int64_t n = row / rows_per_image, across = row % rows_per_image;
    const T* x = static_cast<const T*>(p.x) + n * p.x_strides.n + across * x_across;
    T* gx = static_cast<T*>(p.grad_x) + n * p.grad_x_strides.n + across * gx_across;
    const float* grad_map = p.grad_map + n * p.l;  // (N, L) contiguous
    for (int64_t start = blockIdx.y * kBackwardTile; start < row_length;
         start += static_cast<int64_t>(gridDim.y) * kBackwardTile) {
      float v[kBackwardPerThread] = {}, g[kBackwardPerThread] = {};
#pragma unroll
      for (int k = 0; k < kBackwardPerThread; ++k) {
        const int64_t i = start + k * kThreads + threadIdx.x;
        if (i < row_length) {
          v[k] = to_float(x[i * x_along]);
          g[k] = grad_map[kChannelsFastest ? across : i] * p.scale;
        }
      }
#pragma unroll
      for (int k = 0; k < kBackwardPerThread; ++k) {
        const int64_t i = start + k * kThreads + threadIdx.x;
        if (i < row_length) gx[i * gx_along] = from_float<T>(g[k] * abs_power_grad<float>(v[k], p.p, kKind));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// class GEMM

constexpr int kTileI = 32, kTileM = 64, kTileJ = 16;

// Stages the (kTileJ × kRows) slice [j0, j0 + kTileJ) × [r0, r0 + kRows) of an operand with
// element strides (stride_j, stride_r) into tile[jj][rr] as float32 (0 outside the operand),
// consecutive threads on consecutive addresses of whichever dim has the unit stride.
template <int kRows, int kPitch, typename T>
__device__ __forceinline__ void stage_tile(float (*tile)[kPitch], const T* operand, int64_t stride_j,
                                           int64_t stride_r, int64_t j0, int64_t j_end, int64_t r0,
                                           int64_t rows) {
  static_assert(kTileJ * kRows % kThreads == 0, "a tile is a whole number of block-wide steps");
  const bool j_fastest = stride_j == 1 && stride_r != 1;
#pragma unroll
  for (int step = 0; step < kTileJ * kRows / kThreads; ++step) {
    const int e = step * kThreads + threadIdx.x;
    const int jj = j_fastest ? e % kTileJ : e / kRows;
    const int rr = j_fastest ? e / kTileJ : e % kRows;
    const int64_t j = j0 + jj, r = r0 + rr;
    tile[jj][rr] = (j < j_end && r < rows) ? to_float(operand[j * stride_j + r * stride_r]) : 0.f;
  }
}

template <typename TB, typename TOut>
__global__ void __launch_bounds__(kThreads) class_gemm_kernel(ClassGemmParams p) {
  // Pitches one float wider than a row: a j-fastest staging writes down a column.
  __shared__ float a_tile[kTileJ][kTileI + 1];
  __shared__ float b_tile[kTileJ][kTileM + 1];
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;  // 16 × 16 threads
  const int64_t m_tiles = (p.cols + kTileM - 1) / kTileM;
  const int64_t i_tiles = (p.rows + kTileI - 1) / kTileI;
  const int64_t tile = blockIdx.x % (m_tiles * i_tiles);
  const int64_t n = blockIdx.x / (m_tiles * i_tiles * p.splits);
  const int64_t split = (blockIdx.x / (m_tiles * i_tiles)) % p.splits;
  const int64_t i0 = (tile / m_tiles) * kTileI;
  const int64_t m0 = (tile % m_tiles) * kTileM;
  // Chunks of whole slices; a chunk past the end leaves its partial product 0.
  const int64_t chunk = ((p.inner + p.splits - 1) / p.splits + kTileJ - 1) / kTileJ * kTileJ;
  const int64_t j_begin = split * chunk;
  const int64_t j_end = j_begin + chunk < p.inner ? j_begin + chunk : p.inner;
  const float* a = p.a + n * p.a_stride_n;
  const TB* b = static_cast<const TB*>(p.b) + n * p.b_stride_n;
  float acc[2][4] = {};
  for (int64_t j0 = j_begin; j0 < j_end; j0 += kTileJ) {
    stage_tile<kTileI>(a_tile, a, p.a_stride_j, p.a_stride_i, j0, j_end, i0, p.rows);
    stage_tile<kTileM>(b_tile, b, p.b_stride_j, p.b_stride_m, j0, j_end, m0, p.cols);
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
  TOut* out = static_cast<TOut*>(p.out) + (n * p.splits + split) * p.out_stride_n;
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
  const int64_t rows = params.n * (channels ? params.l : params.c);
  const int64_t row_length = channels ? params.c : params.l;
  const dim3 grid(grid_for(rows, 1), static_cast<unsigned int>(std::min<int64_t>(
                                         (row_length + kBackwardTile - 1) / kBackwardTile, 65535)));
  return with_dtype(params.dtype, [&](auto tag) {
    using T = decltype(tag);
    return with_kind(params.kind, [&](auto kind) {
      constexpr PowerKind kKind = decltype(kind)::value;
      if (channels) {
        reduce_backward_kernel<T, kKind, true><<<grid, kThreads, 0, stream>>>(params);
      } else {
        reduce_backward_kernel<T, kKind, false><<<grid, kThreads, 0, stream>>>(params);
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_class_gemm(const ClassGemmParams& params, cudaStream_t stream) {
  if (params.splits < 1 || (params.splits > 1 && (params.relu || params.bias != nullptr))) {
    return cudaErrorInvalidValue;
  }
  const int64_t tiles = params.batch * params.splits * ((params.rows + kTileI - 1) / kTileI) *
                        ((params.cols + kTileM - 1) / kTileM);
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

cudaError_t class_gemm_inner_splits(int64_t batch, int64_t rows, int64_t inner, int64_t cols,
                                    int device, int64_t* splits) {
  int sm_count = 0;
  const cudaError_t status =
      cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
  if (status != cudaSuccess) return status;
  const int64_t tiles = batch * ((rows + kTileI - 1) / kTileI) * ((cols + kTileM - 1) / kTileM);
  const int64_t wanted = (4 * static_cast<int64_t>(sm_count) + tiles - 1) / tiles;
  *splits = std::max<int64_t>(1, std::min<int64_t>(wanted, (inner + 511) / 512));
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace kdops
