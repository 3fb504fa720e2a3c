// CUDA kernels of channel_kl and pixel_kl (forward and backward). Torch-free: compiles with nvcc
// alone (tests/test_cuda_sources.py); csrc/cuda/softmax_kl_api.cpp fills the params from tensors.
// Math: csrc/common/softmax_kl.h. Inputs float32/float16/bfloat16, float32 in registers.
//
// channel_kl forward: a block per piece of a row (rows are cut into pieces so that the grid fills
// the GPU when rows are few and long); each thread streams its elements through a one-pass state
// in registers, merged across the block by warp shuffles and shared memory. With more than one
// piece per row a second kernel merges a row's pieces in order; a single block then sums the
// rows' KL in a fixed order.
// channel_kl backward: the same pieces, one more read of s and t per row using the row's saved
// statistics, each requested gradient written once.
// Fast: rows with stride_l == 1 (contiguous NCHW) are read (and written) with 16-byte vector loads
// when aligned. channels_last rows (stride C) are read element by element: correct but
// uncoalesced (the C rows of one image share cache lines, so L2 absorbs part of it).
//
// pixel_kl: stride_l == 1 (contiguous NCHW): a thread per pixel loops over C, its loads coalesced
// across the warp (adjacent pixels are adjacent in memory). stride_c == 1 (channels_last): a group
// of G lanes per pixel splits its C contiguous channels; the lanes' states merge by shuffles.
// The backward recomputes each pixel's softmaxes from the inputs (the forward saves no
// per-pixel tensor): one online pass for the statistics, one pass writing the gradients.
//
// Every sum runs in a fixed order (per-thread loops, fixed shuffle trees, per-block partials
// summed by one block), so results are bitwise reproducible on a given device.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/softmax_kl.h"
#include "cuda/block_reduce.cuh"
#include "cuda/convert.cuh"
#include "cuda/softmax_kl.h"

namespace kdops {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBlocksPerSm = 8;  // grid size: up to 8 blocks per SM, grid-stride loops beyond
constexpr unsigned kFullMask = 0xffffffffu;

using State = KLState<float>;
using RowStats = KLRowStats<float>;

// ---------------------------------------------------------------------------------------------
// Element access

// Elements per 16-byte vector: 4 floats or 8 16-bit values.
template <typename T>
constexpr int kVecWidth = 16 / sizeof(T);

// 16 aligned bytes at p, as floats.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[kVecWidth<T>]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* values = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int k = 0; k < kVecWidth<T>; ++k) out[k] = to_float(values[k]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[kVecWidth<T>]) {
  uint4 raw;
  T* values = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int k = 0; k < kVecWidth<T>; ++k) values[k] = from_float<T>(in[k]);
  *reinterpret_cast<uint4*>(p) = raw;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Rows of `x` can be read as whole aligned 16-byte vectors of `width` elements.
bool rows_vectorizable(const void* x, const Strides3& st, int64_t l, int width) {
  return x == nullptr || (aligned16(x) && st.l == 1 && l % width == 0 && st.n % width == 0 &&
                          st.c % width == 0);
}

// ---------------------------------------------------------------------------------------------
// Reductions

__device__ __forceinline__ State shfl_down(const State& st, int offset) {
  return State{__shfl_down_sync(kFullMask, st.ms, offset), __shfl_down_sync(kFullMask, st.zs, offset),
               __shfl_down_sync(kFullMask, st.mt, offset), __shfl_down_sync(kFullMask, st.zt, offset),
               __shfl_down_sync(kFullMask, st.w, offset)};
}

__device__ __forceinline__ State shfl_xor(const State& st, int mask, int width) {
  return State{__shfl_xor_sync(kFullMask, st.ms, mask, width),
               __shfl_xor_sync(kFullMask, st.zs, mask, width),
               __shfl_xor_sync(kFullMask, st.mt, mask, width),
               __shfl_xor_sync(kFullMask, st.zt, mask, width),
               __shfl_xor_sync(kFullMask, st.w, mask, width)};
}

