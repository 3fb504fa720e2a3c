// Shared pieces of the CUDA kernels of the prototype family (prototypes_pool.cu,
// prototypes_kl.cu, prototypes_variation.cu; parameters and launchers: prototypes.h): launch
// shapes, element access, the labels at the features' resolution, warp reductions, dtype
// dispatch. Torch-free (nvcc alone); prototypes_api.cpp fills the params from tensors.
//
// Work units (every one a function of the shapes only, never of the device: bitwise
// reproducible results):
//   class sums   a warp per unit of unit_pixels(K) consecutive pixels of one image and a block column
//                of 32 channels. The warp stages 32 pixels × 32 channels in shared memory (lanes
//                along the pixels: coalesced in NCHW), then walks the pixels in order with its
//                lanes along the channels, summing runs of one class in a float64 register and
//                adding each run to the unit's (class, channel) sum: no atomics, the order fixed.
//                A second kernel adds the units' sums in unit order.
//   pixel tiles  a block of 8 warps per 32 consecutive pixels of one image (lanes along the
//                pixels, warps along the channels, c ≡ warp mod 8): per-pixel reductions over the
//                channels are 8 per-warp partial sums added in warp order.
//   prototype_kl a block per chunk of 32-pixel tiles. Cosines to the present classes: 32 classes ×
//                32 pixels at a time, 32-channel slices of x and P̂ staged in shared memory, 4
//                classes per warp in registers; the tile's (P × 32) cosines of both sides live in
//                shared memory only. The softmaxes over the classes run per pixel (a warp per
//                pixel, lanes along the classes, fixed shuffle trees) in float64. The backward
//                recomputes all of it and adds the tile's ∂P̂ = Σ_pixels ∂cos · x̂ to its chunk's
//                float64 partial sums (read-modify-write by the one thread that owns the element).
//
// Ignored pixels' features are never read (NaN there reaches nothing).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/prototypes.h"
#include "cuda/convert.cuh"
#include "cuda/prototypes.h"

