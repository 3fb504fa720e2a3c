// CPU kernels of kdops::class_variation_loss and its backward (IFVD), registered for the CPU
// dispatch key. Shared pieces: csrc/cpu/prototypes_common.h.
#include "cpu/prototypes_common.h"

namespace kdops {
namespace cpu {
namespace {

using namespace proto;

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
  m.impl("class_variation_loss", &kdops::cpu::class_variation_loss_cpu);
  m.impl("class_variation_loss_backward", &kdops::cpu::class_variation_loss_backward_cpu);
}