// The merge of the block's states, in thread 0. `shared` holds kWarps states.
__device__ State block_merge(State st, State* shared, float inv_tau) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) st = kl_merge(st, shfl_down(st, offset), inv_tau);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // the previous call may still be reading `shared`
  if (lane == 0) shared[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? shared[lane] : kl_state_empty<float>();
#pragma unroll
    for (int offset = kWarps / 2; offset > 0; offset >>= 1) {
      st = kl_merge(st, shfl_down(st, offset), inv_tau);
    }
  }
  return st;
}

// The merge of the states of a group of G lanes (G | 32), the same bits in every lane of the
// group: each pair merges (lower lane, upper lane) in that order.
template <int G>
__device__ __forceinline__ State group_merge(State st, float inv_tau) {
  const int lane = threadIdx.x % G;
#pragma unroll
  for (int offset = G / 2; offset > 0; offset >>= 1) {
    const State other = shfl_xor(st, offset, G);
    st = (lane & offset) ? kl_merge(other, st, inv_tau) : kl_merge(st, other, inv_tau);
  }
  return st;
}

// Adds W elements (raw logits) to a state: one rescale check for the W, then W plain additions.
template <int W>
__device__ __forceinline__ void push_vec(State& st, const float (&xs)[W], const float (&xt)[W],
                                         float inv_tau) {
  float ms = xs[0], mt = xt[0];
#pragma unroll
  for (int k = 1; k < W; ++k) {
    ms = fmaxf(ms, xs[k]);
    mt = fmaxf(mt, xt[k]);
  }
  if (kl_is_empty(st)) {
    st = kl_state_at(ms, mt);
  } else if (kl_overshoots(st, ms, mt, inv_tau)) {
    kl_rebase(st, fmaxf(ms, st.ms), fmaxf(mt, st.mt), inv_tau);
  }
#pragma unroll
  for (int k = 0; k < W; ++k) kl_add(st, xs[k], xt[k], inv_tau);
}

__device__ __forceinline__ void write_row_stats(float* row_stats, int64_t row, const RowStats& r) {
  float* out = row_stats + kKLRowStats * row;
  out[0] = r.ms;
  out[1] = r.log_zs;
  out[2] = r.mt;
  out[3] = r.log_zt;
  out[4] = r.kl;
}

__device__ __forceinline__ RowStats read_row_stats(const float* row_stats, int64_t row) {
  const float* in = row_stats + kKLRowStats * row;
  return RowStats{in[0], in[1], in[2], in[3], in[4]};
}

// The requested gradients at one element of raw logits (uniform branches: the flags are per
// launch).
__device__ __forceinline__ void element_grads(float xs, float xt, const RowStats& r, float inv_tau,
                                              float scale, bool want_s, bool want_t, float& gs,
                                              float& gt) {
  if (want_s && want_t) {
    kl_grad_both(xs, xt, r, inv_tau, scale, gs, gt);
  } else if (want_s) {
    gs = kl_grad_student(xs, xt, r, inv_tau, scale);
  } else {
    gt = kl_grad_teacher(xs, xt, r, inv_tau, scale);
  }
}

// ---------------------------------------------------------------------------------------------
// channel_kl

struct RowPieces {
  int64_t count;   // pieces per row
  int64_t length;  // elements per piece (a multiple of 8: whole vectors)
};

// Enough pieces per row for kBlocksPerSm blocks per SM, none shorter than kMinPiece elements.
RowPieces forward_pieces(int64_t rows, int64_t l, int num_sms) {
  constexpr int64_t kMinPiece = 8192;
  const int64_t wanted = (int64_t(num_sms) * kBlocksPerSm + rows - 1) / rows;
  int64_t count = std::max<int64_t>(1, std::min(wanted, l / kMinPiece));
  int64_t length = (l + count - 1) / count;
  length = (length + 7) / 8 * 8;
  count = (l + length - 1) / length;
  return {count, length};
}

