// The map-sized steps of the CPU attention losses (csrc/cpu/attention.cpp): bilinear resize of a
// map and its transpose, normalisation over the positions and its backward, the squared
// difference of a student/teacher pair. Plain loops over one map at a time (the callers give
// each thread whole images or class maps): the maps are C times smaller than the features (a
// few thousand elements each), so ATen's kernels for them — each a dispatch and a parallel
// region — would cost more than the reductions. Same math as common/attention_loss.h (which the
// CUDA registration uses).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/attention_loss.h"

namespace kdops {
namespace cpu {

// The map-sized math runs in double whatever the maps' dtype: it costs nothing at map size, and
// the only float32 rounding left is that of the maps themselves (the raw maps the kernels
// return, and the resized maps saved for backward).
using MapAcc = double;

// Σ_{i<L} term(i) in kSumLanes independent partial sums (i mod kSumLanes) added by a fixed tree:
// vectorised and not latency-bound (one serial chain of double adds is 4 cycles per term), and
// the same bits on every run.
constexpr int64_t kSumLanes = 8;

template <typename Term>
inline MapAcc lane_sum(int64_t L, const Term& term) {
  MapAcc lanes[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= L; i += kSumLanes) {
    for (int64_t j = 0; j < kSumLanes; ++j) lanes[j] += term(i + j);
  }
  for (int64_t j = 0; i + j < L; ++j) lanes[j] += term(i + j);
  for (int64_t width = kSumLanes / 2; width >= 1; width /= 2) {
    for (int64_t j = 0; j < width; ++j) lanes[j] += lanes[j + width];
  }
  return lanes[0];
}

// One axis of a bilinear resize, align_corners=False (PyTorch's convention): output index o reads
// source position max((o + 0.5)·in/out − 0.5, 0) between i0 and i1 = min(i0 + 1, in − 1).
struct ResizeAxis {
  std::vector<int64_t> i0, i1;
  std::vector<MapAcc> w0, w1;

  ResizeAxis(int64_t in, int64_t out) : i0(out), i1(out), w0(out), w1(out) {
    const MapAcc scale = static_cast<MapAcc>(in) / static_cast<MapAcc>(out);
    for (int64_t o = 0; o < out; ++o) {
      const MapAcc src = std::max(scale * (static_cast<MapAcc>(o) + 0.5) - 0.5, 0.0);
      const int64_t lo = std::min(static_cast<int64_t>(src), in - 1);
      i0[o] = lo;
      i1[o] = lo + (lo < in - 1 ? 1 : 0);
      w1[o] = src - static_cast<MapAcc>(lo);
      w0[o] = 1.0 - w1[o];
    }
  }
};

struct MapResize {
  int64_t h, w, out_h, out_w;
  ResizeAxis ys, xs;
  MapResize(int64_t h_, int64_t w_, int64_t oh, int64_t ow)
      : h(h_), w(w_), out_h(oh), out_w(ow), ys(h_, oh), xs(w_, ow) {}