namespace kdops {
namespace cuda {
namespace proto {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kTile = 32;            // pixels per tile
constexpr int kPad = kTile + 1;      // row length of [rows][kTile] shared arrays (no bank conflicts)
// Class sums: pixels per warp unit. Smaller units give more warps (loads in flight); each unit
// has K × C float64 partial sums, so many classes take larger units (at most about a third of
// the features' bytes for float32, K ≤ 64 with 512 pixels, K ≤ 150 with 1024).
__host__ __device__ __forceinline__ int64_t unit_pixels(int64_t num_classes) {
  return num_classes <= 64 ? 512 : 1024;
}
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kHatPitch = kTile + 4;

// ---------------------------------------------------------------------------------------------
// Element access: float32 arithmetic for float32 / float16 / bfloat16, float64 for float64.

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

template <typename T>
__device__ __forceinline__ acc_t<T> load(const T* p) {
  return to_float(*p);
}
template <>
__device__ __forceinline__ double load<double>(const double* p) {
  return *p;
}

template <typename T>
__device__ __forceinline__ void store(T* p, acc_t<T> v) {
  *p = from_float<T>(v);
}
template <>
__device__ __forceinline__ void store<double>(double* p, double v) {
  *p = v;
}

__device__ __forceinline__ int64_t label_value(const ProtoLabels& lb, int64_t offset) {
  switch (lb.dtype) {
    case ProtoLabelDType::kInt64: return static_cast<const int64_t*>(lb.data)[offset];
    case ProtoLabelDType::kInt32: return static_cast<const int32_t*>(lb.data)[offset];
    case ProtoLabelDType::kInt16: return static_cast<const int16_t*>(lb.data)[offset];
    case ProtoLabelDType::kInt8: return static_cast<const int8_t*>(lb.data)[offset];
    case ProtoLabelDType::kUInt8: return static_cast<const uint8_t*>(lb.data)[offset];
  }
  return lb.ignore_index;
}

// The class of pixel l of image n at the feature resolution, or −1 (ignored, or a bad label:
// flagged).
__device__ __forceinline__ int class_at(const ProtoLabels& lb, int64_t n, int64_t l) {
  const int64_t h = l / lb.width, w = l - h * lb.width;
  const int64_t row = nearest_source_index_scaled(h, lb.in_h, lb.height, lb.scale_h);
  const int64_t col = nearest_source_index_scaled(w, lb.in_w, lb.width, lb.scale_w);
  const int64_t value = label_value(lb, n * lb.stride_n + row * lb.stride_h + col * lb.stride_w);
  if (value == lb.ignore_index) return -1;
  if (value < 0 || value >= lb.num_classes) {
    *lb.bad_label = 1;
    return -1;
  }
  return static_cast<int>(value);
}

// 1/max(norm, eps) in float64 (independent of fast-math division), as Acc.
template <typename Acc>
__device__ __forceinline__ Acc inverse_norm(double norm) {
  return static_cast<Acc>(1.0 / fmax(norm, kNormEps));
}

// Four consecutive elements of 16-byte-aligned shared memory, in vector loads.
__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x;
  v[1] = t.y;
  v[2] = t.z;
  v[3] = t.w;
}
__device__ __forceinline__ void load4(const double* p, double (&v)[4]) {
  const double2 a = *reinterpret_cast<const double2*>(p);
  const double2 b = *reinterpret_cast<const double2*>(p + 2);
  v[0] = a.x;
  v[1] = a.y;
  v[2] = b.x;
  v[3] = b.y;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}
__device__ __forceinline__ double warp_max(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmax(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// Σ over the block's warps of partial[warp][lane], in warp order (the same bits in every warp).
template <typename V>
__device__ __forceinline__ V sum_over_warps(V (*partial)[kTile], V value) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  partial[warp][lane] = value;
  __syncthreads();
  V total = partial[0][lane];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total += partial[w][lane];
  __syncthreads();
  return total;
}

inline unsigned int grid_for(int64_t items, int64_t per_block) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned int>(blocks < 2147483647 ? blocks : 2147483647);
}

// Pixel-tile kernels: a block per kTile consecutive pixels of one image (n images of l pixels).
inline unsigned int pixel_tile_blocks(int64_t n, int64_t l) {
  return grid_for(n * ((l + kTile - 1) / kTile), 1);
}

// The image of this pixel-tile block and the pixel of this lane (l may be past the image's end).
struct PixelTileLane {
  int64_t n, l;
};
__device__ __forceinline__ PixelTileLane pixel_tile_lane(int64_t length) {
  const int64_t tiles = (length + kTile - 1) / kTile;
  return {static_cast<int64_t>(blockIdx.x) / tiles,
          (static_cast<int64_t>(blockIdx.x) % tiles) * kTile + (threadIdx.x & 31)};
}

// Static plus dynamic shared memory above 48 KiB must be requested per kernel (only then: the
// common launches make no extra runtime call).
template <typename Kernel>
cudaError_t allow_shared(Kernel kernel, size_t dynamic_bytes, size_t static_bytes) {
  if (dynamic_bytes + static_bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(dynamic_bytes));
}

template <typename F>
cudaError_t with_dtype(ProtoDType dtype, F&& f) {
  switch (dtype) {
    case ProtoDType::kFloat32: return f(float{});
    case ProtoDType::kFloat16: return f(__half{});
    case ProtoDType::kBFloat16: return f(__nv_bfloat16{});
    case ProtoDType::kFloat64: return f(double{});
  }
  return cudaErrorInvalidValue;
}

template <typename F>
cudaError_t with_acc(ProtoDType dtype, F&& f) {
  if (dtype == ProtoDType::kFloat64) return f(double{});
  if (dtype == ProtoDType::kFloat32) return f(float{});
  return cudaErrorInvalidValue;
}

}  // namespace proto
}  // namespace cuda
}  // namespace kdops