int grid_for(int64_t items, int num_sms, int blocks_per_sm) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(items, int64_t(num_sms) * blocks_per_sm)));
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    channel_kl_pieces_kernel(const ChannelKLForwardParams p, const RowPieces pieces) {
  __shared__ State shared[kWarps];
  const T* student = static_cast<const T*>(p.student);
  const T* teacher = static_cast<const T*>(p.teacher);
  State* partial = static_cast<State*>(p.workspace);
  const int64_t items = p.n * p.c * pieces.count;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t row = item / pieces.count;
    const int64_t l0 = (item % pieces.count) * pieces.length;
    const int64_t l1 = min(p.l, l0 + pieces.length);
    const int64_t n = row / p.c, c = row % p.c;
    const T* s = student + n * p.student_strides.n + c * p.student_strides.c;
    const T* t = teacher + n * p.teacher_strides.n + c * p.teacher_strides.c;
    State st = kl_state_empty<float>();
    if constexpr (kVec > 1) {
      for (int64_t l = l0 + threadIdx.x * kVec; l < l1; l += kThreads * kVec) {
        float xs[kVec], xt[kVec];
        load_vec(s + l, xs);
        load_vec(t + l, xt);
        push_vec(st, xs, xt, p.inv_tau);
      }
    } else {
      for (int64_t l = l0 + threadIdx.x; l < l1; l += kThreads) {
        kl_push(st, to_float(s[l * p.student_strides.l]), to_float(t[l * p.teacher_strides.l]),
                p.inv_tau);
      }
    }
    st = block_merge(st, shared, p.inv_tau);
    if (threadIdx.x == 0) {
      if (pieces.count == 1) {
        write_row_stats(p.row_stats, row, kl_finalize(st));
      } else {
        partial[item] = st;
      }
    }
  }
}

// Merges each row's pieces in order into its statistics.
__global__ void __launch_bounds__(kThreads)
    channel_kl_merge_kernel(const State* partial, int64_t rows, int64_t count, float inv_tau,
                            float* row_stats) {
  for (int64_t row = int64_t(blockIdx.x) * kThreads + threadIdx.x; row < rows;
       row += int64_t(gridDim.x) * kThreads) {
    State st = kl_state_empty<float>();
    for (int64_t piece = 0; piece < count; ++piece) {
      st = kl_merge(st, partial[row * count + piece], inv_tau);
    }
    write_row_stats(row_stats, row, kl_finalize(st));
  }
}

