// Shared pieces of the CPU prototype kernels (csrc/cpu/prototypes_{pool,kl,variation}.cpp): views
// of the inputs, pixel tiles, normalised prototypes, class sums and the argument checks.
//
// Features are read as (N, C, L) through int64 element strides, spatial dims merged (a view
// whenever the strides allow it, else one contiguous copy); float32/float16/bfloat16 inputs
// accumulate in float32, float64 inputs in float64 (for gradcheck). Labels (N, H_l, W_l) are
// read at the feature resolution through the nearest-neighbour source row and column of each
// output row and column (csrc/common/prototypes.h): no resized label map exists.
//
// Work units:
//   channel blocks  (image, kChannelBlock channels): prototype_pool's class sums. A unit owns its
//                   slice of the sums, which it accumulates in float64 over the image's pixels
//                   in pixel order.
//   pixel tiles     (image, kTile pixels): everything else. A tile is read as [C][stride]
//                   values of the accumulation type: straight from the input when it already is
//                   that (NCHW rows of float32/float64 pixels, a full tile), else gathered into a
//                   [C][kTile] buffer (any layout, any dtype); the math runs with the pixels along
//                   the vectorised inner loops, and gradients are scattered back. Sums over
//                   pixels are per-tile or per-chunk (a fixed run of tiles) partial results,
//                   combined afterwards in a fixed order.
// The pieces depend on the shapes only, never on the thread count: results are bitwise
// reproducible.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/prototypes.h"
#include "common/tensor_layout.h"
#include "cpu/vec_io.h"

namespace kdops {
namespace cpu {
namespace proto {

using at::Tensor;

constexpr int64_t kTile = 32;          // pixels per tile
constexpr int64_t kChannelBlock = 16;  // channels per prototype_pool work unit
constexpr int64_t kMaxChunksPerImage = 16;

// ---------------------------------------------------------------------------------------------
// Views of the inputs

// A feature tensor read as (N, C, L).
struct Features {
  Tensor tensor;  // the input, or its contiguous copy when the spatial dims do not merge
  Strides3 strides;
  int64_t n, c, l;
};

inline Features features_view(const Tensor& x) {
  Features f;
  f.tensor = row_strides(x) ? x : x.contiguous();
  f.strides = *row_strides(f.tensor);
  f.n = x.size(0);
  f.c = x.size(1);
  f.l = x.size(2) * x.size(3);
  return f;
}

// The label map, read at the feature resolution (height × width) through nearest-neighbour
// source offsets.
struct LabelMap {
  Tensor owned;  // int64 copy of the labels (O(pixels), C times smaller than the features)
  const int64_t* data = nullptr;
  int64_t stride_n = 0, width = 1;
  std::vector<int64_t> row_offset, col_offset;  // element offsets of each output row / column
  int64_t ignore_index = 0;

