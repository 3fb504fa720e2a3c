// CUDA kernels of kdops::class_variation_loss (forward, backward statistics, gradient). Shared
// pieces and the work units: prototypes_common.cuh.
#include "cuda/prototypes_common.cuh"

namespace kdops {
namespace cuda {

using namespace proto;

namespace {

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
  const PixelTileLane at = pixel_tile_lane(p.l);
  const int64_t n = at.n, l = at.l;
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
  const int warp = threadIdx.x >> 5;
  const PixelTileLane at = pixel_tile_lane(p.l);
  const int64_t n = at.n, l = at.l;
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

}  // namespace

cudaError_t launch_variation_forward(const VariationParams& params, cudaStream_t stream) {
  const unsigned int blocks = pixel_tile_blocks(params.n, params.l);
  return with_dtype(params.dtype, [&](auto tag) {
    variation_kernel<decltype(tag), false><<<blocks, kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

cudaError_t launch_variation_backward_stats(const VariationParams& params, cudaStream_t stream) {
  const unsigned int blocks = pixel_tile_blocks(params.n, params.l);
  return with_dtype(params.dtype, [&](auto tag) {
    variation_kernel<decltype(tag), true><<<blocks, kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

cudaError_t launch_variation_grad(const VariationGradParams& params, cudaStream_t stream) {
  const unsigned int blocks = pixel_tile_blocks(params.n, params.l);
  return with_dtype(params.dtype, [&](auto tag) {
    variation_grad_kernel<decltype(tag)><<<blocks, kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace kdops
