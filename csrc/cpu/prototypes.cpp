// CPU kernels of kdops::prototype_pool, kdops::prototype_kl and kdops::class_variation_loss
// (forward and backward ops) and their registration for the CPU dispatch key. Specification:
// kdops/reference/prototypes.py (DESIGN.md "Prototypes").
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
//                   the vectorised inner loops, and gradients are scattered back. Sums over pixels are per-tile or per-chunk
//                   (a fixed run of tiles) partial results, combined afterwards in a fixed order.
// The pieces depend on the shapes only, never on the thread count: results are bitwise
// reproducible.
//
// prototype_kl never stores the (K × L) observations: a tile's cosines to the present classes,
// (P × kTile), live in the thread's buffer; its backward recomputes them.
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
namespace {

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

Features features_view(const Tensor& x) {
  Features f;
  f.tensor = row_strides(x) ? x : x.contiguous();
  f.strides = *row_strides(f.tensor);
  f.n = x.size(0);
  f.c = x.size(1);
  f.l = x.size(2) * x.size(3);
  return f;
}

// The gradient of x: empty_like(x) (what the fake kernels promise), written directly when its
// spatial dims merge, else through a contiguous buffer copied in by finish().
struct GradOut {
  Tensor result, written;
  Strides3 strides{0, 0, 0};