  // The class of pixel l of image n, or -1 when it is ignored.
  int64_t class_at(int64_t n, int64_t l) const {
    const int64_t h = l / width, w = l - h * width;
    const int64_t value = data[n * stride_n + row_offset[h] + col_offset[w]];
    return value == ignore_index ? -1 : value;
  }
  // The classes of pixels l0 .. l0 + count of image n; -1 for ignored pixels and past `count`.
  void tile_classes(int64_t n, int64_t l0, int64_t count, int64_t* out) const {
    for (int64_t t = 0; t < kTile; ++t) out[t] = t < count ? class_at(n, l0 + t) : -1;
  }
};

// Validates labels (N, H_l, W_l): integer, on the CPU, every value in [0, num_classes) or
// ignore_index (an error naming the first bad value at once).
inline LabelMap label_map(const Tensor& labels, int64_t batch, int64_t height, int64_t width,
                   int64_t num_classes, int64_t ignore_index) {
  TORCH_CHECK_TYPE(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
                   "labels must be an integer tensor, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 3 && labels.size(0) == batch && labels.numel() > 0,
                    "labels must have shape (N, H, W) with N=", batch, " and H, W >= 1, got ",
                    labels.sizes());
  TORCH_CHECK_VALUE(labels.device().is_cpu(), "labels must be a CPU tensor, got ",
                    labels.device());
  TORCH_CHECK_VALUE(num_classes >= 1, "num_classes must be >= 1, got ", num_classes);
  LabelMap m;
  m.owned = labels.to(at::kLong).contiguous();
  m.data = m.owned.const_data_ptr<int64_t>();
  const int64_t count = m.owned.numel();
  // A branch-free (vectorised) pass; the first bad value is looked up only for the message.
  // (A label map may be the image's size: 64× the feature map's pixels.)
  const auto bad = [&](int64_t value) {
    return value != ignore_index && static_cast<uint64_t>(value) >= static_cast<uint64_t>(num_classes);
  };
  int64_t any_bad = 0;
  for (int64_t i = 0; i < count; ++i) any_bad |= static_cast<int64_t>(bad(m.data[i]));
  if (any_bad != 0) {
    const int64_t value = *std::find_if(m.data, m.data + count, bad);
    TORCH_CHECK_VALUE(false, "labels hold ", value, ", outside [0, num_classes=", num_classes,
                      ") and not ignore_index=", ignore_index);
  }
  const int64_t in_h = m.owned.size(1), in_w = m.owned.size(2);
  m.stride_n = in_h * in_w;
  m.width = width;
  m.ignore_index = ignore_index;
  m.row_offset.resize(height);
  m.col_offset.resize(width);
  for (int64_t h = 0; h < height; ++h) m.row_offset[h] = nearest_source_index(h, in_h, height) * in_w;
  for (int64_t w = 0; w < width; ++w) m.col_offset[w] = nearest_source_index(w, in_w, width);
  return m;
}

// ---------------------------------------------------------------------------------------------
// Tiles

// Pixels l0 .. l0 + count (≤ kTile) of image n of x, as [channels][kTile] in acc; zero past count.
template <typename scalar_t, typename acc>
void gather_tile(const scalar_t* x, const Strides3& st, int64_t n, int64_t l0, int64_t channels,
                 int64_t count, acc* out) {
  const scalar_t* base = x + n * st.n + l0 * st.l;
  if (st.l == 1) {
    for (int64_t c = 0; c < channels; ++c) {
      const scalar_t* row = base + c * st.c;
      acc* o = out + c * kTile;
      for (int64_t t = 0; t < count; ++t) o[t] = static_cast<acc>(row[t]);
      for (int64_t t = count; t < kTile; ++t) o[t] = acc(0);
    }
    return;
  }
  if (count < kTile) {
    for (int64_t c = 0; c < channels; ++c) {
      for (int64_t t = count; t < kTile; ++t) out[c * kTile + t] = acc(0);
    }
  }
  for (int64_t t = 0; t < count; ++t) {
    const scalar_t* pixel = base + t * st.l;
    for (int64_t c = 0; c < channels; ++c) out[c * kTile + t] = static_cast<acc>(pixel[c * st.c]);
  }
}

// Whether a tile is used where it lies: rows of contiguous pixels, a full tile, and rows at most
// kInPlaceRowBytes apart. Rows further apart are gathered first: at a power-of-two distance of
// 8 KiB or more every row of a tile falls in the same few L1 sets, and the several passes over
// a tile then miss L1 each time (measured: class_variation_loss at L = 2048 took 6.7 ms in
// place, 5.3 ms gathered; at L = 512, 2.5 ms in place, 3.6 ms gathered).
constexpr int64_t kInPlaceRowBytes = 4096;

inline bool in_place_tile(const Strides3& st, int64_t count, size_t element_bytes) {
  return st.l == 1 && count == kTile && st.c * static_cast<int64_t>(element_bytes) <= kInPlaceRowBytes;
}

// Pixels l0 .. l0 + count of image n of x as a [channels][*stride] tile in acc: x itself when it
// already is one (rows of contiguous acc-typed pixels and a full tile, the common NCHW float32
// case: no copy), else gathered into `buffer` (*stride = kTile, zero past count).
template <typename scalar_t, typename acc>
const acc* load_tile(const scalar_t* x, const Strides3& st, int64_t n, int64_t l0, int64_t channels,
                     int64_t count, acc* buffer, int64_t* stride) {
  if constexpr (std::is_same_v<scalar_t, acc>) {
    if (in_place_tile(st, count, sizeof(acc))) {
      *stride = st.c;
      return x + n * st.n + l0;
    }
  }
  gather_tile(x, st, n, l0, channels, count, buffer);
  *stride = kTile;
  return buffer;
}

// Writes the first `count` pixels of a [channels][kTile] buffer to pixels l0 .. of image n of y.
template <typename scalar_t, typename acc>
void scatter_tile(scalar_t* y, const Strides3& st, int64_t n, int64_t l0, int64_t channels,
                  int64_t count, const acc* in) {
  scalar_t* base = y + n * st.n + l0 * st.l;
  if (st.l == 1) {
    for (int64_t c = 0; c < channels; ++c) {
      scalar_t* row = base + c * st.c;
      const acc* i = in + c * kTile;
      for (int64_t t = 0; t < count; ++t) row[t] = static_cast<scalar_t>(i[t]);
    }
    return;
  }
  for (int64_t t = 0; t < count; ++t) {
    scalar_t* pixel = base + t * st.l;
    for (int64_t c = 0; c < channels; ++c) pixel[c * st.c] = static_cast<scalar_t>(in[c * kTile + t]);
  }
}

// Where the [channels][*stride] result for pixels l0 .. l0 + count of image n of y is written:
// y itself when load_tile would read it in place, else `buffer`, which store_tile then scatters.
template <typename scalar_t, typename acc>
acc* tile_output(scalar_t* y, const Strides3& st, int64_t n, int64_t l0, int64_t count, acc* buffer,
                 int64_t* stride) {
  if constexpr (std::is_same_v<scalar_t, acc>) {
    if (in_place_tile(st, count, sizeof(acc))) {
      *stride = st.c;
      return y + n * st.n + l0;
    }
  }
  *stride = kTile;
  return buffer;
}

// Completes a tile_output: scatters `written` to y unless it already is y.
template <typename scalar_t, typename acc>
void store_tile(scalar_t* y, const Strides3& st, int64_t n, int64_t l0, int64_t channels,
                int64_t count, const acc* written, const acc* buffer) {
  if (written == buffer) scatter_tile(y, st, n, l0, channels, count, buffer);
}

// Per-pixel norms of a [channels][stride] tile: norm[t] = ‖x_t‖₂, inv[t] = 1/max(norm, eps).
template <typename acc>
void tile_norms(const acc* x, int64_t stride, int64_t channels, acc* norm, acc* inv) {
  acc sq[kTile] = {};
  for (int64_t c = 0; c < channels; ++c) {
    const acc* xc = x + c * stride;
    for (int64_t t = 0; t < kTile; ++t) sq[t] += xc[t] * xc[t];
  }
  for (int64_t t = 0; t < kTile; ++t) {
    norm[t] = std::sqrt(sq[t]);
    inv[t] = acc(1) / std::max(norm[t], static_cast<acc>(kNormEps));
  }
}

// The number of tiles per work chunk: a function of L only (kTile multiples, at most
// kMaxChunksPerImage chunks per image), so per-chunk partial sums never depend on threads.
inline int64_t tiles_per_chunk(int64_t l) {
  const int64_t tiles = (l + kTile - 1) / kTile;
  return std::max<int64_t>(8, (tiles + kMaxChunksPerImage - 1) / kMaxChunksPerImage);
}

// ---------------------------------------------------------------------------------------------
// Prototypes: normalised, transposed copies

// Prototypes (groups, K, C) in acc with their norms: hat_t[g][c][k] = P[g,k,c] / max(‖P[g,k]‖, eps)
// ([C][K] per group: a pixel's cosines to all classes are a loop over c of K-wide rows).
template <typename acc>
struct NormalisedProtos {
  int64_t groups = 0, k = 0, c = 0;
  std::vector<acc> hat_t, norm, inv;  // (groups, C, K), (groups, K), (groups, K)
  const acc* hat_of(int64_t g) const { return hat_t.data() + g * c * k; }
};

template <typename acc>
NormalisedProtos<acc> normalised_protos(const Tensor& protos_acc /* (groups, K, C) contiguous */) {
  NormalisedProtos<acc> p;
  p.groups = protos_acc.size(0);
  p.k = protos_acc.size(1);
  p.c = protos_acc.size(2);
  p.hat_t.resize(p.groups * p.c * p.k);
  p.norm.resize(p.groups * p.k);
  p.inv.resize(p.groups * p.k);
  const acc* data = protos_acc.const_data_ptr<acc>();
  for (int64_t g = 0; g < p.groups; ++g) {
    for (int64_t k = 0; k < p.k; ++k) {
      const acc* row = data + (g * p.k + k) * p.c;
      acc sq = 0;
      for (int64_t c = 0; c < p.c; ++c) sq += row[c] * row[c];
      const acc norm = std::sqrt(sq);
      const acc inv = acc(1) / std::max(norm, static_cast<acc>(kNormEps));
      p.norm[g * p.k + k] = norm;
      p.inv[g * p.k + k] = inv;
      for (int64_t c = 0; c < p.c; ++c) p.hat_t[(g * p.c + c) * p.k + k] = row[c] * inv;
    }
  }
  return p;
}

// The gradient of P from the gradient of P̂ = P / max(‖P‖, eps):
// (dP̂ − P̂ (P̂·dP̂)) / ‖P‖ when ‖P‖ > eps, else dP̂ / eps.
template <typename acc>
void protos_grad_from_hat(const NormalisedProtos<acc>& p, int64_t g, int64_t k, const acc* grad_hat,
                          acc* grad) {
  const acc inv = p.inv[g * p.k + k];
  const bool projects = p.norm[g * p.k + k] > static_cast<acc>(kNormEps);
  acc dot = 0;
  for (int64_t c = 0; c < p.c; ++c) dot += p.hat_t[(g * p.c + c) * p.k + k] * grad_hat[c];
  for (int64_t c = 0; c < p.c; ++c) {
    const acc hat = p.hat_t[(g * p.c + c) * p.k + k];
    grad[c] = (projects ? grad_hat[c] - hat * dot : grad_hat[c]) * inv;
  }
}

// ---------------------------------------------------------------------------------------------
// Class sums and counts (prototype_pool, class_variation_loss)

// sums[n][k][c] = Σ_{i: y_i = k} w_i x[n, c, i] in float64, pixel order (w = 1, or the given
// (N, L) per-pixel weights); counts[n][k] pixel counts.
template <typename scalar_t>
void class_sums(const Features& f, const LabelMap& labels, int64_t num_classes,
                std::vector<double>& sums, std::vector<int64_t>& counts,
                const std::vector<double>* weights = nullptr) {
  const scalar_t* x = f.tensor.const_data_ptr<scalar_t>();
  const Strides3 st = f.strides;
  const int64_t blocks = (f.c + kChannelBlock - 1) / kChannelBlock;
  sums.assign(f.n * num_classes * f.c, 0.0);
  counts.assign(f.n * num_classes, 0);
  at::parallel_for(0, f.n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t l = 0; l < f.l; ++l) {
        const int64_t k = labels.class_at(n, l);
        if (k >= 0) ++counts[n * num_classes + k];
      }
    }
  });
  at::parallel_for(0, f.n * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> classes(f.l);
    std::vector<double> block(num_classes * kChannelBlock);
    int64_t classes_of = -1;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t n = unit / blocks, c0 = (unit % blocks) * kChannelBlock;
      const int64_t width = std::min(kChannelBlock, f.c - c0);
      if (classes_of != n) {
        for (int64_t l = 0; l < f.l; ++l) classes[l] = labels.class_at(n, l);
        classes_of = n;
      }
      std::fill(block.begin(), block.end(), 0.0);
      const scalar_t* base = x + n * st.n + c0 * st.c;
      for (int64_t l = 0; l < f.l; ++l) {
        const int64_t k = classes[l];
        if (k < 0) continue;
        const scalar_t* pixel = base + l * st.l;
        double* row = block.data() + k * kChannelBlock;
        if (weights == nullptr) {
          for (int64_t c = 0; c < width; ++c) row[c] += static_cast<double>(pixel[c * st.c]);
        } else {
          const double w = (*weights)[n * f.l + l];
          for (int64_t c = 0; c < width; ++c) row[c] += static_cast<double>(pixel[c * st.c]) * w;
        }
      }
      double* out = sums.data() + n * num_classes * f.c + c0;
      for (int64_t k = 0; k < num_classes; ++k) {
        for (int64_t c = 0; c < width; ++c) out[k * f.c + c] = block[k * kChannelBlock + c];
      }
    }
  });
}

