// Block-wide sums in a fixed order, and the pixel KLs' loss from per-block partials: shared by the
// softmax-KL kernels (softmax_kl.cu, resized_pixel_kl.cu). Internal linkage, like the kernels of
// each file (anonymous namespace): every including file gets its own copy.
#pragma once

#include <cstdint>

namespace kdops {
namespace cuda {
namespace {

// The block's sum, in thread 0, by a fixed tree (deterministic). `shared` holds kThreads / 32
// values; blockDim.x == kThreads.
template <int kThreads, typename V>
__device__ V block_sum(V v, V* shared) {
  constexpr int kWarps = kThreads / 32;
  constexpr unsigned kFullMask = 0xffffffffu;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(kFullMask, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // a previous call may still be reading `shared`
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? shared[lane] : V(0);
#pragma unroll
    for (int offset = kWarps / 2; offset > 0; offset >>= 1) v += __shfl_down_sync(kFullMask, v, offset);
  }
  return v;
}

// Per-block partial sums of the valid pixels' KL (of type KL) and their count.
template <typename KL>
struct KLPartials {
  KL* kl;
  unsigned long long* valid;
};

// loss = τ² · Σ KL / max(#valid, 1), from `blocks` blocks' partials, in one block of kThreads
// threads, in a fixed order; num_valid = #valid.
template <int kThreads, typename KL>
__global__ void __launch_bounds__(kThreads)
    pixel_kl_loss_kernel(const KLPartials<KL> partials, int blocks, float tau_sq, float* loss,
                         int64_t* num_valid) {
  __shared__ double shared_kl[kThreads / 32];
  __shared__ unsigned long long shared_valid[kThreads / 32];
  double kl = 0.0;
  unsigned long long valid = 0;
  for (int b = threadIdx.x; b < blocks; b += kThreads) {
    kl += partials.kl[b];
    valid += partials.valid[b];
  }
  kl = block_sum<kThreads>(kl, shared_kl);
  valid = block_sum<kThreads>(valid, shared_valid);
  if (threadIdx.x == 0) {
    *loss = static_cast<float>(tau_sq * kl / static_cast<double>(valid > 0 ? valid : 1));
    *num_valid = static_cast<int64_t>(valid);
  }
}

}  // namespace
}  // namespace cuda
}  // namespace kdops
