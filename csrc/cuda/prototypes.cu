// CUDA kernels of the prototype family (see prototypes.h). Torch-free: compiles with nvcc alone
// (tests/test_cuda_sources.py); csrc/cuda/prototypes_api.cpp fills the params from tensors.
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
namespace {

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

unsigned int grid_for(int64_t items, int64_t per_block) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return static_cast<unsigned int>(blocks < 2147483647 ? blocks : 2147483647);
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

// ---------------------------------------------------------------------------------------------
// Class sums

// Warps per class-sums block: the staged tiles stay within 48 KiB of static shared memory.
template <typename Acc>
struct SumWarps {
  static constexpr int value = sizeof(Acc) == 8 ? 4 : 8;
};

// Static shared memory of the class-sums kernel: each warp's staged tile.
template <typename Acc>
struct ClassSumsShared {
  static constexpr int kSumWarps = SumWarps<Acc>::value;
  Acc tile[kSumWarps][kTile][kPad];  // [channel][pixel], then read [lane=channel][t]
  int tile_class[kSumWarps][kTile];
  Acc tile_weight[kSumWarps][kTile];
};

template <typename T>
__global__ void __launch_bounds__(32 * SumWarps<acc_t<T>>::value) class_sums_kernel(ClassSumsParams p) {
  using Acc = acc_t<T>;
  constexpr int kSumWarps = SumWarps<Acc>::value;
  __shared__ ClassSumsShared<Acc> sh;
  auto& tile = sh.tile;
  auto& tile_class = sh.tile_class;
  auto& tile_weight = sh.tile_weight;
  extern __shared__ int32_t class_counts_shared[];  // [kSumWarps][K]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t num_classes = p.labels.num_classes, channels = p.x.c;
  const int64_t length = p.labels.height * p.labels.width;
  const int64_t unit_length = unit_pixels(num_classes);
  const int64_t units = (length + unit_length - 1) / unit_length;
  const int64_t blocks_per_image = (units + kSumWarps - 1) / kSumWarps;
  const int64_t n = blockIdx.x / blocks_per_image;
  const int64_t unit = (blockIdx.x % blocks_per_image) * kSumWarps + warp;
  if (unit >= units) return;  // no block-wide barrier below: warps run independently
  int32_t* counts = class_counts_shared + warp * num_classes;
  for (int64_t k = lane; k < num_classes; k += 32) counts[k] = 0;
  __syncwarp();

  const int64_t c_base = static_cast<int64_t>(blockIdx.y) * 32;
  const int64_t channel = c_base + lane;
  const T* x = static_cast<const T*>(p.x.data) + n * p.x.strides.n;
  const Acc* weights =
      p.weights != nullptr ? static_cast<const Acc*>(p.weights) + n * p.weights_stride_n : nullptr;
  double* sums = p.sums + (n * units + unit) * num_classes * channels;
  const int64_t l_begin = unit * unit_length;
  const int64_t l_end = l_begin + unit_length < length ? l_begin + unit_length : length;

  int current = -1;  // the class of the run being summed (warp-uniform)
  double run = 0.0;
  int32_t run_length = 0;
  // Adds the finished run to the unit's sum of its class (stores it on the class's first run).
  const auto flush = [&]() {
    if (current < 0) return;
    const bool first = counts[current] == 0;
    __syncwarp();
    if (lane == 0) counts[current] += run_length;
    if (channel < channels) {
      double* sum = sums + current * channels + channel;
      *sum = first ? run : *sum + run;
    }
    __syncwarp();
  };

  for (int64_t l0 = l_begin; l0 < l_end; l0 += kTile) {
    const int count = static_cast<int>(l_end - l0 < kTile ? l_end - l0 : kTile);
    const int64_t l = l0 + lane;
    const int cls = lane < count ? class_at(p.labels, n, l) : -1;
    tile_class[warp][lane] = cls;
    tile_weight[warp][lane] = weights != nullptr && cls >= 0 ? weights[l] : Acc(1);
    const T* pixel = x + l * p.x.strides.l;
#pragma unroll 16  // 16 loads of a lane in flight together
    for (int cc = 0; cc < 32; ++cc) {
      const int64_t c = c_base + cc;
      tile[warp][cc][lane] = cls >= 0 && c < channels ? load(pixel + c * p.x.strides.c) : Acc(0);
    }
    __syncwarp();
    for (int t = 0; t < count; ++t) {
      const int k = tile_class[warp][t];
      if (k != current) {
        flush();
        current = k;
        run = 0.0;
        run_length = 0;
      }
      if (k >= 0) {
        run += static_cast<double>(tile[warp][lane][t]) * static_cast<double>(tile_weight[warp][t]);
        ++run_length;
      }
    }
    __syncwarp();
  }
  flush();
  if (blockIdx.y == 0) {
    int32_t* out = p.unit_counts + (n * units + unit) * num_classes;
    for (int64_t k = lane; k < num_classes; k += 32) out[k] = counts[k];
  }
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads) class_means_kernel(ClassMeansParams p) {
  const int64_t groups = p.per_image ? p.n : 1;
  const int64_t total = groups * p.k * p.c;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t c = i % p.c, k = (i / p.c) % p.k, g = i / (p.c * p.k);
    const int64_t first = p.per_image ? g : 0, last = p.per_image ? g + 1 : p.n;
    double sum = 0.0;
    int64_t count = 0;
    for (int64_t u = first * p.units; u < last * p.units; ++u) {
      const int32_t unit_count = p.unit_counts[u * p.k + k];
      if (unit_count > 0) {
        sum += p.sums[(u * p.k + k) * p.c + c];
        count += unit_count;
      }
    }
    static_cast<Acc*>(p.protos)[i] = count > 0 ? static_cast<Acc>(sum / static_cast<double>(count)) : Acc(0);
    if (c == 0) p.counts[g * p.k + k] = count;
  }
}

