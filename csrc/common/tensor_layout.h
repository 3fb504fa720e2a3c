// Torch-side helpers that read an (N, C, *spatial) tensor as (N, C, L) without a copy, for the
// CPU kernels and the CUDA _api files alike.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "common/strides.h"

namespace kdops {

// The stride of dims [first, dim) of x merged into one, when that is a view.
inline std::optional<int64_t> merged_stride(const at::Tensor& x, int64_t first) {
  int64_t stride = 1;   // a run of one element is contiguous
  int64_t merged = -1;  // the stride the next outer dim needs to merge
  for (int64_t d = x.dim() - 1; d >= first; --d) {
    const int64_t size = x.size(d);
    if (size == 1) continue;
    if (merged < 0) {
      stride = x.stride(d);
    } else if (x.stride(d) != merged) {
      return std::nullopt;
    }
    merged = x.stride(d) * size;
  }
  return stride;
}

// The (N, C, L) element strides of x with its spatial dims merged into L, when that is a view.
inline std::optional<Strides3> row_strides(const at::Tensor& x) {
  const auto stride_l = merged_stride(x, 2);
  if (!stride_l) return std::nullopt;
  return Strides3{x.stride(0), x.stride(1), *stride_l};
}

// x itself when its spatial dims merge into L (a view), else a contiguous copy.
inline at::Tensor readable(const at::Tensor& x) { return row_strides(x) ? x : x.contiguous(); }

// The gradient of x: the tensor empty_like(x) gives (what the fake kernels promise), written
// directly when its spatial dims merge, else through a contiguous buffer copied in by finish().
struct GradOut {
  at::Tensor result, written;
  Strides3 strides{0, 0, 0};  // (N, C, L) element strides of `written`

  explicit GradOut(const at::Tensor& x) : result(at::empty_like(x)) {
    written = row_strides(result) ? result : at::empty(x.sizes(), x.options());
    strides = *row_strides(written);
  }
  void finish() {
    if (!written.is_same(result)) result.copy_(written);
  }
};

}  // namespace kdops