  explicit GradOut(const Tensor& x) : result(at::empty_like(x)) {
    written = row_strides(result) ? result : at::empty(x.sizes(), x.options());
    strides = *row_strides(written);
  }
  void finish() {
    if (!written.is_same(result)) result.copy_(written);
  }
};

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
LabelMap label_map(const Tensor& labels, int64_t batch, int64_t height, int64_t width,
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
  for (int64_t i = 0; i < count; ++i) {
    const int64_t value = m.data[i];
    TORCH_CHECK_VALUE(value == ignore_index || (value >= 0 && value < num_classes), "labels hold ",
                      value, ", outside [0, num_classes=", num_classes, ") and not ignore_index=",
                      ignore_index);
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

// Pixels l0 .. l0 + count of image n of x as a [channels][*stride] tile in acc: x itself when it
// already is one (rows of contiguous acc-typed pixels and a full tile, the common NCHW float32
// case: no copy), else gathered into `buffer` (*stride = kTile, zero past count).
template <typename scalar_t, typename acc>
const acc* load_tile(const scalar_t* x, const Strides3& st, int64_t n, int64_t l0, int64_t channels,
                     int64_t count, acc* buffer, int64_t* stride) {
  if constexpr (std::is_same_v<scalar_t, acc>) {
    if (st.l == 1 && count == kTile) {
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
    if (st.l == 1 && count == kTile) {
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
int64_t tiles_per_chunk(int64_t l) {
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
Tensor protos_from_sums(const std::vector<double>& sums, const std::vector<int64_t>& counts,
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

void check_features(const char* name, const Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4, name, " must have shape (N, C, H, W), got ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                       dtype == at::kDouble,
                   name, " must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK_VALUE(x.device().is_cpu(), name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.numel() > 0, name, " must not be empty, got shape ", x.sizes());
}

void check_pair(const Tensor& student, const Tensor& teacher) {
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

at::ScalarType acc_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

double scalar_of(const char* name, const Tensor& x) {
  TORCH_CHECK_VALUE(x.numel() == 1, name, " must hold one element, got shape ", x.sizes());
  return x.item<double>();
}

// (groups, K, C) view of (N, K, C) or (K, C) prototypes of features with `channels` channels.
void check_protos(const char* name, const Tensor& protos, int64_t batch, int64_t channels) {
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

Tensor as_groups(const Tensor& protos, at::ScalarType dtype) {
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

// ---------------------------------------------------------------------------------------------
// prototype_pool

template <typename scalar_t>
std::tuple<Tensor, Tensor> pool_forward(const Tensor& x, const LabelMap& labels,
                                        int64_t num_classes, bool per_image, bool normalize) {
  const Features f = features_view(x);
  std::vector<double> sums;
  std::vector<int64_t> counts;
  std::vector<double> inv_norms;
  if (normalize) inv_norms = pixel_inverse_norms<scalar_t>(f);
  class_sums<scalar_t>(f, labels, num_classes, sums, counts, normalize ? &inv_norms : nullptr);
  int64_t groups = f.n;
  if (!per_image) {
    // The batch's sums: images added in order.
    for (int64_t n = 1; n < f.n; ++n) {
      for (int64_t i = 0; i < num_classes * f.c; ++i) sums[i] += sums[n * num_classes * f.c + i];
      for (int64_t k = 0; k < num_classes; ++k) counts[k] += counts[n * num_classes + k];
    }
    groups = 1;
  }
  const auto options = x.options().dtype(acc_dtype(x));
  Tensor protos = protos_from_sums(sums, counts, groups, num_classes, f.c, options);
  Tensor count_tensor = at::empty({groups, num_classes}, x.options().dtype(at::kLong));
  std::copy(counts.begin(), counts.begin() + groups * num_classes, count_tensor.data_ptr<int64_t>());
  if (!per_image) return {protos.squeeze(0), count_tensor.squeeze(0)};
  return {protos, count_tensor};
}

// grad_x[n, c, i] = r[c] = grad_protos[g, y_i, c] / counts[g, y_i] (g = n per image, 0 per batch);
// with normalised features, through x̂ = x / max(‖x‖, eps): (r − x̂ (x̂·r)) / ‖x‖ (r / eps when
// ‖x‖ ≤ eps). 0 at ignored pixels.
template <typename scalar_t>
void pool_backward(const Tensor& grad_groups /* (groups, K, C) acc */, const Tensor& counts,
                   const LabelMap& labels, const Features& f, bool normalize, GradOut& grad) {
  using acc = acc_t<scalar_t>;
  const int64_t groups = grad_groups.size(0), num_classes = grad_groups.size(1);
  const int64_t channels = grad_groups.size(2);
  const int64_t n_images = f.n, l = f.l;
  // scaled[g][k][c] = grad_protos[g][k][c] / max(count, 1)
  std::vector<acc> scaled(groups * num_classes * channels);
  const acc* g = grad_groups.const_data_ptr<acc>();
  const Tensor counts64 = counts.to(at::kLong).contiguous();
  const int64_t* count = counts64.const_data_ptr<int64_t>();
  for (int64_t gk = 0; gk < groups * num_classes; ++gk) {
    const acc inv = acc(1) / static_cast<acc>(std::max<int64_t>(count[gk], 1));
    for (int64_t c = 0; c < channels; ++c) scaled[gk * channels + c] = g[gk * channels + c] * inv;
  }
  const scalar_t* x = f.tensor.const_data_ptr<scalar_t>();
  scalar_t* out = grad.written.data_ptr<scalar_t>();
  const Strides3 st = grad.strides;
  const int64_t tiles = (l + kTile - 1) / kTile;
  at::parallel_for(0, n_images * tiles, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc> tile(channels * kTile), xs(normalize ? channels * kTile : 0);
    int64_t classes[kTile], cls[kTile];
    acc norm[kTile], inv[kTile], dot[kTile];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / tiles, l0 = (item % tiles) * kTile, count_l = std::min(kTile, l - l0);
      labels.tile_classes(n, l0, count_l, classes);
      for (int64_t t = 0; t < kTile; ++t) cls[t] = std::max<int64_t>(classes[t], 0);
      const acc* rows = scaled.data() + (groups == 1 ? 0 : n) * num_classes * channels;
      const acc* src = nullptr;
      int64_t stride = kTile;
      if (normalize) {
        src = load_tile(x, f.strides, n, l0, channels, count_l, xs.data(), &stride);
        tile_norms(src, stride, channels, norm, inv);
        std::fill(dot, dot + kTile, acc(0));
        for (int64_t c = 0; c < channels; ++c) {
          const acc* xc = src + c * stride;
          for (int64_t t = 0; t < kTile; ++t) dot[t] += xc[t] * rows[cls[t] * channels + c];
        }
        for (int64_t t = 0; t < kTile; ++t) {
          // x̂·r = (x·r)/‖x‖; the projection term is then x · (x̂·r)/‖x‖.
          dot[t] = norm[t] > static_cast<acc>(kNormEps) ? dot[t] * inv[t] * inv[t] : acc(0);
        }
      }
      int64_t out_stride;
      acc* written = tile_output(out, st, n, l0, count_l, tile.data(), &out_stride);
      for (int64_t c = 0; c < channels; ++c) {
        acc* o = written + c * out_stride;
        if (normalize) {
          const acc* xc = src + c * stride;
          for (int64_t t = 0; t < kTile; ++t) {
            const acc r = rows[cls[t] * channels + c];
            o[t] = classes[t] >= 0 ? (r - xc[t] * dot[t]) * inv[t] : acc(0);
          }
        } else {
          for (int64_t t = 0; t < kTile; ++t) o[t] = classes[t] >= 0 ? rows[cls[t] * channels + c] : acc(0);
        }
      }
      store_tile(out, st, n, l0, channels, count_l, written, tile.data());
    }
  });
}

std::tuple<Tensor, Tensor> prototype_pool_cpu(const Tensor& x, const Tensor& labels,
                                              int64_t num_classes, int64_t ignore_index,
                                              bool per_image, bool normalize_features) {
  check_features("x", x);
  const LabelMap map = label_map(labels, x.size(0), x.size(2), x.size(3), num_classes, ignore_index);
  std::tuple<Tensor, Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "prototype_pool_cpu",
                                  [&] {
                                    result = pool_forward<scalar_t>(x, map, num_classes, per_image,
                                                                    normalize_features);
                                  });
  return result;
}

Tensor prototype_pool_backward_cpu(const Tensor& grad_protos, const Tensor& x, const Tensor& labels,
                                   const Tensor& counts, int64_t ignore_index,
                                   bool normalize_features) {
  check_features("x", x);
  check_protos("grad_protos", grad_protos, x.size(0), x.size(1));
  const int64_t num_classes = grad_protos.size(-2);
  TORCH_CHECK_VALUE(counts.sizes() == grad_protos.sizes().slice(0, grad_protos.dim() - 1),
                    "counts must have shape ", grad_protos.sizes().slice(0, grad_protos.dim() - 1),
                    " to match grad_protos, got ", counts.sizes());
  const LabelMap map = label_map(labels, x.size(0), x.size(2), x.size(3), num_classes, ignore_index);
  GradOut grad(x);
  const Tensor grad_groups = as_groups(grad_protos, acc_dtype(x));
  const Features f = features_view(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "prototype_pool_backward_cpu", [&] {
        pool_backward<scalar_t>(grad_groups, counts, map, f, normalize_features, grad);
      });
  grad.finish();
  return grad.result;
}

// ---------------------------------------------------------------------------------------------
// prototype_kl

// The present classes (count > 0) of each group.
struct PresentSet {
  int64_t groups = 0, k = 0;
  std::vector<int64_t> num_present;  // (groups)
  std::vector<int64_t> classes;      // (groups, K): the present classes first
};

PresentSet present_set(const Tensor& counts /* (N, K) or (K,) */) {
  const Tensor counts_groups = (counts.dim() == 1 ? counts.unsqueeze(0) : counts).to(at::kLong).contiguous();
  PresentSet s;
  s.groups = counts_groups.size(0);
  s.k = counts_groups.size(1);
  s.num_present.assign(s.groups, 0);
  s.classes.assign(s.groups * s.k, 0);
  const int64_t* count = counts_groups.const_data_ptr<int64_t>();
  for (int64_t g = 0; g < s.groups; ++g) {
    for (int64_t k = 0; k < s.k; ++k) {
      if (count[g * s.k + k] > 0) s.classes[g * s.k + s.num_present[g]++] = k;
    }
  }
  return s;
}

// One side's prototypes packed to the present classes: packed[g][c][j], j < num_present[g].
template <typename acc>
std::vector<acc> pack_present(const NormalisedProtos<acc>& p, const PresentSet& present) {
  std::vector<acc> packed(p.groups * p.c * p.k, acc(0));
  for (int64_t g = 0; g < p.groups; ++g) {
    for (int64_t c = 0; c < p.c; ++c) {
      for (int64_t j = 0; j < present.num_present[g]; ++j) {
        packed[(g * p.c + c) * p.k + j] = p.hat_t[(g * p.c + c) * p.k + present.classes[g * p.k + j]];
      }
    }
  }
  return packed;
}

// cos[j][t] = x̂_t · P̂_j for the P packed classes (rows of K in `packed`, [C][K]). Classes go
// kClassBlock at a time with their kTile-pixel accumulators in registers (a small GEMM
// micro-kernel: per channel, kTile pixel values × kClassBlock broadcast prototype values).
constexpr int64_t kClassBlock = 4;

template <typename acc>
void tile_cosines(const acc* x, int64_t stride, int64_t channels, const acc* packed, int64_t k,
                  int64_t num_present, const acc* inv, acc* cos) {
  int64_t j0 = 0;
  for (; j0 + kClassBlock <= num_present; j0 += kClassBlock) {
    acc sums[kClassBlock][kTile] = {};
    for (int64_t c = 0; c < channels; ++c) {
      const acc* xc = x + c * stride;
      const acc* pc = packed + c * k + j0;
      for (int64_t jj = 0; jj < kClassBlock; ++jj) {
        const acc pj = pc[jj];
        for (int64_t t = 0; t < kTile; ++t) sums[jj][t] += pj * xc[t];
      }
    }
    for (int64_t jj = 0; jj < kClassBlock; ++jj) {
      for (int64_t t = 0; t < kTile; ++t) cos[(j0 + jj) * kTile + t] = sums[jj][t] * inv[t];
    }
  }
  for (; j0 < num_present; ++j0) {
    acc sums[kTile] = {};
    for (int64_t c = 0; c < channels; ++c) {
      const acc pj = packed[c * k + j0];
      const acc* xc = x + c * stride;
      for (int64_t t = 0; t < kTile; ++t) sums[t] += pj * xc[t];
    }
    for (int64_t t = 0; t < kTile; ++t) cos[j0 * kTile + t] = sums[t] * inv[t];
  }
}

// Per pixel, the log-softmax over the present classes of o = cos/τ:
// log_prob[j][t] = o_j − log Σ_j' e^{o_j'} (max-shifted).
template <typename acc>
void tile_log_softmax(const acc* cos, int64_t num_present, acc inv_tau, acc* log_prob) {
  // o is stored before the max is taken and subtracted: the top class's shifted logit is then
  // exactly 0 (a contracted cos·(1/τ) − max would leave its rounding error; K = 1 must give 0).
  acc mx[kTile], z[kTile];
  std::fill(mx, mx + kTile, -std::numeric_limits<acc>::infinity());
  for (int64_t j = 0; j < num_present; ++j) {
    const acc* cj = cos + j * kTile;
    acc* lj = log_prob + j * kTile;
    for (int64_t t = 0; t < kTile; ++t) {
      lj[t] = cj[t] * inv_tau;
      mx[t] = std::max(mx[t], lj[t]);
    }
  }
  std::fill(z, z + kTile, acc(0));
  for (int64_t j = 0; j < num_present; ++j) {
    acc* lj = log_prob + j * kTile;
    for (int64_t t = 0; t < kTile; ++t) {
      lj[t] -= mx[t];
      z[t] += std::exp(lj[t]);
    }
  }
  for (int64_t t = 0; t < kTile; ++t) z[t] = std::log(z[t]);
  for (int64_t j = 0; j < num_present; ++j) {
    acc* lj = log_prob + j * kTile;
    for (int64_t t = 0; t < kTile; ++t) lj[t] -= z[t];
  }
}

// Everything prototype_kl's kernels read.
template <typename acc>
struct KLProblem {
  Features s, t;
  NormalisedProtos<acc> ps, pt;
  PresentSet present;
  std::vector<acc> packed_s, packed_t;
  double tau = 1.0;
  int64_t tiles = 0;  // per image

  int64_t group_of(int64_t n) const { return present.groups == 1 ? 0 : n; }
};

template <typename acc>
KLProblem<acc> kl_problem(const Tensor& student, const Tensor& teacher, const Tensor& student_protos,
                          const Tensor& teacher_protos, const Tensor& counts, double tau) {
  KLProblem<acc> p;
  const auto dtype = acc_dtype(student);
  p.s = features_view(student);
  p.t = features_view(teacher);
  p.ps = normalised_protos<acc>(as_groups(student_protos, dtype));
  p.pt = normalised_protos<acc>(as_groups(teacher_protos, dtype));
  p.present = present_set(counts);
  p.packed_s = pack_present(p.ps, p.present);
  p.packed_t = pack_present(p.pt, p.present);
  p.tau = tau;
  p.tiles = (p.s.l + kTile - 1) / kTile;
  return p;
}

// The thread buffers of one tile of both sides.
template <typename acc>
struct KLTileBuffers {
  std::vector<acc> xs, xt, cos_s, cos_t, log_q, log_p;  // [C][kTile] and [P][kTile]
  acc norm_s[kTile], inv_s[kTile], norm_t[kTile], inv_t[kTile], kl[kTile];
  const acc* s_tile = nullptr;  // the tile of each side: the input itself or xs / xt (load_tile)
  const acc* t_tile = nullptr;
  int64_t s_stride = kTile, t_stride = kTile;

  KLTileBuffers(int64_t cs, int64_t ct, int64_t k)
      : xs(cs * kTile), xt(ct * kTile), cos_s(k * kTile), cos_t(k * kTile), log_q(k * kTile),
        log_p(k * kTile) {}
};

// Gathers tile (n, l0) of both sides and computes the cosines, log q, log p over the present
// classes and the per-pixel KL (0 past `count`). Returns the number of present classes.
template <typename scalar_t, typename acc>
int64_t kl_tile(const KLProblem<acc>& p, int64_t n, int64_t l0, int64_t count, KLTileBuffers<acc>& b) {
  const int64_t g = p.group_of(n), k = p.present.k;
  const int64_t num_present = p.present.num_present[g];
  std::fill(b.kl, b.kl + kTile, acc(0));
  if (num_present == 0) return 0;
  const acc inv_tau = static_cast<acc>(1.0 / p.tau);
  b.s_tile = load_tile(p.s.tensor.template const_data_ptr<scalar_t>(), p.s.strides, n, l0, p.s.c, count,
                       b.xs.data(), &b.s_stride);
  b.t_tile = load_tile(p.t.tensor.template const_data_ptr<scalar_t>(), p.t.strides, n, l0, p.t.c, count,
                       b.xt.data(), &b.t_stride);
  tile_norms(b.s_tile, b.s_stride, p.s.c, b.norm_s, b.inv_s);
  tile_norms(b.t_tile, b.t_stride, p.t.c, b.norm_t, b.inv_t);
  tile_cosines(b.s_tile, b.s_stride, p.s.c, p.packed_s.data() + g * p.s.c * k, k, num_present, b.inv_s,
               b.cos_s.data());
  tile_cosines(b.t_tile, b.t_stride, p.t.c, p.packed_t.data() + g * p.t.c * k, k, num_present, b.inv_t,
               b.cos_t.data());
  tile_log_softmax(b.cos_s.data(), num_present, inv_tau, b.log_q.data());
  tile_log_softmax(b.cos_t.data(), num_present, inv_tau, b.log_p.data());
  for (int64_t j = 0; j < num_present; ++j) {
    const acc* lq = b.log_q.data() + j * kTile;
    const acc* lp = b.log_p.data() + j * kTile;
    for (int64_t t = 0; t < kTile; ++t) b.kl[t] += std::exp(lp[t]) * (lp[t] - lq[t]);
  }
  for (int64_t t = count; t < kTile; ++t) b.kl[t] = acc(0);
  return num_present;
}

template <typename scalar_t>
Tensor kl_forward(const KLProblem<acc_t<scalar_t>>& p, const at::TensorOptions& options) {
  using acc = acc_t<scalar_t>;
  const int64_t items = p.s.n * p.tiles;
  std::vector<double> tile_kl(items, 0.0);
  at::parallel_for(0, items, 4, [&](int64_t begin, int64_t end) {
    KLTileBuffers<acc> b(p.s.c, p.t.c, p.present.k);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / p.tiles, l0 = (item % p.tiles) * kTile;
      const int64_t count = std::min(kTile, p.s.l - l0);
      if (kl_tile<scalar_t>(p, n, l0, count, b) == 0) continue;
      double sum = 0.0;
      for (int64_t t = 0; t < count; ++t) sum += static_cast<double>(b.kl[t]);
      tile_kl[item] = sum;
    }
  });
  double total = 0.0;
  for (double v : tile_kl) total += v;
  Tensor loss = at::empty({}, options);
  *loss.data_ptr<acc>() = static_cast<acc>(total / static_cast<double>(p.s.n * p.s.l));
  return loss;
}

// One side's gradients of a tile, from dcos[j][t] = ∂loss/∂cos_j at pixel t:
//   features: ∂x̂ = Σ_j dcos_j P̂_j; ∂x = (∂x̂ − x̂ (Σ_j dcos_j cos_j)) / ‖x‖ (∂x̂ / eps when ‖x‖ ≤ eps);
//   prototypes: ∂P̂_j += Σ_t dcos_j[t] x̂_t (into grad_hat[j][c], packed order).
template <typename acc>
void kl_side_grads(const acc* x, int64_t stride, int64_t channels, const acc* packed, int64_t k,
                   int64_t num_present,
                   const acc* norm, const acc* inv, const acc* dcos, const acc* dot,
                   acc* grad_x /* [C][grad_stride] or null */, int64_t grad_stride,
                   acc* grad_hat /* [P][C] or null */,
                   acc* x_hat_t /* [kTile][C] scratch */) {
  if (grad_x != nullptr) {
    for (int64_t c = 0; c < channels; ++c) {
      acc dx[kTile] = {};
      const acc* pc = packed + c * k;
      for (int64_t j = 0; j < num_present; ++j) {
        const acc pj = pc[j];
        const acc* dj = dcos + j * kTile;
        for (int64_t t = 0; t < kTile; ++t) dx[t] += pj * dj[t];
      }
      const acc* xc = x + c * stride;
      acc* gc = grad_x + c * grad_stride;
      for (int64_t t = 0; t < kTile; ++t) {
        const acc projected = dx[t] - xc[t] * inv[t] * dot[t];
        gc[t] = (norm[t] > static_cast<acc>(kNormEps) ? projected : dx[t]) * inv[t];
      }
    }
  }
  if (grad_hat != nullptr) {
    // ∂P̂_j += Σ_t dcos_j[t] x̂_t as axpys along C (x̂ transposed to [kTile][C] first): no
    // reduction across SIMD lanes, which strict IEEE order would keep scalar.
    for (int64_t c = 0; c < channels; ++c) {
      const acc* xc = x + c * stride;
      for (int64_t t = 0; t < kTile; ++t) x_hat_t[t * channels + c] = xc[t] * inv[t];
    }
    for (int64_t t = 0; t < kTile; ++t) {
      const acc* xt = x_hat_t + t * channels;
      for (int64_t j = 0; j < num_present; ++j) {
        const acc w = dcos[j * kTile + t];
        if (w == acc(0)) continue;  // past the tile's pixels
        acc* row = grad_hat + j * channels;
        for (int64_t c = 0; c < channels; ++c) row[c] += w * xt[c];
      }
    }
  }
}

template <typename scalar_t>
void kl_backward(const KLProblem<acc_t<scalar_t>>& p, double grad_loss, GradOut* grad_s,
                 GradOut* grad_t, Tensor* grad_ps, Tensor* grad_pt) {
  using acc = acc_t<scalar_t>;
  const int64_t k = p.present.k, groups = p.present.groups;
  const int64_t per_chunk = tiles_per_chunk(p.s.l);
  const int64_t chunks = (p.tiles + per_chunk - 1) / per_chunk;
  const int64_t items = p.s.n * chunks;
  // ∂loss/∂cos = (∂loss/∂o)/τ with ∂loss/∂o_s = (q − p)·g/(N·L), ∂loss/∂o_t = p (log p − log q − KL)·g/(N·L).
  const acc scale = static_cast<acc>(grad_loss / (static_cast<double>(p.s.n * p.s.l) * p.tau));
  // Per-chunk partial ∂P̂ (packed order), summed per group in chunk order afterwards.
  std::vector<acc> partial_s(grad_ps != nullptr ? items * k * p.s.c : 0, acc(0));
  std::vector<acc> partial_t(grad_pt != nullptr ? items * k * p.t.c : 0, acc(0));
  scalar_t* gs = grad_s != nullptr ? grad_s->written.data_ptr<scalar_t>() : nullptr;
  scalar_t* gt = grad_t != nullptr ? grad_t->written.data_ptr<scalar_t>() : nullptr;

  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    KLTileBuffers<acc> b(p.s.c, p.t.c, k);
    std::vector<acc> dcos_s(k * kTile), dcos_t(k * kTile);
    std::vector<acc> tile_grad(std::max(p.s.c, p.t.c) * kTile);
    std::vector<acc> x_hat_t(std::max(p.s.c, p.t.c) * kTile);
    acc dot_s[kTile], dot_t[kTile];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / chunks, first = (item % chunks) * per_chunk;
      const int64_t last = std::min(p.tiles, first + per_chunk);
      for (int64_t tile = first; tile < last; ++tile) {
        const int64_t l0 = tile * kTile, count = std::min(kTile, p.s.l - l0);
        const int64_t num_present = kl_tile<scalar_t>(p, n, l0, count, b);
        if (num_present == 0) {
          std::fill(tile_grad.begin(), tile_grad.end(), acc(0));
          if (gs != nullptr) scatter_tile(gs, grad_s->strides, n, l0, p.s.c, count, tile_grad.data());
          if (gt != nullptr) scatter_tile(gt, grad_t->strides, n, l0, p.t.c, count, tile_grad.data());
          continue;
        }
        // dcos = ∂loss/∂cos; dot[t] = Σ_j dcos_j cos_j (the x̂ component of ∂x̂).
        std::fill(dot_s, dot_s + kTile, acc(0));
        std::fill(dot_t, dot_t + kTile, acc(0));
        for (int64_t j = 0; j < num_present; ++j) {
          const acc* lq = b.log_q.data() + j * kTile;
          const acc* lp = b.log_p.data() + j * kTile;
          const acc* cs = b.cos_s.data() + j * kTile;
          const acc* ct = b.cos_t.data() + j * kTile;
          acc* ds = dcos_s.data() + j * kTile;
          acc* dt = dcos_t.data() + j * kTile;
          for (int64_t t = 0; t < kTile; ++t) {
            const acc valid = t < count ? scale : acc(0);
            const acc prob_t = std::exp(lp[t]);
            ds[t] = valid * (std::exp(lq[t]) - prob_t);
            dt[t] = valid * prob_t * (lp[t] - lq[t] - b.kl[t]);
            dot_s[t] += ds[t] * cs[t];
            dot_t[t] += dt[t] * ct[t];
          }
        }
        const int64_t g = p.group_of(n);
        int64_t out_stride = kTile;
        if (gs != nullptr || grad_ps != nullptr) {
          acc* out = gs != nullptr ? tile_output(gs, grad_s->strides, n, l0, count, tile_grad.data(), &out_stride)
                                   : nullptr;
          kl_side_grads(b.s_tile, b.s_stride, p.s.c, p.packed_s.data() + g * p.s.c * k, k, num_present,
                        b.norm_s, b.inv_s, dcos_s.data(), dot_s, out, out_stride,
                        grad_ps != nullptr ? partial_s.data() + item * k * p.s.c : nullptr,
                        x_hat_t.data());
          if (gs != nullptr) store_tile(gs, grad_s->strides, n, l0, p.s.c, count, out, tile_grad.data());
        }
        if (gt != nullptr || grad_pt != nullptr) {
          acc* out = gt != nullptr ? tile_output(gt, grad_t->strides, n, l0, count, tile_grad.data(), &out_stride)
                                   : nullptr;
          kl_side_grads(b.t_tile, b.t_stride, p.t.c, p.packed_t.data() + g * p.t.c * k, k, num_present,
                        b.norm_t, b.inv_t, dcos_t.data(), dot_t, out, out_stride,
                        grad_pt != nullptr ? partial_t.data() + item * k * p.t.c : nullptr,
                        x_hat_t.data());
          if (gt != nullptr) store_tile(gt, grad_t->strides, n, l0, p.t.c, count, out, tile_grad.data());
        }
      }
    }
  });

  // ∂P̂ per group (chunks in order), unpacked to class order, then through the normalisation.
  const auto finish_protos = [&](const std::vector<acc>& partial, const NormalisedProtos<acc>& protos,
                                 Tensor* out) {
    if (out == nullptr) return;
    const int64_t channels = protos.c;
    *out = at::zeros({groups, k, channels}, out->options());
    acc* grad = out->data_ptr<acc>();
    std::vector<acc> grad_hat(channels);
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t j = 0; j < p.present.num_present[g]; ++j) {
        std::fill(grad_hat.begin(), grad_hat.end(), acc(0));
        for (int64_t item = 0; item < items; ++item) {
          if (p.group_of(item / chunks) != g) continue;
          const acc* part = partial.data() + (item * k + j) * channels;
          for (int64_t c = 0; c < channels; ++c) grad_hat[c] += part[c];
        }
        const int64_t cls = p.present.classes[g * k + j];
        protos_grad_from_hat(protos, g, cls, grad_hat.data(), grad + (g * k + cls) * channels);
      }
    }
  };
  finish_protos(partial_s, p.ps, grad_ps);
  finish_protos(partial_t, p.pt, grad_pt);
}

void check_kl_args(const Tensor& student, const Tensor& teacher, const Tensor& student_protos,
                   const Tensor& teacher_protos, const Tensor& counts, double tau) {
  check_pair(student, teacher);
  check_protos("student_protos", student_protos, student.size(0), student.size(1));
  check_protos("teacher_protos", teacher_protos, student.size(0), teacher.size(1));
  TORCH_CHECK_VALUE(teacher_protos.sizes().slice(0, teacher_protos.dim() - 1) ==
                        student_protos.sizes().slice(0, student_protos.dim() - 1),
                    "teacher_protos must have the leading shape of student_protos (",
                    student_protos.sizes(), "), got ", teacher_protos.sizes());
  TORCH_CHECK_TYPE(at::isIntegralType(counts.scalar_type(), /*includeBool=*/false),
                   "counts must be an integer tensor, got ", counts.scalar_type());
  TORCH_CHECK_VALUE(counts.sizes() == student_protos.sizes().slice(0, student_protos.dim() - 1),
                    "counts must have shape ", student_protos.sizes().slice(0, student_protos.dim() - 1),
                    " to match student_protos, got ", counts.sizes());
  TORCH_CHECK_VALUE(counts.device().is_cpu(), "counts must be a CPU tensor, got ", counts.device());
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, "tau must be finite and > 0, got ", tau);
}

Tensor prototype_kl_cpu(const Tensor& student, const Tensor& teacher, const Tensor& student_protos,
                        const Tensor& teacher_protos, const Tensor& counts, double tau) {
  check_kl_args(student, teacher, student_protos, teacher_protos, counts, tau);
  Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "prototype_kl_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const auto p = kl_problem<acc>(student, teacher, student_protos, teacher_protos, counts, tau);
    loss = kl_forward<scalar_t>(p, student.options().dtype(acc_dtype(student)));
  });
  return loss;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> prototype_kl_backward_cpu(
    const Tensor& grad_loss, const Tensor& student, const Tensor& teacher,
    const Tensor& student_protos, const Tensor& teacher_protos, const Tensor& counts, double tau,
    bool student_requires_grad, bool teacher_requires_grad, bool student_protos_requires_grad,
    bool teacher_protos_requires_grad) {
  check_kl_args(student, teacher, student_protos, teacher_protos, counts, tau);
  const double g = scalar_of("grad_loss", grad_loss);
  const Tensor none = at::empty({0}, student.options());
  std::optional<GradOut> grad_s, grad_t;
  if (student_requires_grad) grad_s.emplace(student);
  if (teacher_requires_grad) grad_t.emplace(teacher);
  const auto acc_options = student.options().dtype(acc_dtype(student));
  Tensor grad_ps = at::empty({0}, acc_options), grad_pt = at::empty({0}, acc_options);
  if (student_requires_grad || teacher_requires_grad || student_protos_requires_grad ||
      teacher_protos_requires_grad) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(),
                                    "prototype_kl_backward_cpu", [&] {
      using acc = acc_t<scalar_t>;
      const auto p = kl_problem<acc>(student, teacher, student_protos, teacher_protos, counts, tau);
      kl_backward<scalar_t>(p, g, grad_s ? &*grad_s : nullptr, grad_t ? &*grad_t : nullptr,
                            student_protos_requires_grad ? &grad_ps : nullptr,
                            teacher_protos_requires_grad ? &grad_pt : nullptr);
    });
  }
  if (grad_s) grad_s->finish();
  if (grad_t) grad_t->finish();
  const auto protos_grad = [&](bool wanted, const Tensor& grad, const Tensor& protos) {
    if (!wanted) return at::empty({0}, protos.options());
    return (protos.dim() == 2 ? grad.squeeze(0) : grad).to(protos.scalar_type());
  };
  return {grad_s ? grad_s->result : none, grad_t ? grad_t->result : none,
          protos_grad(student_protos_requires_grad, grad_ps, student_protos),
          protos_grad(teacher_protos_requires_grad, grad_pt, teacher_protos)};
}