// ---------------------------------------------------------------------------------------------
// Pixel tiles: norms and the prototype_pool backward

template <typename T>
__global__ void __launch_bounds__(kThreads) pixel_inverse_norms_kernel(PixelInverseNormsParams p) {
  using Acc = acc_t<T>;
  __shared__ Acc partial[kWarps][kTile];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t tiles = (p.l + kTile - 1) / kTile;
  const int64_t n = blockIdx.x / tiles, l = (blockIdx.x % tiles) * kTile + lane;
  Acc sq = 0;
  if (l < p.l) {
    const T* x = static_cast<const T*>(p.x.data) + n * p.x.strides.n + l * p.x.strides.l;
#pragma unroll 4  // several loads in flight per thread
    for (int64_t c = warp; c < p.x.c; c += kWarps) {
      const Acc v = load(x + c * p.x.strides.c);
      sq += v * v;
    }
  }
  sq = sum_over_warps(partial, sq);
  if (warp == 0 && l < p.l) {
    static_cast<Acc*>(p.inv_norms)[n * p.l + l] = inverse_norm<Acc>(sqrt(static_cast<double>(sq)));
  }
}

template <typename T, bool kNormalize>
__global__ void __launch_bounds__(kThreads) pool_backward_kernel(PoolBackwardParams p) {
  using Acc = acc_t<T>;
  __shared__ Acc partial[kWarps][kTile];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t tiles = (p.l + kTile - 1) / kTile;
  const int64_t n = blockIdx.x / tiles, l = (blockIdx.x % tiles) * kTile + lane;
  const int64_t channels = p.x.c, num_classes = p.labels.num_classes;
  const int cls = l < p.l ? class_at(p.labels, n, l) : -1;
  const int64_t g = p.per_image ? n : 0;
  const Acc* row = static_cast<const Acc*>(p.grad_protos) + (g * num_classes + (cls >= 0 ? cls : 0)) * channels;
  Acc inv_count = 0;
  if (cls >= 0) {
    const int64_t count = p.counts[g * num_classes + cls];
    inv_count = static_cast<Acc>(1.0 / static_cast<double>(count > 1 ? count : 1));
  }
  const T* x = static_cast<const T*>(p.x.data) + n * p.x.strides.n + l * p.x.strides.l;
  T* out = static_cast<T*>(p.grad) + n * p.grad_strides.n + l * p.grad_strides.l;
  Acc inv = 0, coef = 0;
  if (kNormalize) {
    // x̂·r = (x·r)/‖x‖; the projection is then x · (x·r)/‖x‖² (none when ‖x‖ ≤ eps).
    Acc sq = 0, dot = 0;
    if (cls >= 0) {
#pragma unroll 4  // several loads in flight per thread
      for (int64_t c = warp; c < channels; c += kWarps) {
        const Acc v = load(x + c * p.x.strides.c);
        sq += v * v;
        dot += v * (row[c] * inv_count);
      }
    }
    sq = sum_over_warps(partial, sq);
    dot = sum_over_warps(partial, dot);
    const double norm = sqrt(static_cast<double>(sq));
    inv = inverse_norm<Acc>(norm);
    coef = norm > kNormEps ? dot * inv * inv : Acc(0);
  }
  if (l >= p.l) return;
#pragma unroll 4  // several loads in flight per thread
  for (int64_t c = warp; c < channels; c += kWarps) {
    Acc value = 0;
    if (cls >= 0) {
      const Acc r = row[c] * inv_count;
      value = kNormalize ? (r - load(x + c * p.x.strides.c) * coef) * inv : r;
    }
    store(out + c * p.grad_strides.c, value);
  }
}

// ---------------------------------------------------------------------------------------------
// Prototypes: normalisation, present classes, gradients through the normalisation

template <typename Acc>
__global__ void __launch_bounds__(kThreads) normalise_protos_kernel(NormaliseProtosParams p) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= p.rows) return;
  const Acc* protos = static_cast<const Acc*>(p.protos) + row * p.c;
  double sq = 0.0;
  for (int64_t c = lane; c < p.c; c += 32) {
    const double v = protos[c];
    sq += v * v;
  }
  const double norm = sqrt(warp_sum(sq));
  const Acc inv = inverse_norm<Acc>(norm);
  Acc* hat = static_cast<Acc*>(p.hat) + row * p.c;
  for (int64_t c = lane; c < p.c; c += 32) hat[c] = protos[c] * inv;
  if (lane == 0) {
    static_cast<Acc*>(p.norm)[row] = static_cast<Acc>(norm);
    static_cast<Acc*>(p.inv)[row] = inv;
  }
}