// loss = scale · Σ_rows KL, in one block, in a fixed order.
__global__ void __launch_bounds__(kThreads)
    channel_kl_loss_kernel(const float* row_stats, int64_t rows, float scale, float* loss) {
  __shared__ double shared[kWarps];
  double sum = 0.0;
  for (int64_t row = threadIdx.x; row < rows; row += kThreads) {
    sum += row_stats[kKLRowStats * row + 4];
  }
  sum = block_sum<kThreads>(sum, shared);
  if (threadIdx.x == 0) *loss = static_cast<float>(sum * scale);
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    channel_kl_backward_kernel(const ChannelKLBackwardParams p, const RowPieces pieces) {
  const T* student = static_cast<const T*>(p.student);
  const T* teacher = static_cast<const T*>(p.teacher);
  T* grad_student = static_cast<T*>(p.grad_student);
  T* grad_teacher = static_cast<T*>(p.grad_teacher);
  const bool want_s = grad_student != nullptr, want_t = grad_teacher != nullptr;
  const float scale = p.tau_over_rows * *p.grad_loss;
  const int64_t items = p.n * p.c * pieces.count;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t row = item / pieces.count;
    const int64_t l0 = (item % pieces.count) * pieces.length;
    const int64_t l1 = min(p.l, l0 + pieces.length);
    const int64_t n = row / p.c, c = row % p.c;
    const RowStats r = read_row_stats(p.row_stats, row);
    const T* s = student + n * p.student_strides.n + c * p.student_strides.c;
    const T* t = teacher + n * p.teacher_strides.n + c * p.teacher_strides.c;
    T* gs = want_s ? grad_student + n * p.grad_student_strides.n + c * p.grad_student_strides.c
                   : nullptr;
    T* gt = want_t ? grad_teacher + n * p.grad_teacher_strides.n + c * p.grad_teacher_strides.c
                   : nullptr;
    if constexpr (kVec > 1) {
      for (int64_t l = l0 + threadIdx.x * kVec; l < l1; l += kThreads * kVec) {
        float xs[kVec], xt[kVec], out_s[kVec], out_t[kVec];
        load_vec(s + l, xs);
        load_vec(t + l, xt);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          element_grads(xs[k], xt[k], r, p.inv_tau, scale, want_s, want_t, out_s[k], out_t[k]);
        }
        if (want_s) store_vec(gs + l, out_s);
        if (want_t) store_vec(gt + l, out_t);
      }
    } else {
      for (int64_t l = l0 + threadIdx.x; l < l1; l += kThreads) {
        float out_s = 0.f, out_t = 0.f;
        element_grads(to_float(s[l * p.student_strides.l]), to_float(t[l * p.teacher_strides.l]),
                      r, p.inv_tau, scale, want_s, want_t, out_s, out_t);
        if (want_s) gs[l * p.grad_student_strides.l] = from_float<T>(out_s);
        if (want_t) gt[l * p.grad_teacher_strides.l] = from_float<T>(out_t);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// pixel_kl

template <typename Params>
__device__ __forceinline__ bool pixel_valid(const Params& p, int64_t n, int64_t l) {
  return p.target == nullptr || p.target[n * p.target_stride_n + l * p.target_stride_l] != p.ignore_index;
}

// The statistics of pixel (n, l) from channels lane, lane + G, … (G = 1: all of them).
template <typename T, typename Params>
__device__ __forceinline__ State pixel_state(const Params& p, int64_t n, int64_t l, int lane, int G) {
  const T* s = static_cast<const T*>(p.student) + n * p.student_strides.n + l * p.student_strides.l;
  const T* t = static_cast<const T*>(p.teacher) + n * p.teacher_strides.n + l * p.teacher_strides.l;
  State st = kl_state_empty<float>();
  for (int64_t c = lane; c < p.c; c += G) {
    kl_push(st, to_float(s[c * p.student_strides.c]), to_float(t[c * p.teacher_strides.c]),
            p.inv_tau);
  }
  return st;
}

// Writes the gradients of pixel (n, l) at channels lane, lane + G, …; zeros where scale is 0
// (an ignored pixel, whose logits are never read).
template <typename T>
__device__ __forceinline__ void write_pixel_grads(const PixelKLBackwardParams& p, int64_t n, int64_t l,
                                                  int lane, int G, const RowStats& r, float scale) {
  const T* s = static_cast<const T*>(p.student) + n * p.student_strides.n + l * p.student_strides.l;
  const T* t = static_cast<const T*>(p.teacher) + n * p.teacher_strides.n + l * p.teacher_strides.l;
  T* gs = static_cast<T*>(p.grad_student);
  T* gt = static_cast<T*>(p.grad_teacher);
  const bool want_s = gs != nullptr, want_t = gt != nullptr;
  if (want_s) gs += n * p.grad_student_strides.n + l * p.grad_student_strides.l;
  if (want_t) gt += n * p.grad_teacher_strides.n + l * p.grad_teacher_strides.l;
  for (int64_t c = lane; c < p.c; c += G) {
    float out_s = 0.f, out_t = 0.f;
    if (scale != 0.f) {
      element_grads(to_float(s[c * p.student_strides.c]), to_float(t[c * p.teacher_strides.c]), r,
                    p.inv_tau, scale, want_s, want_t, out_s, out_t);
    }
    if (want_s) gs[c * p.grad_student_strides.c] = from_float<T>(out_s);
    if (want_t) gt[c * p.grad_teacher_strides.c] = from_float<T>(out_t);
  }
}

// Per-block partial sums of the valid pixels' KL and their count.
using PixelPartials = KLPartials<float>;

__device__ void write_pixel_partials(float kl, unsigned long long valid, PixelPartials out) {
  __shared__ double shared_kl[kWarps];
  __shared__ unsigned long long shared_valid[kWarps];
  const double kl_sum = block_sum<kThreads>(static_cast<double>(kl), shared_kl);
  const unsigned long long valid_sum = block_sum<kThreads>(valid, shared_valid);
  if (threadIdx.x == 0) {
    out.kl[blockIdx.x] = static_cast<float>(kl_sum);
    out.valid[blockIdx.x] = valid_sum;
  }
}

// G lanes per pixel (G = 1: a thread per pixel). Pixels are taken a warp at a time so that every
// lane of a warp runs the same number of rounds (the group merge shuffles need the full warp).
template <typename T, int G>
__global__ void __launch_bounds__(kThreads)
    pixel_kl_forward_kernel(const PixelKLForwardParams p, const PixelPartials out) {
  constexpr int kGroupsPerWarp = 32 / G;
  const int lane = threadIdx.x % G;
  const int64_t group = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / G;
  const int64_t groups = int64_t(gridDim.x) * (kThreads / G);
  const int64_t pixels = p.n * p.l;
  float kl = 0.f;
  unsigned long long valid = 0;
  for (int64_t base = group - group % kGroupsPerWarp; base < pixels; base += groups) {
    const int64_t pixel = base + group % kGroupsPerWarp;
    const int64_t n = pixel / p.l, l = pixel % p.l;
    const bool counted = pixel < pixels && pixel_valid(p, n, l);
    State st = counted ? pixel_state<T>(p, n, l, lane, G) : kl_state_empty<float>();
    if constexpr (G > 1) st = group_merge<G>(st, p.inv_tau);
    if (counted && lane == 0) {
      kl += kl_of(st);
      ++valid;
    }
  }
  write_pixel_partials(kl, valid, out);
}

template <typename T, int G>
__global__ void __launch_bounds__(kThreads) pixel_kl_backward_kernel(const PixelKLBackwardParams p) {
  constexpr int kGroupsPerWarp = 32 / G;
  const int lane = threadIdx.x % G;
  const int64_t group = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / G;
  const int64_t groups = int64_t(gridDim.x) * (kThreads / G);
  const int64_t pixels = p.n * p.l;
  const int64_t num_valid = *p.num_valid;
  const float scale = p.tau * *p.grad_loss / static_cast<float>(num_valid > 0 ? num_valid : 1);
  for (int64_t base = group - group % kGroupsPerWarp; base < pixels; base += groups) {
    const int64_t pixel = base + group % kGroupsPerWarp;
    const int64_t n = pixel / p.l, l = pixel % p.l;
    const bool inside = pixel < pixels;
    const bool counted = inside && pixel_valid(p, n, l);
    State st = counted ? pixel_state<T>(p, n, l, lane, G) : kl_state_empty<float>();
    if constexpr (G > 1) st = group_merge<G>(st, p.inv_tau);
    if (inside) {
      write_pixel_grads<T>(p, n, l, lane, G,
                           counted ? kl_finalize(st) : RowStats{0.f, 0.f, 0.f, 0.f, 0.f},
                           counted ? scale : 0.f);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launch

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

// Lanes per pixel: 1 unless the channels are contiguous (channels_last), then about C/2 lanes.
int lanes_per_pixel(const Strides3& student, int64_t c) {
  if (student.c != 1 || c == 1) return 1;
  if (c <= 8) return 4;
  if (c <= 16) return 8;
  if (c <= 32) return 16;
  return 32;
}

template <typename F>
cudaError_t with_group(int lanes, F&& launch) {
  switch (lanes) {
    case 4:
      return launch(std::integral_constant<int, 4>{});
    case 8:
      return launch(std::integral_constant<int, 8>{});
    case 16:
      return launch(std::integral_constant<int, 16>{});
    case 32:
      return launch(std::integral_constant<int, 32>{});
    default:
      return launch(std::integral_constant<int, 1>{});
  }
}

int pixel_grid(int64_t pixels, int lanes, int num_sms) {
  return grid_for((pixels * lanes + kThreads - 1) / kThreads, num_sms, kBlocksPerSm);
}

}  // namespace

size_t channel_kl_forward_workspace_bytes(const ChannelKLForwardParams& p) {
  const RowPieces pieces = forward_pieces(p.n * p.c, p.l, p.num_sms);
  return pieces.count > 1 ? sizeof(State) * p.n * p.c * pieces.count : 0;
}

cudaError_t launch_channel_kl_forward(const ChannelKLForwardParams& p, cudaStream_t stream) {
  const int64_t rows = p.n * p.c;
  const RowPieces pieces = forward_pieces(rows, p.l, p.num_sms);
  const int grid = grid_for(rows * pieces.count, p.num_sms, kBlocksPerSm);
  const cudaError_t err = with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int W = kVecWidth<T>;
    if (rows_vectorizable(p.student, p.student_strides, p.l, W) &&
        rows_vectorizable(p.teacher, p.teacher_strides, p.l, W)) {
      channel_kl_pieces_kernel<T, W><<<grid, kThreads, 0, stream>>>(p, pieces);
    } else {
      channel_kl_pieces_kernel<T, 1><<<grid, kThreads, 0, stream>>>(p, pieces);
    }
    return cudaGetLastError();
  });
  if (err != cudaSuccess) return err;
  if (pieces.count > 1) {
    channel_kl_merge_kernel<<<grid_for((rows + kThreads - 1) / kThreads, p.num_sms, kBlocksPerSm),
                              kThreads, 0, stream>>>(static_cast<const State*>(p.workspace), rows,
                                                     pieces.count, p.inv_tau, p.row_stats);
  }
  channel_kl_loss_kernel<<<1, kThreads, 0, stream>>>(p.row_stats, rows, p.loss_scale, p.loss);
  return cudaGetLastError();
}

cudaError_t launch_channel_kl_backward(const ChannelKLBackwardParams& p, cudaStream_t stream) {
  const int64_t rows = p.n * p.c;
  return with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int W = kVecWidth<T>;
    const bool vectorized = rows_vectorizable(p.student, p.student_strides, p.l, W) &&
                            rows_vectorizable(p.teacher, p.teacher_strides, p.l, W) &&
                            rows_vectorizable(p.grad_student, p.grad_student_strides, p.l, W) &&
                            rows_vectorizable(p.grad_teacher, p.grad_teacher_strides, p.l, W);
    // Pieces of 4 vectors (or elements) per thread.
    const int64_t length = int64_t(kThreads) * 4 * (vectorized ? W : 1);
    const RowPieces pieces{(p.l + length - 1) / length, length};
    const int grid = grid_for(rows * pieces.count, p.num_sms, 2 * kBlocksPerSm);
    if (vectorized) {
      channel_kl_backward_kernel<T, W><<<grid, kThreads, 0, stream>>>(p, pieces);
    } else {
      channel_kl_backward_kernel<T, 1><<<grid, kThreads, 0, stream>>>(p, pieces);
    }
    return cudaGetLastError();
  });
}

size_t pixel_kl_forward_workspace_bytes(const PixelKLForwardParams& p) {
  const int blocks = pixel_grid(p.n * p.l, lanes_per_pixel(p.student_strides, p.c), p.num_sms);
  return blocks * (sizeof(unsigned long long) + sizeof(float));
}

cudaError_t launch_pixel_kl_forward(const PixelKLForwardParams& p, cudaStream_t stream) {
  const int lanes = lanes_per_pixel(p.student_strides, p.c);
  const int blocks = pixel_grid(p.n * p.l, lanes, p.num_sms);
  // Counts first: 8-byte aligned in the (256-byte aligned) workspace.
  PixelPartials partials;
  partials.valid = static_cast<unsigned long long*>(p.workspace);
  partials.kl = reinterpret_cast<float*>(partials.valid + blocks);
  const cudaError_t err = with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    return with_group(lanes, [&](auto group) {
      pixel_kl_forward_kernel<T, decltype(group)::value><<<blocks, kThreads, 0, stream>>>(p, partials);
      return cudaGetLastError();
    });
  });
  if (err != cudaSuccess) return err;
  pixel_kl_loss_kernel<kThreads, float>
      <<<1, kThreads, 0, stream>>>(partials, blocks, p.tau_sq, p.loss, p.num_valid);
  return cudaGetLastError();
}

cudaError_t launch_pixel_kl_backward(const PixelKLBackwardParams& p, cudaStream_t stream) {
  const int lanes = lanes_per_pixel(p.student_strides, p.c);
  const int blocks = pixel_grid(p.n * p.l, lanes, p.num_sms);
  return with_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    return with_group(lanes, [&](auto group) {
      pixel_kl_backward_kernel<T, decltype(group)::value><<<blocks, kThreads, 0, stream>>>(p);
      return cudaGetLastError();
    });
  });
}

}  // namespace cuda
}  // namespace kdops