// ---------------------------------------------------------------------------------------------
// class_variation_loss

// Everything the class-variation kernels read: both sides, labels and per-image prototypes.
template <typename acc>
struct VariationProblem {
  Features s, t;
  const LabelMap* labels = nullptr;
  NormalisedProtos<acc> ps, pt;  // (N, K, C) each
  int64_t k = 0, tiles = 0;
};

// m[t] = x̂_t · P̂[y_t] (1 at ignored pixels and past the tile) for one side of a gathered tile.
template <typename acc>
void tile_class_cosines(const acc* x, int64_t stride, int64_t channels, const acc* hat_t /* [C][K] */,
                        int64_t k, const int64_t* classes, acc* norm, acc* inv, acc* m) {
  tile_norms(x, stride, channels, norm, inv);
  int64_t cls[kTile];
  for (int64_t t = 0; t < kTile; ++t) cls[t] = std::max<int64_t>(classes[t], 0);
  acc dot[kTile] = {};
  for (int64_t c = 0; c < channels; ++c) {
    const acc* xc = x + c * stride;
    const acc* pc = hat_t + c * k;
    for (int64_t t = 0; t < kTile; ++t) dot[t] += xc[t] * pc[cls[t]];
  }
  // A select, not a product: an ignored pixel's features may be anything, NaN included.
  for (int64_t t = 0; t < kTile; ++t) m[t] = classes[t] >= 0 ? dot[t] * inv[t] : acc(1);
}