__global__ void present_classes_kernel(PresentClassesParams p) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= p.groups) return;
  int32_t present = 0;
  for (int64_t k = 0; k < p.k; ++k) {
    if (p.counts[g * p.k + k] > 0) {
      p.present[g * p.k + present] = static_cast<int32_t>(k);
      p.slot[g * p.k + k] = present++;
    } else {
      p.slot[g * p.k + k] = -1;
    }
  }
  p.num_present[g] = present;
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads) protos_grad_kernel(ProtosGradParams p) {
  __shared__ double partial[kThreads];
  const int64_t g = blockIdx.x / p.k, k = blockIdx.x % p.k;
  const int64_t row = p.slot != nullptr ? p.slot[g * p.k + k] : k;
  Acc* out = static_cast<Acc*>(p.out) + (g * p.k + k) * p.c;
  int64_t count = 1;
  if (p.counts != nullptr) count = p.counts[g * p.k + k];
  if (row < 0 || count == 0) {
    for (int64_t c = threadIdx.x; c < p.c; c += kThreads) out[c] = Acc(0);
    return;
  }
  const Acc* hat = static_cast<const Acc*>(p.hat) + (g * p.k + k) * p.c;
  const int64_t first = g * p.units_per_group, last = first + p.units_per_group;
  // grad_hat[c]: the units' partial sums in unit order (computed twice, the same bits).
  const auto grad_hat = [&](int64_t c) {
    double sum = 0.0;
    for (int64_t u = first; u < last; ++u) {
      if (p.unit_counts != nullptr && p.unit_counts[u * p.k + k] == 0) continue;
      sum += p.partials[(u * p.k + row) * p.c + c];
    }
    return sum;
  };
  double dot = 0.0;
  for (int64_t c = threadIdx.x; c < p.c; c += kThreads) dot += static_cast<double>(hat[c]) * grad_hat(c);
  partial[threadIdx.x] = dot;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  dot = partial[0];
  const bool projects = static_cast<double>(static_cast<const Acc*>(p.norm)[g * p.k + k]) > kNormEps;
  const double inv = static_cast<const Acc*>(p.inv)[g * p.k + k];
  const double inv_count = p.counts != nullptr ? 1.0 / static_cast<double>(count) : 1.0;
  for (int64_t c = threadIdx.x; c < p.c; c += kThreads) {
    const double gh = grad_hat(c);
    const double value = (projects ? gh - static_cast<double>(hat[c]) * dot : gh) * inv;
    out[c] = static_cast<Acc>(value * inv_count);
  }
}

// ---------------------------------------------------------------------------------------------
// prototype_kl

// Shared memory of the prototype_kl kernels.
template <typename Acc>
struct KLShared {
  Acc xs[kTile][kPad];  // a staged 32-channel slice: [channel][pixel]
  // A staged slice of 32 prototypes, [channel][class]: a warp's 4 classes are one aligned
  // vector (rows of kHatPitch elements, a multiple of 4).
  __align__(16) Acc hs[kTile][kHatPitch];
  __align__(16) Acc dt[kTile][kHatPitch];  // a 32-class group's ∂cos, [pixel][class]
  Acc partial[kWarps][kTile];
  Acc norm_s[kTile], inv_s[kTile], norm_t[kTile], inv_t[kTile];
  Acc dot_s[kTile], dot_t[kTile];  // Σ_j ∂cos_j cos_j per pixel (backward)
  double kl[kTile];
};

template <typename Acc>
size_t kl_dynamic_bytes(int64_t num_classes) {
  // cos_s and cos_t: [K][kPad] each; present classes: [K] int32.
  return static_cast<size_t>(num_classes) * (2 * kPad * sizeof(Acc) + sizeof(int32_t));
}

