// Bilinear resizing as F.interpolate(mode="bilinear") reads its source, and the transpose of that
// read, per axis (no torch, no CUDA runtime: the CUDA kernels of resized_pixel_kl and a host
// build of their per-thread code use it; kdops/reference/softmax_kl.py, bilinear_source, is the
// specification).
//
// Along one axis of `in` positions resized to `out`, output i reads the source position
//   src = i·(in − 1)/(out − 1)                 (align_corners; 0 when out = 1)
//   src = max((i + ½)·(in/out) − ½, 0)         (otherwise)
// taken as an exact fraction a/b of integers: a = i·(in − 1), b = max(out − 1, 1), or
// a = max((2i + 1)·in − out, 0), b = 2·out. Then i0 = a div b, λ = (a mod b)/b (one rounding,
// float32), i1 = min(i0 + 1, in − 1), and value = (1 − λ)·x[i0] + λ·x[i1], the λ term left out
// (x[i1] not read) when λ = 0, so that a −inf there stays out of the sum. Integer arithmetic
// makes λ exactly 0 wherever the position hits an input sample, on every backend alike.
// i0 ≤ in − 1 without a clamp (src < in − ½ or ≤ in − 1 exactly), and 1 − λ > 0 (a mod b < b,
// rounded to float32 below 1 for b < 2^24).
//
// The transpose. a, hence i0, is non-decreasing in i, so the outputs that read input r — those
// with i0 ∈ {r − 1, r} — form the contiguous range [first(r − 1), first(r + 1)), first(v) = the
// first output with i0 ≥ v (found by bisection on the same i0 the forward computes: exact, no
// inverse formula to round differently). Output i weighs input r by
// [i0 = r]·(1 − λ) + [i1 = r, λ > 0]·λ (both terms when i0 = i1 = r at the last input); a
// candidate of weight 0 (i1 = r with λ = 0) reads nothing from r.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define KDOPS_BILINEAR_HD __host__ __device__ __forceinline__
#else
#define KDOPS_BILINEAR_HD inline
#endif

namespace kdops {

// One axis of the resize: sizes and the fraction's denominator.
struct BilinearAxis {
  int64_t in, out;
  int64_t denominator;  // b: max(out − 1, 1) (align_corners) or 2·out
  bool align_corners;
  bool narrow;  // every numerator and b fit in 31 bits: 32-bit division (the fast one on a GPU)
};

// Where output i reads: x[i0] with weight 1 − lambda, x[i1] with weight lambda (when > 0).
struct BilinearTap {
  int64_t i0, i1;
  float lambda;
};

inline BilinearAxis bilinear_axis(int64_t in, int64_t out, bool align_corners) {
  const int64_t denominator = align_corners ? (out > 1 ? out - 1 : 1) : 2 * out;
  const int64_t largest_numerator = align_corners ? (out - 1) * (in - 1) : (2 * out - 1) * in;
  const int64_t limit = int64_t(1) << 31;
  return BilinearAxis{in, out, denominator, align_corners,
                      largest_numerator < limit && denominator < limit};
}

KDOPS_BILINEAR_HD float bilinear_ratio(int64_t remainder, int64_t denominator) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(static_cast<float>(remainder), static_cast<float>(denominator));
#else
  return static_cast<float>(remainder) / static_cast<float>(denominator);
#endif
}

KDOPS_BILINEAR_HD BilinearTap bilinear_tap(const BilinearAxis& axis, int64_t i) {
  int64_t numerator;
  if (axis.align_corners) {
    numerator = i * (axis.in - 1);
  } else {
    numerator = (2 * i + 1) * axis.in - axis.out;
    numerator = numerator > 0 ? numerator : 0;
  }
  int64_t i0, remainder;
  if (axis.narrow) {
    const uint32_t a = static_cast<uint32_t>(numerator), b = static_cast<uint32_t>(axis.denominator);
    const uint32_t quotient = a / b;
    i0 = quotient;
    remainder = a - quotient * b;
  } else {
    i0 = numerator / axis.denominator;
    remainder = numerator - i0 * axis.denominator;
  }
  const int64_t i1 = i0 + 1 < axis.in ? i0 + 1 : axis.in - 1;
  return BilinearTap{i0, i1, bilinear_ratio(remainder, axis.denominator)};
}

// The weight output `tap` gives input r (0 when it does not read r).
KDOPS_BILINEAR_HD float bilinear_weight(const BilinearTap& tap, int64_t r) {
  float weight = tap.i0 == r ? 1.f - tap.lambda : 0.f;
  if (tap.i1 == r && tap.lambda > 0.f) weight += tap.lambda;
  return weight;
}

// The first output i with i0(i) ≥ v (axis.out when none).
KDOPS_BILINEAR_HD int64_t bilinear_first_reading(const BilinearAxis& axis, int64_t v) {
  int64_t lo = 0, hi = axis.out;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (bilinear_tap(axis, mid).i0 >= v) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// The outputs [begin, end) that may read input r: every output of nonzero weight on r is in it
// (those of weight 0 in it are skipped by the caller).
struct BilinearRange {
  int64_t begin, end;
};

KDOPS_BILINEAR_HD BilinearRange bilinear_readers(const BilinearAxis& axis, int64_t r) {
  return BilinearRange{bilinear_first_reading(axis, r - 1), bilinear_first_reading(axis, r + 1)};
}

// One output pixel's four corners: rows y0, y1 with weights 1 − ly, ly; columns x0, x1 likewise.
struct BilinearPixel {
  int64_t y0, y1, x0, x1;
  float ly, lx;
};

KDOPS_BILINEAR_HD BilinearPixel bilinear_pixel(const BilinearTap& row, const BilinearTap& col) {
  return BilinearPixel{row.i0, row.i1, col.i0, col.i1, row.lambda, col.lambda};
}

// Corner k of a pixel (the argument of bilinear_value's reader): 2·[row y1] + [column x1].
enum BilinearCorner : int { kCorner00 = 0, kCorner01 = 1, kCorner10 = 2, kCorner11 = 3 };

// The resized value at a pixel of weights (ly, lx), read(k) giving corner k's input value: along x
// within rows y0 and y1, then along y (the reference goes along y first: the roundings differ,
// the corners read do not); corners of weight 0 are not read.
template <typename Read>
KDOPS_BILINEAR_HD float bilinear_value(float ly, float lx, const Read& read) {
  float row0 = (1.f - lx) * read(kCorner00);
  if (lx > 0.f) row0 += lx * read(kCorner01);
  float value = (1.f - ly) * row0;
  if (ly > 0.f) {
    float row1 = (1.f - lx) * read(kCorner10);
    if (lx > 0.f) row1 += lx * read(kCorner11);
    value += ly * row1;
  }
  return value;
}

}  // namespace kdops