template <typename acc>
struct VariationTile {
  std::vector<acc> xs, xt;
  acc norm_s[kTile], inv_s[kTile], m_s[kTile], norm_t[kTile], inv_t[kTile], m_t[kTile];
  int64_t classes[kTile];
  const acc* s_tile = nullptr;  // the tile of each side: the input itself or xs / xt (load_tile)
  const acc* t_tile = nullptr;
  int64_t s_stride = kTile, t_stride = kTile;
  VariationTile(int64_t cs, int64_t ct) : xs(cs * kTile), xt(ct * kTile) {}
};

template <typename scalar_t, typename acc>
void variation_tile(const VariationProblem<acc>& p, int64_t n, int64_t l0, int64_t count,
                    VariationTile<acc>& b) {
  p.labels->tile_classes(n, l0, count, b.classes);
  b.s_tile = load_tile(p.s.tensor.template const_data_ptr<scalar_t>(), p.s.strides, n, l0, p.s.c, count,
                       b.xs.data(), &b.s_stride);
  b.t_tile = load_tile(p.t.tensor.template const_data_ptr<scalar_t>(), p.t.strides, n, l0, p.t.c, count,
                       b.xt.data(), &b.t_stride);
  tile_class_cosines(b.s_tile, b.s_stride, p.s.c, p.ps.hat_of(n), p.k, b.classes, b.norm_s, b.inv_s, b.m_s);
  tile_class_cosines(b.t_tile, b.t_stride, p.t.c, p.pt.hat_of(n), p.k, b.classes, b.norm_t, b.inv_t, b.m_t);
}