// cos[j][t] = x̂_t · P̂_{present[j]} for the P present classes and the tile's pixels (0 past
// `count`), and the pixels' norms. A block-wide call (every thread, barriers inside).
template <typename T>
__device__ __forceinline__ void tile_cosines(const ProtoFeatures& f, int64_t channels, int64_t n, int64_t l0,
                             int count, const acc_t<T>* hat /* (K, C) of the group */,
                             const int32_t* present, int num_present, KLShared<acc_t<T>>& sh,
                             acc_t<T>* cos /* [K][kPad] */, acc_t<T>* norm_out, acc_t<T>* inv_out) {
  using Acc = acc_t<T>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* x = static_cast<const T*>(f.data) + n * f.strides.n + (l0 + lane) * f.strides.l;
  Acc sq = 0;  // Σ x² of pixel `lane` over the channels this thread stages (c ≡ warp mod 8)
  for (int j0 = 0; j0 < num_present; j0 += 32) {
    Acc acc[4] = {0, 0, 0, 0};
    for (int64_t c0 = 0; c0 < channels; c0 += 32) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = warp + kWarps * i;
        const int64_t c = c0 + row;
        Acc v = 0;
        if (c < channels && lane < count) v = load(x + c * f.strides.c);
        sh.xs[row][lane] = v;
        if (j0 == 0) sq += v * v;
        const int j = j0 + row;
        const int64_t hc = c0 + lane;
        sh.hs[lane][row] = j < num_present && hc < channels ? hat[present[j] * channels + hc] : Acc(0);
      }
      __syncthreads();
#pragma unroll 8
      for (int cc = 0; cc < 32; ++cc) {
        const Acc xv = sh.xs[cc][lane];
        Acc h[4];
        load4(&sh.hs[cc][warp * 4], h);  // the same address in every lane: a broadcast
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[r] += h[r] * xv;
      }
      __syncthreads();
    }
    if (j0 == 0) {
      const Acc total = sum_over_warps(sh.partial, sq);
      if (warp == 0) {
        const double norm = sqrt(static_cast<double>(total));
        norm_out[lane] = static_cast<Acc>(norm);
        inv_out[lane] = inverse_norm<Acc>(norm);
      }
      __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int j = j0 + warp * 4 + r;
      if (j < num_present) cos[j * kPad + lane] = acc[r] * inv_out[lane];
    }
  }
  __syncthreads();
}

// Per pixel, the log-softmaxes over the present classes of o = cos/τ (float64) and the KL;
// backward: cos is replaced by ∂loss/∂cos (0 past `count`) and dot = Σ_j ∂cos_j cos_j.
// A warp per pixel (pixels warp, warp + 8, ...), its lanes along the classes.
template <typename Acc, bool kBackward>
__device__ __forceinline__ void tile_softmax(int num_presents, int count, double inv_tau, double scale,
                             Acc* cos_s, Acc* cos_t, KLShared<Acc>& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int num_present = num_presents;
  for (int t = warp; t < kTile; t += kWarps) {
    if (t >= count) {
      if (kBackward) {
        for (int j = lane; j < num_present; j += 32) {
          cos_s[j * kPad + t] = Acc(0);
          cos_t[j * kPad + t] = Acc(0);
        }
      }
      if (lane == 0) sh.kl[t] = 0.0;
      continue;
    }
    double max_s = -INFINITY, max_t = -INFINITY;
    for (int j = lane; j < num_present; j += 32) {
      max_s = fmax(max_s, static_cast<double>(cos_s[j * kPad + t]) * inv_tau);
      max_t = fmax(max_t, static_cast<double>(cos_t[j * kPad + t]) * inv_tau);
    }
    max_s = warp_max(max_s);
    max_t = warp_max(max_t);
    double z_s = 0.0, z_t = 0.0;
    for (int j = lane; j < num_present; j += 32) {
      z_s += exp(static_cast<double>(cos_s[j * kPad + t]) * inv_tau - max_s);
      z_t += exp(static_cast<double>(cos_t[j * kPad + t]) * inv_tau - max_t);
    }
    const double log_z_s = log(warp_sum(z_s)), log_z_t = log(warp_sum(z_t));
    double kl = 0.0;
    for (int j = lane; j < num_present; j += 32) {
      const double log_q = static_cast<double>(cos_s[j * kPad + t]) * inv_tau - max_s - log_z_s;
      const double log_p = static_cast<double>(cos_t[j * kPad + t]) * inv_tau - max_t - log_z_t;
      kl += exp(log_p) * (log_p - log_q);
    }
    kl = warp_sum(kl);
    if (lane == 0) sh.kl[t] = kl;
    if (kBackward) {
      double dot_s = 0.0, dot_t = 0.0;
      for (int j = lane; j < num_present; j += 32) {
        const double cs = cos_s[j * kPad + t], ct = cos_t[j * kPad + t];
        const double log_q = cs * inv_tau - max_s - log_z_s;
        const double log_p = ct * inv_tau - max_t - log_z_t;
        const double prob_p = exp(log_p);
        const double ds = scale * (exp(log_q) - prob_p);
        const double dt = scale * prob_p * (log_p - log_q - kl);
        dot_s += ds * cs;
        dot_t += dt * ct;
        cos_s[j * kPad + t] = static_cast<Acc>(ds);
        cos_t[j * kPad + t] = static_cast<Acc>(dt);
      }
      dot_s = warp_sum(dot_s);
      dot_t = warp_sum(dot_t);
      if (lane == 0) {
        sh.dot_s[t] = static_cast<Acc>(dot_s);
        sh.dot_t[t] = static_cast<Acc>(dot_t);
      }
    }
  }
  __syncthreads();
}

