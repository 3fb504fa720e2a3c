// Index arithmetic and constants of the prototype ops shared by the CPU and CUDA kernels (no
// torch, no CUDA runtime).
//
// Labels (N, H_l, W_l) are read at the feature resolution (H, W) through the source row and
// column that F.interpolate(mode="nearest") picks for each output row and column: the resized
// label map is never materialised.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define KDOPS_PROTO_HD __host__ __device__ __forceinline__
#else
#define KDOPS_PROTO_HD inline
#endif

namespace kdops {

// F.normalize's floor on a norm: x̂ = x / max(‖x‖₂, kNormEps).
constexpr double kNormEps = 1e-12;

// The scale F.interpolate(mode="nearest") uses when resizing `in_size` to `out_size`: in/out in
// float32 (ATen computes it on the host; the CUDA launchers do too, so that a device build with
// fast-math division still reads the same source rows).
KDOPS_PROTO_HD float nearest_scale(int64_t in_size, int64_t out_size) {
  return static_cast<float>(in_size) / static_cast<float>(out_size);
}

// The source index F.interpolate(mode="nearest") reads for output index `dst` when resizing
// `in_size` to `out_size` (ATen's nearest_idx): floor(dst · scale) in float32 arithmetic with
// scale = nearest_scale(in_size, out_size), clamped to in_size − 1. Equal sizes and exact 2×
// upsampling are exact shortcuts there too.
KDOPS_PROTO_HD int64_t nearest_source_index_scaled(int64_t dst, int64_t in_size, int64_t out_size,
                                                   float scale) {
  if (in_size == out_size) return dst;
  if (out_size == 2 * in_size) return dst >> 1;
  const int64_t src = static_cast<int64_t>(floorf(static_cast<float>(dst) * scale));
  return src < in_size - 1 ? src : in_size - 1;
}

KDOPS_PROTO_HD int64_t nearest_source_index(int64_t dst, int64_t in_size, int64_t out_size) {
  return nearest_source_index_scaled(dst, in_size, out_size, nearest_scale(in_size, out_size));
}

}  // namespace kdops