template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor, Tensor> variation_forward(const Tensor& student, const Tensor& teacher,
                                                             const LabelMap& labels, int64_t num_classes) {
  using acc = acc_t<scalar_t>;
  VariationProblem<acc> p;
  p.s = features_view(student);
  p.t = features_view(teacher);
  p.labels = &labels;
  p.k = num_classes;
  p.tiles = (p.s.l + kTile - 1) / kTile;
  const auto options = student.options().dtype(acc_dtype(student));
  // Pass 1: the per-image prototypes of both sides.
  std::vector<double> sums_s, sums_t;
  std::vector<int64_t> counts;
  class_sums<scalar_t>(p.s, labels, num_classes, sums_s, counts);
  class_sums<scalar_t>(p.t, labels, num_classes, sums_t, counts);
  Tensor protos_s = protos_from_sums(sums_s, counts, p.s.n, num_classes, p.s.c, options);
  Tensor protos_t = protos_from_sums(sums_t, counts, p.s.n, num_classes, p.t.c, options);
  p.ps = normalised_protos<acc>(protos_s);
  p.pt = normalised_protos<acc>(protos_t);
  // Pass 2: each pixel's cosine to its class's prototype, both sides.
  const int64_t items = p.s.n * p.tiles;
  std::vector<double> tile_sum(items, 0.0);
  at::parallel_for(0, items, 4, [&](int64_t begin, int64_t end) {
    VariationTile<acc> b(p.s.c, p.t.c);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / p.tiles, l0 = (item % p.tiles) * kTile;
      const int64_t count = std::min(kTile, p.s.l - l0);
      variation_tile<scalar_t>(p, n, l0, count, b);
      double sum = 0.0;
      for (int64_t t = 0; t < count; ++t) {
        const double d = static_cast<double>(b.m_s[t]) - static_cast<double>(b.m_t[t]);
        sum += d * d;
      }
      tile_sum[item] = sum;
    }
  });
  double total = 0.0;
  for (double v : tile_sum) total += v;
  Tensor loss = at::empty({}, options);
  *loss.data_ptr<acc>() = static_cast<acc>(total / static_cast<double>(p.s.n * p.s.l));
  Tensor count_tensor = at::empty({p.s.n, num_classes}, student.options().dtype(at::kLong));
  std::copy(counts.begin(), counts.end(), count_tensor.data_ptr<int64_t>());
  return {loss, protos_s, protos_t, count_tensor};
}