// One side's gradients of a tile from dcos[j][t] = ∂loss/∂cos_j at pixel t (0 past `count`),
// both as small GEMMs over 32-class groups with shared-memory operands:
//   features: ∂x̂ = Σ_j dcos_j P̂_j (a warp's 4 channels × a lane's pixel, the group's P̂ slice
//   staged [class][channel]); ∂x = (∂x̂ − x̂ dot) / ‖x‖ (∂x̂ / eps when ‖x‖ ≤ eps);
//   prototypes: partial[j][c] (+)= Σ_t dcos_j[t] x̂_t[c] (a warp's 4 classes × a lane's channel,
//   the group's dcos staged [pixel][class] and x̂ [channel][pixel]), stored on the chunk's first
//   tile, added on the others: one thread owns each element.
template <typename T>
__device__ __forceinline__ void tile_side_grads(const ProtoFeatures& f, int64_t channels, int64_t n, int64_t l0,
                                int count, const acc_t<T>* hat, const int32_t* present,
                                int num_present, const acc_t<T>* dcos, const acc_t<T>* norm,
                                const acc_t<T>* inv, const acc_t<T>* dot, T* grad,
                                const Strides3& grad_strides, double* partial, bool first_tile,
                                KLShared<acc_t<T>>& sh) {
  using Acc = acc_t<T>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const T* x = static_cast<const T*>(f.data) + n * f.strides.n;
  if (grad != nullptr) {
    const int64_t l = l0 + lane;
    for (int64_t c0 = 0; c0 < channels; c0 += 32) {
      Acc dx[4] = {0, 0, 0, 0};  // channels c0 + 4·warp + r of pixel `lane`
      for (int j0 = 0; j0 < num_present; j0 += 32) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int row = warp + kWarps * i;  // class j0 + row, channel c0 + lane
          const int64_t c = c0 + lane;
          sh.hs[row][lane] =
              j0 + row < num_present && c < channels ? hat[present[j0 + row] * channels + c] : Acc(0);
        }
        __syncthreads();
        const int group = num_present - j0 < 32 ? num_present - j0 : 32;
        for (int jj = 0; jj < group; ++jj) {
          const Acc d = dcos[(j0 + jj) * kPad + lane];
          Acc h[4];
          load4(&sh.hs[jj][warp * 4], h);
#pragma unroll
          for (int r = 0; r < 4; ++r) dx[r] += h[r] * d;
        }
        __syncthreads();
      }
      if (lane < count) {
        const Acc inv_l = inv[lane], dot_l = dot[lane];
        const bool projects = static_cast<double>(norm[lane]) > kNormEps;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int64_t c = c0 + warp * 4 + r;
          if (c >= channels) break;
          const Acc xv = load(x + c * f.strides.c + l * f.strides.l);
          const Acc value = (projects ? dx[r] - xv * inv_l * dot_l : dx[r]) * inv_l;
          store(grad + n * grad_strides.n + c * grad_strides.c + l * grad_strides.l, value);
        }
      }
    }
  }
  if (partial == nullptr) return;
  for (int j0 = 0; j0 < num_present; j0 += 32) {
    // The group's dcos as [pixel][class].
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int t = warp + kWarps * i;
      sh.dt[t][lane] = j0 + lane < num_present ? dcos[(j0 + lane) * kPad + t] : Acc(0);
    }
    for (int64_t c0 = 0; c0 < channels; c0 += 32) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = warp + kWarps * i;
        const int64_t c = c0 + row;
        sh.xs[row][lane] = c < channels && lane < count
                               ? load(x + c * f.strides.c + (l0 + lane) * f.strides.l) * inv[lane]
                               : Acc(0);
      }
      __syncthreads();
      Acc sum[4] = {0, 0, 0, 0};  // classes j0 + 4·warp + r of channel c0 + lane
#pragma unroll 8
      for (int t = 0; t < kTile; ++t) {
        const Acc xv = sh.xs[lane][t];
        Acc d[4];
        load4(&sh.dt[t][warp * 4], d);
#pragma unroll
        for (int r = 0; r < 4; ++r) sum[r] += d[r] * xv;
      }
      const int64_t c = c0 + lane;
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int j = j0 + warp * 4 + r;
        if (j < num_present && c < channels) {
          double* out = partial + static_cast<int64_t>(j) * channels + c;
          *out = first_tile ? static_cast<double>(sum[r]) : *out + static_cast<double>(sum[r]);
        }
      }
      __syncthreads();
    }
  }
}

