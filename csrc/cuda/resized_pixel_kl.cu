// CUDA kernels of resized_pixel_kl: pixel_kl of (N, C, h, w) logits resized bilinearly to (H, W)
// (kdops/reference/softmax_kl.py), forward and backward, the resized logits never stored.
// Torch-free: compiles with nvcc alone (tests/test_cuda_sources.py); softmax_kl_api.cpp fills the
// params. What each thread computes is in resized_pixel_kl_threads.h (host and device code: a
// host build runs it in tests/ops/test_resized_pixel_kl_threads.py); this file holds the grids,
// the fixed-order reductions and the launchers. Inputs float32/float16/bfloat16, float32 in
// registers; any strides.
//
// Anchors: a thread per input pixel first takes its largest student and teacher logit over the
// channels (N·h·w·2 floats of scratch, f² times fewer than the output pixels): the interpolation
// runs on differences to them (see the threads header). Forward and backward both run it.
//
// Forward: a thread per output pixel (n, y, x), pixels numbered (n·H + y)·W + x so that a warp
// takes 32 neighbours of one output row: they share their ≤ 2 source rows and, at the usual 8×
// upsampling, 4–5 source columns, so the C·8 reads of a pixel (4 corners, both inputs) are
// served by a few cache lines per warp (NCHW: one line per corner row and channel). The thread
// interpolates each channel's logit from its corners (anchored: see the threads header) and
// streams the C pairs through the one-pass KL state. Per-thread sums of KL (float64) and counts
// go through a fixed shuffle/shared-memory tree into one partial per block; one block sums the
// partials in block order.
//
// Backward, deterministic without atomics: the anchors again, then
//  1. a thread per output pixel recomputes its state and stores its statistics
//     [max_s, log z_s, max_t, log z_t, KL] (N·H·W·5 floats of scratch: O(output pixels), the
//     C-fold larger resized logits are never stored);
//  2. the transpose of the interpolation as a gather, each input gradient element summed by one
//     thread in a fixed order and written once. Default, the tiled form: a block per (n, chunk of
//     4 channels, 2 input rows, tile of ≤ 256 input columns) walks the output rows that read its
//     rows; for each, its threads compute the gradients of the output pixels the tile reads (≤
//     kMaxSpan of them, once each) into shared memory, then the thread of each input column sums
//     its readers' with the column weights and adds that, with the row weight, to its rows. An
//     output pixel's gradient is thus computed about 1.5 times (by the 1–2 row blocks its row
//     reads, and at tile edges), where a gather per input pixel computes it 4 times (its four
//     corners). When not even one input column's readers fit kMaxSpan (upsampling far beyond 8×
//     per side), the per-thread form runs instead: a thread per (n, chunk, r, j) walks the
//     output pixels that read (r, j) and recomputes each one's gradients itself.
// Why a gather: a scatter from the output pixels into their 4 corners needs float atomics
// (nondeterministic) or per-output partial gradients (O(pixels·C) scratch, the tensor this op
// exists to avoid). The recomputed gradients read the inputs from L1/L2 (they are f² times
// smaller than the resized logits: 2.5 MB for (8, 19, 64, 128) bfloat16). Chunks of 4 channels
// share each output pixel's statistics, taps and corner offsets while giving enough blocks to
// fill the GPU (N·⌈C/4⌉·⌈h/2⌉ per column tile: 1280 for (8, 19, 64, 128)); in a warp the threads
// are neighbouring input columns, so the gradient stores are coalesced in NCHW.
//
// Every sum runs in a fixed order (per-thread loops, fixed trees, partials summed by one block):
// bitwise reproducible results on a given device.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/softmax_kl.h"
#include "cuda/block_reduce.cuh"
#include "cuda/resized_pixel_kl.h"
#include "cuda/resized_pixel_kl_threads.h"