// Backward. With e = 2 (m_s − m_t)·g/(N·L) at labelled pixels (0 elsewhere), m = x̂·P̂_y:
//   direct:  ∂x = ±e (P̂_y − x̂ m) / ‖x‖  (± e P̂_y / eps when ‖x‖ ≤ eps), + for s, − for t;
//   through the prototypes: ∂P̂_k = Σ_{i: y_i = k} ±e_i x̂_i → ∂P_k (normalisation) → each pixel
//   of class k gets ∂P_k / count_k.
// Pass A computes e, m, norms per pixel (kept in O(pixels) workspace) and per-chunk partial ∂P̂;
// pass B writes the gradients of the sides requested.
template <typename scalar_t>
void variation_backward(const Tensor& student, const Tensor& teacher, const LabelMap& labels,
                        const Tensor& protos_s, const Tensor& protos_t, const Tensor& counts,
                        double grad_loss, GradOut* grad_s, GradOut* grad_t) {
  using acc = acc_t<scalar_t>;
  VariationProblem<acc> p;
  p.s = features_view(student);
  p.t = features_view(teacher);
  p.labels = &labels;
  p.k = protos_s.size(1);
  p.tiles = (p.s.l + kTile - 1) / kTile;
  const auto dtype = acc_dtype(student);
  p.ps = normalised_protos<acc>(protos_s.to(dtype).contiguous());
  p.pt = normalised_protos<acc>(protos_t.to(dtype).contiguous());
  const int64_t n_images = p.s.n, l = p.s.l, k = p.k;
  const int64_t per_chunk = tiles_per_chunk(l);
  const int64_t chunks = (p.tiles + per_chunk - 1) / per_chunk;
  const int64_t items = n_images * chunks;
  const acc scale = static_cast<acc>(2.0 * grad_loss / static_cast<double>(n_images * l));

  // Pass A.
  std::vector<acc> e(n_images * l), m_s(n_images * l), m_t(n_images * l);
  std::vector<acc> norm_s(n_images * l), norm_t(n_images * l);
  std::vector<acc> partial_s(grad_s != nullptr ? items * k * p.s.c : 0, acc(0));
  std::vector<acc> partial_t(grad_t != nullptr ? items * k * p.t.c : 0, acc(0));
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    VariationTile<acc> b(p.s.c, p.t.c);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / chunks, first = (item % chunks) * per_chunk;
      const int64_t last = std::min(p.tiles, first + per_chunk);
      for (int64_t tile = first; tile < last; ++tile) {
        const int64_t l0 = tile * kTile, count = std::min(kTile, l - l0);
        variation_tile<scalar_t>(p, n, l0, count, b);
        acc et[kTile];
        for (int64_t t = 0; t < kTile; ++t) {
          et[t] = t < count && b.classes[t] >= 0 ? scale * (b.m_s[t] - b.m_t[t]) : acc(0);
        }
        for (int64_t t = 0; t < count; ++t) {
          const int64_t i = n * l + l0 + t;
          e[i] = et[t];
          m_s[i] = b.m_s[t];
          m_t[i] = b.m_t[t];
          norm_s[i] = b.norm_s[t];
          norm_t[i] = b.norm_t[t];
        }
        const auto accumulate = [&](const acc* x, int64_t stride, int64_t channels, const acc* inv,
                                    acc sign, acc* partial) {
          for (int64_t t = 0; t < count; ++t) {
            if (b.classes[t] < 0) continue;
            const acc w = sign * et[t] * inv[t];
            acc* row = partial + b.classes[t] * channels;
            for (int64_t c = 0; c < channels; ++c) row[c] += w * x[c * stride + t];
          }
        };
        if (grad_s != nullptr) accumulate(b.s_tile, b.s_stride, p.s.c, b.inv_s, acc(1), partial_s.data() + item * k * p.s.c);
        if (grad_t != nullptr) accumulate(b.t_tile, b.t_stride, p.t.c, b.inv_t, acc(-1), partial_t.data() + item * k * p.t.c);
      }
    }
  });

  // ∂P per image (chunks in order), divided by the counts: the gradient each pixel gets back.
  const Tensor counts64 = counts.to(at::kLong).contiguous();
  const int64_t* count_of = counts64.const_data_ptr<int64_t>();
  const auto pooled_grad = [&](const std::vector<acc>& partial, const NormalisedProtos<acc>& protos) {
    const int64_t channels = protos.c;
    std::vector<acc> out(n_images * k * channels, acc(0)), grad_hat(channels);
    for (int64_t n = 0; n < n_images; ++n) {
      for (int64_t cls = 0; cls < k; ++cls) {
        if (count_of[n * k + cls] == 0) continue;
        std::fill(grad_hat.begin(), grad_hat.end(), acc(0));
        for (int64_t chunk = 0; chunk < chunks; ++chunk) {
          const acc* part = partial.data() + ((n * chunks + chunk) * k + cls) * channels;
          for (int64_t c = 0; c < channels; ++c) grad_hat[c] += part[c];
        }
        acc* row = out.data() + (n * k + cls) * channels;
        protos_grad_from_hat(protos, n, cls, grad_hat.data(), row);
        const acc inv_count = acc(1) / static_cast<acc>(count_of[n * k + cls]);
        for (int64_t c = 0; c < channels; ++c) row[c] *= inv_count;
      }
    }
    return out;
  };

  // Pass B.
  const auto write_side = [&](const Features& f, const NormalisedProtos<acc>& protos,
                              const std::vector<acc>& pooled, const std::vector<acc>& m,
                              const std::vector<acc>& norm, acc sign, GradOut& grad) {
    const scalar_t* x = f.tensor.template const_data_ptr<scalar_t>();
    scalar_t* out = grad.written.data_ptr<scalar_t>();
    at::parallel_for(0, n_images * p.tiles, 4, [&](int64_t begin, int64_t end) {
      std::vector<acc> tile(f.c * kTile), gathered(f.c * kTile);
      int64_t classes[kTile];
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / p.tiles, l0 = (item % p.tiles) * kTile;
        const int64_t count = std::min(kTile, l - l0);
        labels.tile_classes(n, l0, count, classes);
        int64_t stride;
        const acc* src = load_tile(x, f.strides, n, l0, f.c, count, gathered.data(), &stride);
        acc direct[kTile], project[kTile], inv[kTile];
        int64_t cls[kTile];
        for (int64_t t = 0; t < kTile; ++t) {
          const int64_t i = n * l + l0 + std::min(t, count - 1);
          const bool labelled = classes[t] >= 0;
          cls[t] = labelled ? classes[t] : 0;
          inv[t] = acc(1) / std::max(norm[i], static_cast<acc>(kNormEps));
          direct[t] = labelled ? sign * e[i] * inv[t] : acc(0);  // ±e/‖x‖
          // x̂ m / ‖x‖ · (±e) = x · (±e m / ‖x‖²); none when ‖x‖ ≤ eps.
          project[t] = labelled && norm[i] > static_cast<acc>(kNormEps) ? direct[t] * m[i] * inv[t] : acc(0);
        }
        const acc* hat_t = protos.hat_of(n);
        const acc* pooled_n = pooled.data() + n * k * f.c;
        int64_t out_stride;
        acc* written = tile_output(out, grad.strides, n, l0, count, tile.data(), &out_stride);
        for (int64_t c = 0; c < f.c; ++c) {
          const acc* xc = src + c * stride;
          acc* oc = written + c * out_stride;
          const acc* pc = hat_t + c * k;
          for (int64_t t = 0; t < kTile; ++t) {
            const acc g = direct[t] * pc[cls[t]] - project[t] * xc[t] + pooled_n[cls[t] * f.c + c];
            oc[t] = classes[t] >= 0 ? g : acc(0);
          }
        }
        store_tile(out, grad.strides, n, l0, f.c, count, written, tile.data());
      }
    });
  };
  if (grad_s != nullptr) {
    const auto pooled = pooled_grad(partial_s, p.ps);
    write_side(p.s, p.ps, pooled, m_s, norm_s, acc(1), *grad_s);
  }
  if (grad_t != nullptr) {
    const auto pooled = pooled_grad(partial_t, p.pt);
    write_side(p.t, p.pt, pooled, m_t, norm_t, acc(-1), *grad_t);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> class_variation_loss_cpu(const Tensor& student,
                                                                    const Tensor& teacher,
                                                                    const Tensor& labels,
                                                                    int64_t num_classes,
                                                                    int64_t ignore_index) {
  check_pair(student, teacher);
  const LabelMap map =
      label_map(labels, student.size(0), student.size(2), student.size(3), num_classes, ignore_index);
  std::tuple<Tensor, Tensor, Tensor, Tensor> result;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(),
                                  "class_variation_loss_cpu", [&] {
    result = variation_forward<scalar_t>(student, teacher, map, num_classes);
  });
  return result;
}