// Blocks per SM the register budget is cut for: without it ptxas (sm_80, the setup.py flags)
// caps the kernels at 64 registers and spills; the backward keeps ~120 registers (2 blocks).
template <typename T, bool kBackward>
__global__ void __launch_bounds__(kThreads, kBackward ? 2 : 3) prototype_kl_kernel(PrototypeKLParams p) {
  using Acc = acc_t<T>;
  __shared__ KLShared<Acc> sh;
  extern __shared__ __align__(16) unsigned char kl_dynamic[];
  Acc* cos_s = reinterpret_cast<Acc*>(kl_dynamic);
  Acc* cos_t = cos_s + p.k * kPad;
  int32_t* present = reinterpret_cast<int32_t*>(cos_t + p.k * kPad);

  const int64_t chunk = blockIdx.x;
  // 32-bit division (the grid has fewer than 2^31 chunks): a 64-bit one is a call that spills.
  const int64_t n = blockIdx.x / static_cast<uint32_t>(p.chunks_per_image);
  const int64_t chunk_in_image = blockIdx.x % static_cast<uint32_t>(p.chunks_per_image);
  const int64_t g = p.groups == 1 ? 0 : n;
  const int num_present = p.num_present[g];
  for (int64_t k = threadIdx.x; k < num_present; k += kThreads) present[k] = p.present[g * p.k + k];
  __syncthreads();
  const int64_t tiles = (p.l + kTile - 1) / kTile;
  const int64_t first = chunk_in_image * p.tiles_per_chunk;
  const int64_t last = first + p.tiles_per_chunk < tiles ? first + p.tiles_per_chunk : tiles;
  const Acc* hat_s = static_cast<const Acc*>(p.hat_s) + g * p.k * p.cs;
  const Acc* hat_t = static_cast<const Acc*>(p.hat_t) + g * p.k * p.ct;
  double scale = 0.0;
  if (kBackward) scale = static_cast<double>(*static_cast<const Acc*>(p.grad_loss)) * p.grad_scale;
  T* grad_s = static_cast<T*>(p.grad_s);
  T* grad_t = static_cast<T*>(p.grad_t);
  double* partial_s = p.partials_s != nullptr ? p.partials_s + chunk * p.k * p.cs : nullptr;
  double* partial_t = p.partials_t != nullptr ? p.partials_t + chunk * p.k * p.ct : nullptr;
  double chunk_kl = 0.0;
  for (int64_t tile = first; tile < last; ++tile) {
    const int64_t l0 = tile * kTile;
    const int count = static_cast<int>(p.l - l0 < kTile ? p.l - l0 : kTile);
    if (num_present == 0) {
      // Nothing present: KL 0, zero gradients (the chunk's partial sums are never read).
      if (kBackward) {
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        if (lane < count) {
          const int64_t l = l0 + lane;
          if (grad_s != nullptr) {
            for (int64_t c = warp; c < p.cs; c += kWarps) {
              store(grad_s + n * p.grad_s_strides.n + c * p.grad_s_strides.c + l * p.grad_s_strides.l, Acc(0));
            }
          }
          if (grad_t != nullptr) {
            for (int64_t c = warp; c < p.ct; c += kWarps) {
              store(grad_t + n * p.grad_t_strides.n + c * p.grad_t_strides.c + l * p.grad_t_strides.l, Acc(0));
            }
          }
        }
      }
      continue;
    }
    tile_cosines<T>(p.student, p.cs, n, l0, count, hat_s, present, num_present, sh, cos_s, sh.norm_s, sh.inv_s);
    tile_cosines<T>(p.teacher, p.ct, n, l0, count, hat_t, present, num_present, sh, cos_t, sh.norm_t, sh.inv_t);
    tile_softmax<Acc, kBackward>(num_present, count, p.inv_tau, scale, cos_s, cos_t, sh);
    if (!kBackward) {
      if (threadIdx.x == 0) {
        for (int t = 0; t < count; ++t) chunk_kl += sh.kl[t];
      }
      __syncthreads();  // sh.kl is rewritten by the next tile
      continue;
    }
    const bool first_tile = tile == first;
    if (grad_s != nullptr || partial_s != nullptr) {
      tile_side_grads<T>(p.student, p.cs, n, l0, count, hat_s, present, num_present, cos_s, sh.norm_s,
                         sh.inv_s, sh.dot_s, grad_s, p.grad_s_strides, partial_s, first_tile, sh);
    }
    if (grad_t != nullptr || partial_t != nullptr) {
      tile_side_grads<T>(p.teacher, p.ct, n, l0, count, hat_t, present, num_present, cos_t, sh.norm_t,
                         sh.inv_t, sh.dot_t, grad_t, p.grad_t_strides, partial_t, first_tile, sh);
    }
    __syncthreads();  // cos_s / cos_t are rewritten by the next tile
  }
  if (!kBackward && threadIdx.x == 0) p.chunk_kl[chunk] = chunk_kl;
}

// ---------------------------------------------------------------------------------------------
// class_variation_loss

// m = x̂·P̂_y of pixel `lane` of the tile for one side (1 at ignored pixels), with its norm.
template <typename T>
__device__ __forceinline__ acc_t<T> class_cosine(const ProtoFeatures& f, int64_t n, int64_t l, int cls,
                                                 const acc_t<T>* hat /* (N, K, C) */,
                                                 int64_t num_classes, acc_t<T> (*partial)[kTile],
                                                 acc_t<T>& norm_out) {
  using Acc = acc_t<T>;
  const int warp = threadIdx.x >> 5;
  Acc sq = 0, dot = 0;
  if (cls >= 0) {
    const T* x = static_cast<const T*>(f.data) + n * f.strides.n + l * f.strides.l;
    const Acc* row = hat + (n * num_classes + cls) * f.c;
#pragma unroll 4  // several loads in flight per thread
    for (int64_t c = warp; c < f.c; c += kWarps) {
      const Acc v = load(x + c * f.strides.c);
      sq += v * v;
      dot += v * row[c];
    }
  }
  sq = sum_over_warps(partial, sq);
  dot = sum_over_warps(partial, dot);
  const double norm = sqrt(static_cast<double>(sq));
  norm_out = static_cast<Acc>(norm);
  // A select, not a product: an ignored pixel's features may be anything.
  return cls >= 0 ? dot * inverse_norm<Acc>(norm) : Acc(1);
}

