// CPU kernels of kdops::prototype_pool and its backward (per-image or per-batch class prototypes,
// optionally of the unit features), registered for the CPU dispatch key. Shared pieces and the
// work decomposition: csrc/cpu/prototypes_common.h.
#include "cpu/prototypes_common.h"

namespace kdops {
namespace cpu {
namespace {

using namespace proto;

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

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("prototype_pool", &kdops::cpu::prototype_pool_cpu);
  m.impl("prototype_pool_backward", &kdops::cpu::prototype_pool_backward_cpu);
}