std::tuple<Tensor, Tensor> class_variation_loss_backward_cpu(
    const Tensor& grad_loss, const Tensor& student, const Tensor& teacher, const Tensor& labels,
    const Tensor& student_protos, const Tensor& teacher_protos, const Tensor& counts,
    int64_t ignore_index, bool student_requires_grad, bool teacher_requires_grad) {
  check_pair(student, teacher);
  TORCH_CHECK_VALUE(student_protos.dim() == 3, "student_protos must have shape (N, K, C), got ",
                    student_protos.sizes());
  check_protos("student_protos", student_protos, student.size(0), student.size(1));
  check_protos("teacher_protos", teacher_protos, student.size(0), teacher.size(1));
  const int64_t num_classes = student_protos.size(1);
  TORCH_CHECK_VALUE(teacher_protos.dim() == 3 && teacher_protos.size(1) == num_classes,
                    "teacher_protos must have shape (N, K=", num_classes, ", C), got ",
                    teacher_protos.sizes());
  TORCH_CHECK_VALUE(counts.dim() == 2 && counts.size(0) == student.size(0) && counts.size(1) == num_classes,
                    "counts must have shape (N, K) = (", student.size(0), ", ", num_classes, "), got ",
                    counts.sizes());
  const LabelMap map =
      label_map(labels, student.size(0), student.size(2), student.size(3), num_classes, ignore_index);
  const double g = scalar_of("grad_loss", grad_loss);
  const Tensor none = at::empty({0}, student.options());
  if (!student_requires_grad && !teacher_requires_grad) return {none, none};
  std::optional<GradOut> grad_s, grad_t;
  if (student_requires_grad) grad_s.emplace(student);
  if (teacher_requires_grad) grad_t.emplace(teacher);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(),
                                  "class_variation_loss_backward_cpu", [&] {
    variation_backward<scalar_t>(student, teacher, map, student_protos, teacher_protos, counts, g,
                                 grad_s ? &*grad_s : nullptr, grad_t ? &*grad_t : nullptr);
  });
  if (grad_s) grad_s->finish();
  if (grad_t) grad_t->finish();
  return {grad_s ? grad_s->result : none, grad_t ? grad_t->result : none};
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("prototype_pool", &kdops::cpu::prototype_pool_cpu);
  m.impl("prototype_pool_backward", &kdops::cpu::prototype_pool_backward_cpu);
  m.impl("prototype_kl", &kdops::cpu::prototype_kl_cpu);
  m.impl("prototype_kl_backward", &kdops::cpu::prototype_kl_backward_cpu);
  m.impl("class_variation_loss", &kdops::cpu::class_variation_loss_cpu);
  m.impl("class_variation_loss_backward", &kdops::cpu::class_variation_loss_backward_cpu);
}