// protos = sums / max(counts, 1) as a (groups, K, C) tensor of dtype `out_dtype`.
inline Tensor protos_from_sums(const std::vector<double>& sums, const std::vector<int64_t>& counts,
                        int64_t groups, int64_t num_classes, int64_t channels,
                        const at::TensorOptions& options) {
  Tensor protos = at::empty({groups, num_classes, channels}, options.dtype(at::kDouble));
  double* out = protos.data_ptr<double>();
  for (int64_t gk = 0; gk < groups * num_classes; ++gk) {
    const double scale = 1.0 / static_cast<double>(std::max<int64_t>(counts[gk], 1));
    for (int64_t c = 0; c < channels; ++c) out[gk * channels + c] = sums[gk * channels + c] * scale;
  }
  return protos.to(options.dtype());
}

// ---------------------------------------------------------------------------------------------
// Argument checks of the ops (the public API checks first; these guard direct torch.ops calls)

inline void check_features(const char* name, const Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4, name, " must have shape (N, C, H, W), got ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                       dtype == at::kDouble,
                   name, " must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK_VALUE(x.device().is_cpu(), name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.numel() > 0, name, " must not be empty, got shape ", x.sizes());
}

inline void check_pair(const Tensor& student, const Tensor& teacher) {
  check_features("student", student);
  check_features("teacher", teacher);
  TORCH_CHECK_TYPE(teacher.scalar_type() == student.scalar_type(),
                   "teacher must have the dtype of student (", student.scalar_type(), "), got ",
                   teacher.scalar_type());
  TORCH_CHECK_VALUE(teacher.size(0) == student.size(0) && teacher.size(2) == student.size(2) &&
                        teacher.size(3) == student.size(3),
                    "teacher must have the N, H, W of student (", student.sizes(), "), got ",
                    teacher.sizes());
}