namespace kdops {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBlocksPerSm = 8;         // pixel grids: up to 8 blocks per SM, grid-stride beyond
constexpr int kGradBlocksPerSm = 32;    // per-thread gather: long items, (almost) all of them
constexpr int kGatherBlocksPerSm = 16;  // tiled gather: (almost) every block, 5 resident per SM

// Per-block partial sums of the valid pixels' KL and their count (in the forward's workspace).
using Partials = KLPartials<double>;

int grid_for(int64_t items, int num_sms, int blocks_per_sm) {
  const int64_t blocks = (items + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t(num_sms) * blocks_per_sm)));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) resized_pixel_kl_anchors_kernel(const ResizedKLInputs p) {
  const int64_t pixels = resized::input_pixels(p);
  for (int64_t item = int64_t(blockIdx.x) * kThreads + threadIdx.x; item < pixels;
       item += int64_t(gridDim.x) * kThreads) {
    resized::input_anchors<T>(p, item);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    resized_pixel_kl_forward_kernel(const ResizedPixelKLForwardParams p, const Partials out) {
  __shared__ double shared_kl[kWarps];
  __shared__ unsigned long long shared_valid[kWarps];
  const int64_t pixels = resized::output_pixels(p);
  double kl = 0.0;
  unsigned long long valid = 0;
  for (int64_t pixel = int64_t(blockIdx.x) * kThreads + threadIdx.x; pixel < pixels;
       pixel += int64_t(gridDim.x) * kThreads) {
    resized::forward_pixel<T>(p, pixel, kl, valid);
  }
  kl = block_sum<kThreads>(kl, shared_kl);
  valid = block_sum<kThreads>(valid, shared_valid);
  if (threadIdx.x == 0) {
    out.kl[blockIdx.x] = kl;
    out.valid[blockIdx.x] = valid;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    resized_pixel_kl_stats_kernel(const ResizedPixelKLBackwardParams p) {
  const int64_t pixels = resized::output_pixels(p);
  for (int64_t pixel = int64_t(blockIdx.x) * kThreads + threadIdx.x; pixel < pixels;
       pixel += int64_t(gridDim.x) * kThreads) {
    resized::backward_pixel_stats<T>(p, pixel);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    resized_pixel_kl_grads_kernel(const ResizedPixelKLBackwardParams p) {
  const int64_t num_valid = *p.num_valid;
  const float scale = p.tau * *p.grad_loss / static_cast<float>(num_valid > 0 ? num_valid : 1);
  const int64_t items = resized::backward_items(p);
  for (int64_t item = int64_t(blockIdx.x) * kThreads + threadIdx.x; item < items;
       item += int64_t(gridDim.x) * kThreads) {
    resized::backward_input_grads<T>(p, item, scale);
  }
}

// The tiled gather (resized_pixel_kl_threads.h, "tiled form"): steps 1 and 2 for each output row
// that reads the block's input rows, separated by barriers (step 2 reads what step 1 wrote; the
// next step 1 overwrites it). Every loop bound is the same in all threads of a block.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    resized_pixel_kl_gather_kernel(const ResizedPixelKLBackwardParams p,
                                   const resized::GatherTiles tiles) {
  constexpr int K = resized::kChannelsPerItem;
  constexpr int R = resized::kRowsPerBlock;
  __shared__ float shared_s[resized::kSpanPitch * K];
  __shared__ float shared_t[resized::kSpanPitch * K];
  const int64_t num_valid = *p.num_valid;
  const float scale = p.tau * *p.grad_loss / static_cast<float>(num_valid > 0 ? num_valid : 1);
  const int64_t blocks = resized::gather_blocks(p, tiles);
  for (int64_t block = blockIdx.x; block < blocks; block += gridDim.x) {
    const resized::GatherBlock b = resized::gather_block(p, tiles, block);
    const int64_t j = b.j0 + threadIdx.x;
    const bool owner = j < b.j_end;
    float acc_s[R][K], acc_t[R][K];
#pragma unroll
    for (int rho = 0; rho < R; ++rho) {
#pragma unroll
      for (int k = 0; k < K; ++k) acc_s[rho][k] = acc_t[rho][k] = 0.f;
    }
    for (int64_t y = b.y_begin; y < b.y_end; ++y) {
      const BilinearTap ty = bilinear_tap(p.rows, y);
      if (!resized::gather_row_read(b, ty)) continue;
      for (int64_t x = b.x_begin + threadIdx.x; x < b.x_end; x += kThreads) {
        resized::gather_output_grads<T>(p, b, y, ty, x, scale, shared_s, shared_t);
      }
      __syncthreads();
      if (owner) resized::gather_add_row(p, b, ty, j, shared_s, shared_t, acc_s, acc_t);
      __syncthreads();
    }
    if (owner) resized::gather_write<T>(p, b, j, acc_s, acc_t);
  }
}

template <typename F>
cudaError_t with_dtype(DType dtype, F&& launch) {
  switch (dtype) {
    case DType::kFloat32:
      return launch(float{});
    case DType::kFloat16:
      return launch(__half{});
    case DType::kBFloat16:
      return launch(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

int forward_blocks(const ResizedPixelKLForwardParams& p) {
  return grid_for(resized::output_pixels(p), p.num_sms, kBlocksPerSm);
}

// The anchors (N·h·w, 2): a multiple of 8 bytes, so what follows them stays 8-byte aligned.
size_t anchors_bytes(const ResizedKLInputs& p) {
  return static_cast<size_t>(resized::input_pixels(p)) * 2 * sizeof(float);
}

template <typename T>
cudaError_t launch_anchors(const ResizedKLInputs& p, cudaStream_t stream) {
  resized_pixel_kl_anchors_kernel<T>
      <<<grid_for(resized::input_pixels(p), p.num_sms, kBlocksPerSm), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

// Forward workspace: the anchors, then the blocks' KL partials (float64) and counts.
size_t resized_pixel_kl_forward_workspace_bytes(const ResizedPixelKLForwardParams& p) {
  return anchors_bytes(p) +
         static_cast<size_t>(forward_blocks(p)) * (sizeof(double) + sizeof(unsigned long long));
}

// Backward workspace: the output pixels' statistics, then the anchors.
size_t resized_pixel_kl_backward_workspace_bytes(const ResizedPixelKLBackwardParams& p) {
  return static_cast<size_t>(resized::output_pixels(p)) * kKLRowStats * sizeof(float) +
         anchors_bytes(p);
}

cudaError_t launch_resized_pixel_kl_forward(const ResizedPixelKLForwardParams& params,
                                            cudaStream_t stream) {
  ResizedPixelKLForwardParams p = params;
  const int blocks = forward_blocks(p);
  p.anchors = static_cast<float*>(p.workspace);
  Partials partials;
  partials.kl = reinterpret_cast<double*>(static_cast<char*>(p.workspace) + anchors_bytes(p));
  partials.valid = reinterpret_cast<unsigned long long*>(partials.kl + blocks);
  const cudaError_t err = with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    cudaError_t status = launch_anchors<T>(p, stream);
    if (status != cudaSuccess) return status;
    resized_pixel_kl_forward_kernel<T><<<blocks, kThreads, 0, stream>>>(p, partials);
    return cudaGetLastError();
  });
  if (err != cudaSuccess) return err;
  pixel_kl_loss_kernel<kThreads, double>
      <<<1, kThreads, 0, stream>>>(partials, blocks, p.tau_sq, p.loss, p.num_valid);
  return cudaGetLastError();
}

cudaError_t launch_resized_pixel_kl_backward(const ResizedPixelKLBackwardParams& params,
                                             cudaStream_t stream) {
  if (params.grad_student == nullptr && params.grad_teacher == nullptr) return cudaSuccess;
  ResizedPixelKLBackwardParams p = params;
  p.pixel_stats = static_cast<float*>(p.workspace);
  p.anchors = p.pixel_stats + resized::output_pixels(p) * kKLRowStats;
  return with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    cudaError_t err = launch_anchors<T>(p, stream);
    if (err != cudaSuccess) return err;
    resized_pixel_kl_stats_kernel<T>
        <<<grid_for(resized::output_pixels(p), p.num_sms, kBlocksPerSm), kThreads, 0, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    resized::GatherTiles tiles;
    if (resized::choose_gather_tiles(p, kThreads, tiles)) {
      const int64_t blocks = resized::gather_blocks(p, tiles);
      const int grid = static_cast<int>(std::min<int64_t>(blocks, int64_t(p.num_sms) * kGatherBlocksPerSm));
      resized_pixel_kl_gather_kernel<T><<<grid, kThreads, 0, stream>>>(p, tiles);
    } else {
      resized_pixel_kl_grads_kernel<T>
          <<<grid_for(resized::backward_items(p), p.num_sms, kGradBlocksPerSm), kThreads, 0, stream>>>(p);
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace kdops
