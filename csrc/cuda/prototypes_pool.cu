// CUDA kernels of kdops::prototype_pool (class sums and means, per-pixel inverse norms, the
// backward) and the fixed-order sum the family's losses end with. Shared pieces and the work
// units: prototypes_common.cuh.
#include "cuda/prototypes_common.cuh"

namespace kdops {
namespace cuda {

using namespace proto;

namespace {

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
  const int warp = threadIdx.x >> 5;
  const PixelTileLane at = pixel_tile_lane(p.l);
  const int64_t n = at.n, l = at.l;
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
  const int warp = threadIdx.x >> 5;
  const PixelTileLane at = pixel_tile_lane(p.l);
  const int64_t n = at.n, l = at.l;
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
  const unsigned int blocks = pixel_tile_blocks(params.n, params.l);
  return with_dtype(params.dtype, [&](auto tag) {
    pixel_inverse_norms_kernel<decltype(tag)><<<blocks, kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

cudaError_t launch_pool_backward(const PoolBackwardParams& params, cudaStream_t stream) {
  const unsigned int blocks = pixel_tile_blocks(params.n, params.l);
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

cudaError_t launch_sum(const SumParams& params, cudaStream_t stream) {
  return with_acc(params.dtype, [&](auto tag) {
    sum_kernel<decltype(tag)><<<1, kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace kdops