  template <typename T>
  void forward(const T* in, MapAcc* out) const {
    for (int64_t oy = 0; oy < out_h; ++oy) {
      const T* r0 = in + ys.i0[oy] * w;
      const T* r1 = in + ys.i1[oy] * w;
      for (int64_t ox = 0; ox < out_w; ++ox) {
        const int64_t x0 = xs.i0[ox], x1 = xs.i1[ox];
        out[oy * out_w + ox] =
            ys.w0[oy] * (xs.w0[ox] * static_cast<MapAcc>(r0[x0]) + xs.w1[ox] * static_cast<MapAcc>(r0[x1])) +
            ys.w1[oy] * (xs.w0[ox] * static_cast<MapAcc>(r1[x0]) + xs.w1[ox] * static_cast<MapAcc>(r1[x1]));
      }
    }
  }
  // grad_in = resizeᵀ·grad_out, accumulated in a fixed order.
  template <typename T>
  void backward(const MapAcc* grad_out, MapAcc* scratch, T* grad_in) const {
    std::fill(scratch, scratch + h * w, 0.0);
    for (int64_t oy = 0; oy < out_h; ++oy) {
      MapAcc* r0 = scratch + ys.i0[oy] * w;
      MapAcc* r1 = scratch + ys.i1[oy] * w;
      for (int64_t ox = 0; ox < out_w; ++ox) {
        const MapAcc g = grad_out[oy * out_w + ox];
        const int64_t x0 = xs.i0[ox], x1 = xs.i1[ox];
        r0[x0] += ys.w0[oy] * xs.w0[ox] * g;
        r0[x1] += ys.w0[oy] * xs.w1[ox] * g;
        r1[x0] += ys.w1[oy] * xs.w0[ox] * g;
        r1[x1] += ys.w1[oy] * xs.w1[ox] * g;
      }
    }
    for (int64_t i = 0; i < h * w; ++i) grad_in[i] = static_cast<T>(scratch[i]);
  }
};

// A = norm(S) over one map of L positions.
inline void normalize_positions(const MapAcc* s, MapAcc* a, int64_t L, MapNorm norm) {
  if (norm == MapNorm::kNone) {
    std::copy(s, s + L, a);
  } else if (norm == MapNorm::kSoftmax) {
    const MapAcc m = *std::max_element(s, s + L);
    for (int64_t i = 0; i < L; ++i) a[i] = std::exp(s[i] - m);
    const MapAcc inv = 1.0 / lane_sum(L, [a](int64_t i) { return a[i]; });
    for (int64_t i = 0; i < L; ++i) a[i] *= inv;
  } else {
    const MapAcc sq = lane_sum(L, [s](int64_t i) { return s[i] * s[i]; });
    // A division, not a product with 1/‖S‖: one rounding, and a map with one non-zero position
    // normalises to exactly ±1 (two such maps then give exactly 0, as the exact loss does).
    const MapAcc length = std::max(std::sqrt(sq), kMapNormEps);
    for (int64_t i = 0; i < L; ++i) a[i] = s[i] / length;
  }
}

// ∂/∂S from d = ∂/∂A (in place: d becomes the result).
inline void normalize_positions_backward(const MapAcc* s, const MapAcc* a, MapAcc* d, int64_t L,
                                  MapNorm norm) {
  if (norm == MapNorm::kNone) return;
  const MapAcc dot = lane_sum(L, [a, d](int64_t i) { return a[i] * d[i]; });
  if (norm == MapNorm::kSoftmax) {
    for (int64_t i = 0; i < L; ++i) d[i] = a[i] * (d[i] - dot);
    return;
  }
  const MapAcc length = std::sqrt(lane_sum(L, [s](int64_t i) { return s[i] * s[i]; }));
  const MapAcc inv = 1.0 / std::max(length, kMapNormEps);
  // Where the clamp holds (‖S‖ ≤ eps), A = S/eps is linear in S: ∂ = d/eps.
  const MapAcc along = length > kMapNormEps ? dot : 0.0;
  for (int64_t i = 0; i < L; ++i) d[i] = (d[i] - a[i] * along) * inv;
}

// One pair of raw maps of L positions (student s, teacher t) and the steps both map losses
// (attention_loss, class_attention_loss) take on it: normalise over the positions, Σ (a_s − a_t)²,
// and back through the normalisation. Callers fill s and t (resized or read as they need).
struct MapPair {
  std::vector<MapAcc> s, t, a_s, a_t, d_s, d_t;

  explicit MapPair(int64_t length)
      : s(length), t(length), a_s(length), a_t(length), d_s(length), d_t(length) {}
  int64_t length() const { return static_cast<int64_t>(s.size()); }

  template <typename T>
  void load(const T* s_in, const T* t_in) {
    for (int64_t i = 0; i < length(); ++i) {
      s[i] = static_cast<MapAcc>(s_in[i]);
      t[i] = static_cast<MapAcc>(t_in[i]);
    }
  }
  // Normalises both maps; returns Σ (a_s − a_t)².
  MapAcc squared_distance(MapNorm norm) {
    normalize_positions(s.data(), a_s.data(), length(), norm);
    normalize_positions(t.data(), a_t.data(), length(), norm);
    const MapAcc* as = a_s.data();
    const MapAcc* at = a_t.data();
    return lane_sum(length(), [as, at](int64_t i) { return (as[i] - at[i]) * (as[i] - at[i]); });
  }
  // After squared_distance: d_s, d_t = the gradients of coef·Σ (a_s − a_t)²/2 with respect to
  // the raw maps s, t (the sides asked for).
  void backward(MapNorm norm, MapAcc coef, bool want_s, bool want_t) {
    for (int64_t i = 0; i < length(); ++i) {
      d_s[i] = coef * (a_s[i] - a_t[i]);
      d_t[i] = -d_s[i];
    }
    if (want_s) normalize_positions_backward(s.data(), a_s.data(), d_s.data(), length(), norm);
    if (want_t) normalize_positions_backward(t.data(), a_t.data(), d_t.data(), length(), norm);
  }
};

// S (rounded to the maps' dtype T, as saved for backward) read back in MapAcc.
template <typename T>
void round_trip(MapAcc* values, T* stored, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    stored[i] = static_cast<T>(values[i]);
    values[i] = static_cast<MapAcc>(stored[i]);
  }
}

}  // namespace cpu
}  // namespace kdops
