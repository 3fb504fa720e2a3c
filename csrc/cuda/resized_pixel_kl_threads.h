// What one thread of each resized_pixel_kl kernel computes (csrc/cuda/resized_pixel_kl.cu), as
// __host__ __device__ code: the kernels call it per work item, and the host build in
// tests/cuda_host/ runs the very same code on the CPU (float32) over every item, so that the
// index arithmetic and the transposed interpolation are tested where there is no GPU.
// Math: csrc/common/softmax_kl.h (the one-pass KL state) and csrc/common/bilinear.h (the resize).
//
// Anchored interpolation. Each output pixel's resized logits are interpolated as differences to
// an anchor a, the largest logit over the channels at the pixel's corner of the largest weight
// (0 when not finite; one per input pixel and side, computed first by input_anchors):
// s' = Σ w·(s − a_s), t' = Σ w·(t − a_t). The softmaxes and the KL depend only on differences
// of logits within a pixel, so s', t' give the same loss and gradients (∂/∂a = −Σ_c (q − p) = 0:
// a is a constant for the gradient), while the rounding of the interpolation happens at the
// magnitude of s − a instead of s: logits with a common offset (|s| ~ 1e4, where a float32
// interpolation of the raw values rounds at ~1e-3) keep float32 accuracy where the probability
// is, and a channel masked at −1e4 is as harmless as a −inf (its own difference rounds, at a
// probability of e^{-1e4}): the shift-safe rule of softmax_kl.h carried through the resize.
// The reference (bilinear_resize anchored) and the CPU and Triton kernels subtract each
// corner's own anchor instead; both are exact shifts of the pixel's logits, so the two differ
// in rounding only. One anchor per reader here: four cost the backward kernels 6 registers and
// made them spill under their launch bounds.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "common/bilinear.h"
#include "common/softmax_kl.h"
#include "cuda/resized_pixel_kl.h"

// Loop unrolling on the device (the host build's compiler has no such pragma).
#if defined(__CUDACC__)
#define KDOPS_UNROLL _Pragma("unroll")
#else
#define KDOPS_UNROLL
#endif