inline at::ScalarType acc_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline double scalar_of(const char* name, const Tensor& x) {
  TORCH_CHECK_VALUE(x.numel() == 1, name, " must hold one element, got shape ", x.sizes());
  return x.item<double>();
}

// (groups, K, C) view of (N, K, C) or (K, C) prototypes of features with `channels` channels.
inline void check_protos(const char* name, const Tensor& protos, int64_t batch, int64_t channels) {
  TORCH_CHECK_VALUE(protos.dim() == 2 || protos.dim() == 3, name,
                    " must have shape (N, K, C) or (K, C), got ", protos.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(protos.scalar_type()), name,
                   " must be a floating tensor, got ", protos.scalar_type());
  TORCH_CHECK_VALUE(protos.dim() == 2 || protos.size(0) == batch, name, " must have N=", batch,
                    " images, got ", protos.sizes());
  TORCH_CHECK_VALUE(protos.size(-1) == channels, name, " must have C=", channels,
                    " channels, got ", protos.sizes());
  TORCH_CHECK_VALUE(protos.size(-2) >= 1, name, " must have K >= 1 classes, got ", protos.sizes());
  TORCH_CHECK_VALUE(protos.device().is_cpu(), name, " must be a CPU tensor, got ", protos.device());
}

inline Tensor as_groups(const Tensor& protos, at::ScalarType dtype) {
  const Tensor p = protos.dim() == 2 ? protos.unsqueeze(0) : protos;
  return p.to(dtype).contiguous();
}

// 1/max(‖x_i‖, eps) of every pixel (N·L), in float64 (the weights of a normalised pooling).
template <typename scalar_t>
std::vector<double> pixel_inverse_norms(const Features& f) {
  using acc = acc_t<scalar_t>;
  const scalar_t* x = f.tensor.const_data_ptr<scalar_t>();
  const int64_t tiles = (f.l + kTile - 1) / kTile;
  std::vector<double> out(f.n * f.l);
  at::parallel_for(0, f.n * tiles, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc> tile(f.c * kTile);
    acc norm[kTile], inv[kTile];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / tiles, l0 = (item % tiles) * kTile, count = std::min(kTile, f.l - l0);
      int64_t stride;
      const acc* src = load_tile(x, f.strides, n, l0, f.c, count, tile.data(), &stride);
      tile_norms(src, stride, f.c, norm, inv);
      for (int64_t t = 0; t < count; ++t) out[n * f.l + l0 + t] = static_cast<double>(inv[t]);
    }
  });
  return out;
}

}  // namespace proto
}  // namespace cpu
}  // namespace kdops