template <typename T, bool kStats>
__global__ void __launch_bounds__(kThreads) variation_kernel(VariationParams p) {
  using Acc = acc_t<T>;
  __shared__ Acc partial[kWarps][kTile];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t tiles = (p.l + kTile - 1) / kTile;
  const int64_t n = blockIdx.x / tiles, l = (blockIdx.x % tiles) * kTile + lane;
  const bool inside = l < p.l;
  const int cls = inside ? class_at(p.labels, n, l) : -1;
  Acc norm_s, norm_t;
  const Acc m_s = class_cosine<T>(p.student, n, l, cls, static_cast<const Acc*>(p.hat_s), p.k, partial, norm_s);
  const Acc m_t = class_cosine<T>(p.teacher, n, l, cls, static_cast<const Acc*>(p.hat_t), p.k, partial, norm_t);
  if (warp != 0) return;
  if (!kStats) {
    const double d = static_cast<double>(m_s) - static_cast<double>(m_t);
    const double sum = warp_sum(inside ? d * d : 0.0);
    if (lane == 0) p.tile_sums[blockIdx.x] = sum;
    return;
  }
  if (!inside) return;
  const Acc scale = static_cast<Acc>(static_cast<double>(*static_cast<const Acc*>(p.grad_loss)) * p.grad_scale);
  const Acc e = cls >= 0 ? scale * (m_s - m_t) : Acc(0);
  Acc* stats = static_cast<Acc*>(p.stats) + n * 6 * p.l + l;
  stats[0 * p.l] = e * inverse_norm<Acc>(norm_s);
  stats[1 * p.l] = -e * inverse_norm<Acc>(norm_t);
  stats[2 * p.l] = m_s;
  stats[3 * p.l] = m_t;
  stats[4 * p.l] = norm_s;
  stats[5 * p.l] = norm_t;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) variation_grad_kernel(VariationGradParams p) {
  using Acc = acc_t<T>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t tiles = (p.l + kTile - 1) / kTile;
  const int64_t n = blockIdx.x / tiles, l = (blockIdx.x % tiles) * kTile + lane;
  if (l >= p.l) return;
  const int cls = class_at(p.labels, n, l);
  T* out = static_cast<T*>(p.grad) + n * p.grad_strides.n + l * p.grad_strides.l;
  if (cls < 0) {
    for (int64_t c = warp; c < p.x.c; c += kWarps) store(out + c * p.grad_strides.c, Acc(0));
    return;
  }
  const Acc* stats = static_cast<const Acc*>(p.stats) + n * 6 * p.l + l;
  const Acc direct = stats[p.side * p.l];             // ±e/‖x‖'
  const Acc m = stats[(2 + p.side) * p.l];
  const double norm = static_cast<double>(stats[(4 + p.side) * p.l]);
  const Acc project = norm > kNormEps ? direct * m * inverse_norm<Acc>(norm) : Acc(0);
  const Acc* hat = static_cast<const Acc*>(p.hat) + (n * p.k + cls) * p.x.c;
  const Acc* pooled = static_cast<const Acc*>(p.pooled) + (n * p.k + cls) * p.x.c;
  const T* x = static_cast<const T*>(p.x.data) + n * p.x.strides.n + l * p.x.strides.l;
#pragma unroll 4  // several loads in flight per thread
  for (int64_t c = warp; c < p.x.c; c += kWarps) {
    const Acc value = direct * hat[c] - project * load(x + c * p.x.strides.c) + pooled[c];
    store(out + c * p.grad_strides.c, value);
  }
}

// ---------------------------------------------------------------------------------------------
// A fixed-order sum

template <typename Acc>
__global__ void __launch_bounds__(kThreads) sum_kernel(SumParams p) {
  __shared__ double partial[kThreads];
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < p.count; i += kThreads) sum += p.values[i];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) *static_cast<Acc*>(p.loss) = static_cast<Acc>(partial[0] * p.scale);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Launchers

int64_t class_sum_units(int64_t l, int64_t num_classes) {
  return (l + unit_pixels(num_classes) - 1) / unit_pixels(num_classes);
}

cudaError_t launch_class_sums(const ClassSumsParams& params, cudaStream_t stream) {
  const int64_t length = params.labels.height * params.labels.width;
  const int64_t units = class_sum_units(length, params.labels.num_classes);
  const int64_t channel_tiles = (params.x.c + 31) / 32;
  if (channel_tiles > 65535) return cudaErrorInvalidValue;
  return with_dtype(params.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int kSumWarps = SumWarps<acc_t<T>>::value;
    const int64_t blocks_per_image = (units + kSumWarps - 1) / kSumWarps;
    const size_t dynamic = static_cast<size_t>(kSumWarps) * params.labels.num_classes * sizeof(int32_t);
    const cudaError_t status = allow_shared(class_sums_kernel<T>, dynamic, sizeof(ClassSumsShared<acc_t<T>>));
    if (status != cudaSuccess) return status;
    const dim3 grid(static_cast<unsigned int>(params.n * blocks_per_image),
                    static_cast<unsigned int>(channel_tiles));
    class_sums_kernel<T><<<grid, 32 * kSumWarps, dynamic, stream>>>(params);
    return cudaGetLastError();
  });
}