namespace kdops {
namespace cuda {
namespace resized {

// Storage ↔ float32 (host and device: the half types' conversions are __host__ __device__).
KDOPS_HD float load_float(float x) { return x; }
KDOPS_HD void store_float(float* p, float v) { *p = v; }
#if defined(__CUDACC__)
KDOPS_HD float load_float(__half x) { return __half2float(x); }
KDOPS_HD float load_float(__nv_bfloat16 x) { return __bfloat162float(x); }
KDOPS_HD void store_float(__half* p, float v) { *p = __float2half_rn(v); }
KDOPS_HD void store_float(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
#endif

// x when finite, else 0 (x − x is NaN for ±inf and NaN).
KDOPS_HD float finite_or_zero(float x) { return x - x == 0.f ? x : 0.f; }

// Output pixels (n, y, x) of the H·W of each image, numbered (n·H + y)·W + x.
struct OutputPixel {
  int64_t n, y, x;
};

KDOPS_HD int64_t output_pixels(const ResizedKLInputs& p) { return p.n * p.rows.out * p.cols.out; }

KDOPS_HD int64_t input_pixels(const ResizedKLInputs& p) { return p.n * p.rows.in * p.cols.in; }

KDOPS_HD OutputPixel output_pixel(const ResizedKLInputs& p, int64_t pixel) {
  const int64_t width = p.cols.out, height = p.rows.out;
  const int64_t row = pixel / width;
  return OutputPixel{row / height, row % height, pixel % width};
}

KDOPS_HD bool output_valid(const ResizedKLInputs& p, int64_t n, int64_t y, int64_t x) {
  return p.target == nullptr ||
         p.target[n * p.target_stride_n + y * p.target_stride_h + x * p.target_stride_w] !=
             p.ignore_index;
}

// The anchors, one thread per input pixel (n, r, j), numbered (n·h + r)·w + j: the largest
// student and teacher logits over the channels (NaN is passed over: the pixels that read a NaN
// get it through their values), 0 when not finite.
template <typename T>
KDOPS_HD void input_anchors(const ResizedKLInputs& p, int64_t item) {
  const int64_t in_w = p.cols.in, in_h = p.rows.in;
  const int64_t j = item % in_w, row = item / in_w;
  const int64_t r = row % in_h, n = row / in_h;
  const T* s = static_cast<const T*>(p.student) + n * p.student_strides.n + r * p.student_strides.h +
               j * p.student_strides.w;
  const T* t = static_cast<const T*>(p.teacher) + n * p.teacher_strides.n + r * p.teacher_strides.h +
               j * p.teacher_strides.w;
  float ms = -INFINITY, mt = -INFINITY;
  for (int64_t c = 0; c < p.c; ++c) {
    ms = KLMath<float>::max(ms, load_float(s[c * p.student_strides.c]));
    mt = KLMath<float>::max(mt, load_float(t[c * p.teacher_strides.c]));
  }
  p.anchors[2 * item] = finite_or_zero(ms);
  p.anchors[2 * item + 1] = finite_or_zero(mt);
}

// One input tensor read at one output pixel: its four corners' offsets in image n, the weights
// and the anchor.
template <typename T>
struct PixelReader {
  const T* image;  // image n, channel 0
  int64_t stride_c;
  int64_t corner[4];  // offsets of corners (y0, x0), (y0, x1), (y1, x0), (y1, x1) (BilinearCorner)
  float ly, lx, anchor;

  KDOPS_HD PixelReader(const void* data, const Strides4& st, int64_t n, const BilinearPixel& px,
                       float anchor_)
      : image(static_cast<const T*>(data) + n * st.n), stride_c(st.c), ly(px.ly), lx(px.lx),
        anchor(anchor_) {
    const int64_t row0 = px.y0 * st.h, row1 = px.y1 * st.h;
    const int64_t col0 = px.x0 * st.w, col1 = px.x1 * st.w;
    corner[kCorner00] = row0 + col0;
    corner[kCorner01] = row0 + col1;
    corner[kCorner10] = row1 + col0;
    corner[kCorner11] = row1 + col1;
  }

  // The anchored resized logit of channel c.
  KDOPS_HD float at(int64_t c) const {
    const T* plane = image + c * stride_c;
    return bilinear_value(ly, lx, [&](int k) { return load_float(plane[corner[k]]) - anchor; });
  }
};

// The anchors' index of output pixel px of image n: its corner of the largest weight (λ > ½ picks
// the second row or column; a corner it reads).
KDOPS_HD int64_t anchor_index(const ResizedKLInputs& p, int64_t n, const BilinearPixel& px) {
  const int64_t y = px.ly > 0.5f ? px.y1 : px.y0;
  const int64_t x = px.lx > 0.5f ? px.x1 : px.x0;
  return 2 * ((n * p.rows.in + y) * p.cols.in + x);
}

// The one-pass KL state of output pixel (n, y, x) over all C channels.
template <typename T>
KDOPS_HD KLState<float> output_state(const ResizedKLInputs& p, const OutputPixel& o) {
  const BilinearPixel px = bilinear_pixel(bilinear_tap(p.rows, o.y), bilinear_tap(p.cols, o.x));
  const int64_t a = anchor_index(p, o.n, px);
  const PixelReader<T> s(p.student, p.student_strides, o.n, px, p.anchors[a]);
  const PixelReader<T> t(p.teacher, p.teacher_strides, o.n, px, p.anchors[a + 1]);
  KLState<float> st = kl_state_empty<float>();
  for (int64_t c = 0; c < p.c; ++c) kl_push(st, s.at(c), t.at(c), p.inv_tau);
  return st;
}

// Forward, one thread per output pixel: adds the pixel's KL to kl and 1 to valid when it is
// counted; an ignored pixel's logits are never read.
template <typename T>
KDOPS_HD void forward_pixel(const ResizedKLInputs& p, int64_t pixel, double& kl,
                            unsigned long long& valid) {
  const OutputPixel o = output_pixel(p, pixel);
  if (!output_valid(p, o.n, o.y, o.x)) return;
  kl += static_cast<double>(kl_of(output_state<T>(p, o)));
  ++valid;
}

// Backward, first kernel, one thread per output pixel: the pixel's statistics
// [max_s, log z_s, max_t, log z_t, KL] (maxima in anchored units) into pixel_stats; nothing for
// an ignored pixel (the second kernel never reads its row).
template <typename T>
KDOPS_HD void backward_pixel_stats(const ResizedPixelKLBackwardParams& p, int64_t pixel) {
  const OutputPixel o = output_pixel(p, pixel);
  if (!output_valid(p, o.n, o.y, o.x)) return;
  const KLRowStats<float> r = kl_finalize(output_state<T>(p, o));
  float* out = p.pixel_stats + kKLRowStats * pixel;
  out[0] = r.ms;
  out[1] = r.log_zs;
  out[2] = r.mt;
  out[3] = r.log_zt;
  out[4] = r.kl;
}

KDOPS_HD KLRowStats<float> read_pixel_stats(const float* pixel_stats, int64_t pixel) {
  const float* in = pixel_stats + kKLRowStats * pixel;
  return KLRowStats<float>{in[0], in[1], in[2], in[3], in[4]};
}

// Channels per backward work item: each item keeps K gradients of each input in registers.
constexpr int kChannelsPerItem = 4;

KDOPS_HD int64_t channel_chunks(int64_t c) { return (c + kChannelsPerItem - 1) / kChannelsPerItem; }

// Backward work items: (n, channel chunk, input row r, input column j), j fastest.
KDOPS_HD int64_t backward_items(const ResizedKLInputs& p) {
  return p.n * channel_chunks(p.c) * p.rows.in * p.cols.in;
}

// Backward, second kernel, per-thread form (the fallback of the tiled form below, for tiles whose
// readers cannot fit its shared memory), one thread per item (n, chunk, r, j): the gradients of
// input pixel
// (n, ·, r, j) at channels chunk·K … chunk·K + K − 1, each written once:
//   grad[n, c, r, j] = Σ_{valid outputs (y, x) reading (r, j)} w_y(y, r)·w_x(x, j)·g(y, x, c),
// g = scale·(q − p) for the student, scale·p·(log p − log q − KL) for the teacher (the plain
// pixel_kl backward at the resized logits, from the pixel's saved statistics), summed with y, then
// x ascending. The outputs reading row r are bilinear_readers(rows, r) (likewise for columns), so
// the loops visit every output of nonzero weight on (r, j) and only the few of weight 0 besides
// (i0 = r − 1 with λ = 0), which are skipped; ignored outputs are skipped too (never read, never
// multiplied by 0). An input that no valid output reads gets exact zeros.
// scale = τ·grad_loss/max(#valid, 1).
template <typename T>
KDOPS_HD void backward_input_grads(const ResizedPixelKLBackwardParams& p, int64_t item,
                                   float scale) {
  constexpr int K = kChannelsPerItem;
  const int64_t in_w = p.cols.in, in_h = p.rows.in;
  const int64_t j = item % in_w;
  int64_t rest = item / in_w;
  const int64_t r = rest % in_h;
  rest /= in_h;
  const int64_t chunks = channel_chunks(p.c);
  const int64_t c0 = (rest % chunks) * K;
  const int64_t n = rest / chunks;
  const bool want_s = p.grad_student != nullptr, want_t = p.grad_teacher != nullptr;

  float acc_s[K], acc_t[K];
KDOPS_UNROLL
  for (int k = 0; k < K; ++k) acc_s[k] = acc_t[k] = 0.f;

  const BilinearRange ys = bilinear_readers(p.rows, r);
  const BilinearRange xs = bilinear_readers(p.cols, j);
  for (int64_t y = ys.begin; y < ys.end; ++y) {
    const BilinearTap ty = bilinear_tap(p.rows, y);
    const float wy = bilinear_weight(ty, r);
    if (wy == 0.f) continue;
    for (int64_t x = xs.begin; x < xs.end; ++x) {
      const BilinearTap tx = bilinear_tap(p.cols, x);
      const float wx = bilinear_weight(tx, j);
      if (wx == 0.f || !output_valid(p, n, y, x)) continue;
      const KLRowStats<float> stats =
          read_pixel_stats(p.pixel_stats, (n * p.rows.out + y) * p.cols.out + x);
      const BilinearPixel px = bilinear_pixel(ty, tx);
      const int64_t a = anchor_index(p, n, px);
      const PixelReader<T> s(p.student, p.student_strides, n, px, p.anchors[a]);
      const PixelReader<T> t(p.teacher, p.teacher_strides, n, px, p.anchors[a + 1]);
      const float weight = wy * wx;
KDOPS_UNROLL
      for (int k = 0; k < K; ++k) {
        const int64_t c = c0 + k;
        if (c >= p.c) break;
        const float xs_c = s.at(c), xt_c = t.at(c);
        if (want_s && want_t) {
          float gs, gt;
          kl_grad_both(xs_c, xt_c, stats, p.inv_tau, scale, gs, gt);
          acc_s[k] += weight * gs;
          acc_t[k] += weight * gt;
        } else if (want_s) {
          acc_s[k] += weight * kl_grad_student(xs_c, xt_c, stats, p.inv_tau, scale);
        } else {
          acc_t[k] += weight * kl_grad_teacher(xs_c, xt_c, stats, p.inv_tau, scale);
        }
      }
    }
  }

KDOPS_UNROLL
  for (int k = 0; k < K; ++k) {
    const int64_t c = c0 + k;
    if (c >= p.c) break;
    if (want_s) {
      const Strides4& g = p.grad_student_strides;
      store_float(static_cast<T*>(p.grad_student) + n * g.n + c * g.c + r * g.h + j * g.w, acc_s[k]);
    }
    if (want_t) {
      const Strides4& g = p.grad_teacher_strides;
      store_float(static_cast<T*>(p.grad_teacher) + n * g.n + c * g.c + r * g.h + j * g.w, acc_t[k]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, second kernel, tiled form (the default; backward_input_grads above when a tile cannot
// fit): a block per (n, chunk of K channels, kRowsPerBlock input rows r0…, tile of input columns
// j0 … j_end). The block walks, y ascending, the output rows that read its input rows; for each:
//  1. its threads compute the gradients g(y, x, c) of every output pixel x that the tile's columns
//     read (the tile's span, ≤ kMaxSpan columns: bilinear_readers of j0 to j_end − 1, contiguous)
//     into shared memory, each pixel once (exact zeros at ignored pixels, whose logits are not
//     read);
//  2. the thread of input column j sums its readers x ascending, S(y, j) = Σ_x w_x(x, j)·g(y, x),
//     and adds w_y(y, r)·S(y, j) to each of its rows r that y reads (terms of weight 0 skipped:
//     never multiplied).
// Each output pixel's gradient is computed once per block that reads it: by the 1–2 row blocks
// whose rows its y reads (1 + 1/kRowsPerBlock on average) and twice at a tile's edge columns —
// about 1.5× the forward's work where the per-thread form does 4×. The sums run in a fixed order
// (x ascending within S, y ascending across rows): bitwise reproducible.
constexpr int kRowsPerBlock = 2;  // input rows per block
constexpr int kMaxSpan = 1280;    // output columns per tile
// Shared memory: for each of the K channels a plane of kMaxSpan gradients, one pad word after
// every 32, so that step 2's reads — thread j of a warp at column f·j + c at an f× upsampling —
// hit each bank at most twice for f ≤ 32 (without the pad: f ways for f = 2…8, e.g. 8 at the
// usual 8×); 2·K·kSpanPitch floats in all.
constexpr int kSpanPitch = kMaxSpan + kMaxSpan / 32;

// The shared-memory slot of output column x_begin + offset at channel c0 + k.
KDOPS_HD int64_t span_slot(int64_t offset, int k) { return k * kSpanPitch + offset + offset / 32; }

// Tiles of input columns: `cols` per tile, `per_row` tiles per input row.
struct GatherTiles {
  int64_t cols, per_row;
};

// The output columns the input columns [j0, j_end) read (j_end > j0).
KDOPS_HD BilinearRange tile_span(const ResizedKLInputs& p, int64_t j0, int64_t j_end) {
  return BilinearRange{bilinear_readers(p.cols, j0).begin, bilinear_readers(p.cols, j_end - 1).end};
}

// The widest tiles (at most `threads` columns: a thread per column) whose spans fit kMaxSpan;
// false when not even one column's does (then the per-thread form runs).
inline bool choose_gather_tiles(const ResizedKLInputs& p, int64_t threads, GatherTiles& tiles) {
  const int64_t w = p.cols.in;
  for (int64_t cols = w < threads ? w : threads;; cols = (cols + 1) / 2) {
    int64_t widest = 0;
    for (int64_t j0 = 0; j0 < w; j0 += cols) {
      const int64_t j_end = j0 + cols < w ? j0 + cols : w;
      const BilinearRange span = tile_span(p, j0, j_end);
      if (span.end - span.begin > widest) widest = span.end - span.begin;
    }
    if (widest <= kMaxSpan) {
      tiles = GatherTiles{cols, (w + cols - 1) / cols};
      return true;
    }
    if (cols == 1) return false;
  }
}

KDOPS_HD int64_t row_blocks(const ResizedKLInputs& p) {
  return (p.rows.in + kRowsPerBlock - 1) / kRowsPerBlock;
}

KDOPS_HD int64_t gather_blocks(const ResizedKLInputs& p, const GatherTiles& tiles) {
  return p.n * channel_chunks(p.c) * row_blocks(p) * tiles.per_row;
}

// One block's work: image n, channels c0 …, input rows [r0, r_end), input columns [j0, j_end),
// the output rows [y_begin, y_end) and columns [x_begin, x_end) that read them.
struct GatherBlock {
  int64_t n, c0, r0, r_end, j0, j_end, y_begin, y_end, x_begin, x_end;
};

// Blocks numbered ((n·chunks + chunk)·row_blocks + row block)·per_row + tile.
KDOPS_HD GatherBlock gather_block(const ResizedKLInputs& p, const GatherTiles& tiles, int64_t block) {
  const int64_t tile = block % tiles.per_row;
  int64_t rest = block / tiles.per_row;
  const int64_t row_block = rest % row_blocks(p);
  rest /= row_blocks(p);
  const int64_t chunks = channel_chunks(p.c);
  GatherBlock b;
  b.c0 = (rest % chunks) * kChannelsPerItem;
  b.n = rest / chunks;
  b.r0 = row_block * kRowsPerBlock;
  b.r_end = b.r0 + kRowsPerBlock < p.rows.in ? b.r0 + kRowsPerBlock : p.rows.in;
  b.j0 = tile * tiles.cols;
  b.j_end = b.j0 + tiles.cols < p.cols.in ? b.j0 + tiles.cols : p.cols.in;
  b.y_begin = bilinear_readers(p.rows, b.r0).begin;
  b.y_end = bilinear_readers(p.rows, b.r_end - 1).end;
  const BilinearRange span = tile_span(p, b.j0, b.j_end);
  b.x_begin = span.begin;
  b.x_end = span.end;
  return b;
}

// Whether output row `ty` reads one of the block's rows with nonzero weight (the same answer in
// every thread: the block skips the row together).
KDOPS_HD bool gather_row_read(const GatherBlock& b, const BilinearTap& ty) {
  for (int64_t r = b.r0; r < b.r_end; ++r) {
    if (bilinear_weight(ty, r) != 0.f) return true;
  }
  return false;
}

// Step 1 for output pixel (b.n, y, x): its gradients at channels c0 … c0 + K − 1 into
// shared_s/shared_t at span_slot(x − x_begin, k) (0 at an ignored pixel and past the last
// channel).
template <typename T>
KDOPS_HD void gather_output_grads(const ResizedPixelKLBackwardParams& p, const GatherBlock& b,
                                  int64_t y, const BilinearTap& ty, int64_t x, float scale,
                                  float* shared_s, float* shared_t) {
  constexpr int K = kChannelsPerItem;
  const int64_t offset = x - b.x_begin;
  const bool want_s = p.grad_student != nullptr, want_t = p.grad_teacher != nullptr;
  if (!output_valid(p, b.n, y, x)) {
KDOPS_UNROLL
    for (int k = 0; k < K; ++k) shared_s[span_slot(offset, k)] = shared_t[span_slot(offset, k)] = 0.f;
    return;
  }
  const KLRowStats<float> stats =
      read_pixel_stats(p.pixel_stats, (b.n * p.rows.out + y) * p.cols.out + x);
  const BilinearPixel px = bilinear_pixel(ty, bilinear_tap(p.cols, x));
  const int64_t a = anchor_index(p, b.n, px);
  const PixelReader<T> s(p.student, p.student_strides, b.n, px, p.anchors[a]);
  const PixelReader<T> t(p.teacher, p.teacher_strides, b.n, px, p.anchors[a + 1]);
KDOPS_UNROLL
  for (int k = 0; k < K; ++k) {
    const int64_t c = b.c0 + k;
    float gs = 0.f, gt = 0.f;
    if (c < p.c) {
      const float xs_c = s.at(c), xt_c = t.at(c);
      if (want_s && want_t) {
        kl_grad_both(xs_c, xt_c, stats, p.inv_tau, scale, gs, gt);
      } else if (want_s) {
        gs = kl_grad_student(xs_c, xt_c, stats, p.inv_tau, scale);
      } else {
        gt = kl_grad_teacher(xs_c, xt_c, stats, p.inv_tau, scale);
      }
    }
    shared_s[span_slot(offset, k)] = gs;
    shared_t[span_slot(offset, k)] = gt;
  }
}

// Step 2 for input column j: S = Σ_x w_x(x, j)·g(y, x) over its readers x ascending, then
// acc[ρ] += w_y(y, r0 + ρ)·S for each of the block's rows that y reads.
KDOPS_HD void gather_add_row(const ResizedKLInputs& p, const GatherBlock& b, const BilinearTap& ty,
                             int64_t j, const float* shared_s, const float* shared_t,
                             float (&acc_s)[kRowsPerBlock][kChannelsPerItem],
                             float (&acc_t)[kRowsPerBlock][kChannelsPerItem]) {
  constexpr int K = kChannelsPerItem;
  float sum_s[K], sum_t[K];
KDOPS_UNROLL
  for (int k = 0; k < K; ++k) sum_s[k] = sum_t[k] = 0.f;
  const BilinearRange xs = bilinear_readers(p.cols, j);
  for (int64_t x = xs.begin; x < xs.end; ++x) {
    const float wx = bilinear_weight(bilinear_tap(p.cols, x), j);
    if (wx == 0.f) continue;
    const int64_t offset = x - b.x_begin;
KDOPS_UNROLL
    for (int k = 0; k < K; ++k) {
      sum_s[k] += wx * shared_s[span_slot(offset, k)];
      sum_t[k] += wx * shared_t[span_slot(offset, k)];
    }
  }
KDOPS_UNROLL
  for (int rho = 0; rho < kRowsPerBlock; ++rho) {
    const float wy = b.r0 + rho < b.r_end ? bilinear_weight(ty, b.r0 + rho) : 0.f;
    if (wy == 0.f) continue;
KDOPS_UNROLL
    for (int k = 0; k < K; ++k) {
      acc_s[rho][k] += wy * sum_s[k];
      acc_t[rho][k] += wy * sum_t[k];
    }
  }
}

// The gradients of input column j at the block's rows and channels, each written once.
template <typename T>
KDOPS_HD void gather_write(const ResizedPixelKLBackwardParams& p, const GatherBlock& b, int64_t j,
                           const float (&acc_s)[kRowsPerBlock][kChannelsPerItem],
                           const float (&acc_t)[kRowsPerBlock][kChannelsPerItem]) {
KDOPS_UNROLL
  for (int rho = 0; rho < kRowsPerBlock; ++rho) {
    const int64_t r = b.r0 + rho;
    if (r >= b.r_end) break;
KDOPS_UNROLL
    for (int k = 0; k < kChannelsPerItem; ++k) {
      const int64_t c = b.c0 + k;
      if (c >= p.c) break;
      if (p.grad_student != nullptr) {
        const Strides4& g = p.grad_student_strides;
        store_float(static_cast<T*>(p.grad_student) + b.n * g.n + c * g.c + r * g.h + j * g.w,
                    acc_s[rho][k]);
      }
      if (p.grad_teacher != nullptr) {
        const Strides4& g = p.grad_teacher_strides;
        store_float(static_cast<T*>(p.grad_teacher) + b.n * g.n + c * g.c + r * g.h + j * g.w,
                    acc_t[rho][k]);
      }
    }
  }
}

}  // namespace resized
}  // namespace cuda
}  // namespace kdops