cudaError_t launch_class_means(const ClassMeansParams& params, cudaStream_t stream) {
  const int64_t groups = params.per_image ? params.n : 1;
  const unsigned int blocks = grid_for(groups * params.k * params.c, kThreads);
  return with_acc(params.dtype, [&](auto tag) {
    class_means_kernel<decltype(tag)><<<blocks, kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

cudaError_t launch_pixel_inverse_norms(const PixelInverseNormsParams& params, cudaStream_t stream) {
  const unsigned int blocks = grid_for(params.n * ((params.l + kTile - 1) / kTile), 1);
  return with_dtype(params.dtype, [&](auto tag) {
    pixel_inverse_norms_kernel<decltype(tag)><<<blocks, kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

cudaError_t launch_pool_backward(const PoolBackwardParams& params, cudaStream_t stream) {
  const unsigned int blocks = grid_for(params.n * ((params.l + kTile - 1) / kTile), 1);
  return with_dtype(params.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (params.normalize) {
      pool_backward_kernel<T, true><<<blocks, kThreads, 0, stream>>>(params);
    } else {
      pool_backward_kernel<T, false><<<blocks, kThreads, 0, stream>>>(params);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_normalise_protos(const NormaliseProtosParams& params, cudaStream_t stream) {
  return with_acc(params.dtype, [&](auto tag) {
    normalise_protos_kernel<decltype(tag)><<<grid_for(params.rows, kWarps), kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

cudaError_t launch_present_classes(const PresentClassesParams& params, cudaStream_t stream) {
  present_classes_kernel<<<grid_for(params.groups, 64), 64, 0, stream>>>(params);
  return cudaGetLastError();
}

int64_t prototype_kl_tiles_per_chunk(int64_t num_classes, bool backward) {
  if (!backward) return 1;
  // A chunk's partial ∂P̂ (K × C float64) is at most about half its pixels' features (32 · T · C).
  const int64_t tiles = (num_classes + 7) / 8;
  return tiles < 4 ? 4 : (tiles > 64 ? 64 : tiles);
}

size_t prototype_kl_shared_bytes(int64_t num_classes, ProtoDType dtype) {
  return dtype == ProtoDType::kFloat64
             ? sizeof(KLShared<double>) + kl_dynamic_bytes<double>(num_classes)
             : sizeof(KLShared<float>) + kl_dynamic_bytes<float>(num_classes);
}

size_t prototype_kl_max_shared_bytes() { return 160 * 1024; }  // under sm_80's 163 KiB opt-in

template <bool kBackward>
cudaError_t launch_prototype_kl(const PrototypeKLParams& params, cudaStream_t stream) {
  const unsigned int blocks = grid_for(params.n * params.chunks_per_image, 1);
  return with_dtype(params.dtype, [&](auto tag) {
    using T = decltype(tag);
    const size_t dynamic = kl_dynamic_bytes<acc_t<T>>(params.k);
    const cudaError_t status =
        allow_shared(prototype_kl_kernel<T, kBackward>, dynamic, sizeof(KLShared<acc_t<T>>));
    if (status != cudaSuccess) return status;
    prototype_kl_kernel<T, kBackward><<<blocks, kThreads, dynamic, stream>>>(params);
    return cudaGetLastError();
  });
}

cudaError_t launch_prototype_kl_forward(const PrototypeKLParams& params, cudaStream_t stream) {
  return launch_prototype_kl<false>(params, stream);
}

cudaError_t launch_prototype_kl_backward(const PrototypeKLParams& params, cudaStream_t stream) {
  return launch_prototype_kl<true>(params, stream);
}

cudaError_t launch_protos_grad(const ProtosGradParams& params, cudaStream_t stream) {
  return with_acc(params.dtype, [&](auto tag) {
    protos_grad_kernel<decltype(tag)><<<grid_for(params.groups * params.k, 1), kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

cudaError_t launch_variation_forward(const VariationParams& params, cudaStream_t stream) {
  const unsigned int blocks = grid_for(params.n * ((params.l + kTile - 1) / kTile), 1);
  return with_dtype(params.dtype, [&](auto tag) {
    variation_kernel<decltype(tag), false><<<blocks, kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

cudaError_t launch_variation_backward_stats(const VariationParams& params, cudaStream_t stream) {
  const unsigned int blocks = grid_for(params.n * ((params.l + kTile - 1) / kTile), 1);
  return with_dtype(params.dtype, [&](auto tag) {
    variation_kernel<decltype(tag), true><<<blocks, kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

cudaError_t launch_variation_grad(const VariationGradParams& params, cudaStream_t stream) {
  const unsigned int blocks = grid_for(params.n * ((params.l + kTile - 1) / kTile), 1);
  return with_dtype(params.dtype, [&](auto tag) {
    variation_grad_kernel<decltype(tag)><<<blocks, kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

cudaError_t launch_sum(const SumParams& params, cudaStream_t stream) {
  return with_acc(params.dtype, [&](auto tag) {
    sum_kernel<decltype(tag)><<<1, kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace kdops
