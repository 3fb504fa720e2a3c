// CPU kernels of the channel-correlation family (kdops::channel_correlation,
// channel_correlation_loss, pairwise_affinity_loss and their backward ops) and their registration
// for the CPU dispatch key. Specification: kdops/reference/correlation.py; the formulas and why
// they are not the textbook ones: csrc/common/correlation_ops.h (the numerics section).
//
// Work per call: the GEMMs go to at::bmm in float32 (MKL sgemm; float64 for float64 inputs, for
// gradcheck) with oneDNN's reduced-precision float32 matmul switched off while they run; all other
// work is fused into the loops here, one pass over each operand:
//   * prologue: per pixel tile, the channel norms (float64) and the operands the GEMMs read
//     (D̂ = X̂_s − X̂_t and Σ̂ = X̂_s + X̂_t stacked in one (N, 2C, L) buffer; or X_s ± X_t);
//   * epilogue: per row of the C × C (or L × L) products, the loss terms in float64, the
//     gradient's weight rows, and the per-pixel chain rule through the normalisation.
// Saved for backward: inputs and per-pixel norms only; the backward ops recompute the products.
//
// Determinism: work items (rows, pixel tiles) are fixed pieces independent of the thread count;
// partial sums land in a buffer indexed by item and are added in order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "common/correlation_ops.h"
#include "common/ieee_matmul.h"

namespace kdops {
namespace cpu {
namespace {

using at::Tensor;
using correlation::kNormEps;
using correlation::Norm;

constexpr int64_t kPixelTile = 256;  // pixels per work item of the per-pixel passes

using IeeeOneDnnGuard = IeeeMatmulGuard<at::Float32Backend::MKLDNN>;

void check_cpu(const Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), name, " must be a CPU tensor, got ", x.device());
}

// x as a contiguous (N, C, L) tensor in the accumulation dtype (a view when it already is one).
Tensor contiguous_features(const Tensor& x) { return correlation::features(x).contiguous(); }

// Σ of per-item partial sums, in item order (the same result for any thread count).
double ordered_sum(const std::vector<double>& partial) {
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

// The gradient buffer of x: the tensor empty_like(x) gives, or a contiguous (N, C, L) buffer of
// x's dtype copied into it by finish() when empty_like keeps a layout the loops do not write.
struct ContiguousGradOut {
  Tensor result, written;
  explicit ContiguousGradOut(const Tensor& x) : result(at::empty_like(x)) {
    written = result.is_contiguous() ? result : at::empty(x.sizes(), x.options());
  }
  Tensor finish() {
    if (!written.is_same(result)) result.copy_(written);
    return result;
  }
};

// ---------------------------------------------------------------------------------------------
// channel_correlation_loss
//
// base: per image the Gram of one side formed directly (N, C, C); other: M = Σ Dᵀ (same L:
// ΔG = G_s − G_t = sym(M)) or G_t (other L, base = G_s). With the same L the other side's Gram is
// base ± ΔG, and base is the side of the smaller norm (‖X‖_F): G_large = G_small ± ΔG adds
// without cancellation whether the two are close (ΔG small) or far apart (ΔG ≈ G_large), where
// G_small = G_large − ΔG would lose every digit of a small teacher (features 1000× smaller than
// the student's gave a 15 % error). Per row (n, i) the row of R_s − R_t in float64, and G_s, G_t
// and their norms for the backward formulas.

template <typename acc>
struct GramRows {
  const acc* base;
  const acc* other;
  const char* base_is_teacher;  // (N,) flags, same L only
  int64_t c;
  bool same_length;
  Norm norm;
  double length_s, length_t;

  // Fills gs_row, gt_row, diff_row (length c) for row i of image n; returns (r_s, r_t).
  std::pair<double, double> row(int64_t n, int64_t i, double* gs_row, double* gt_row,
                                double* diff_row) const {
    const acc* g = base + (n * c + i) * c;
    const acc* m = other + n * c * c;
    const bool teacher_base = same_length && base_is_teacher[n] != 0;
    double ss = 0.0, tt = 0.0, cross = 0.0;
    for (int64_t j = 0; j < c; ++j) {
      double s = g[j];
      double d, t;
      if (same_length) {
        d = 0.5 * (static_cast<double>(m[i * c + j]) + static_cast<double>(m[j * c + i]));
        if (teacher_base) {
          t = s;
          s = t + d;
        } else {
          t = s - d;
        }
      } else {
        t = m[i * c + j];
        d = s - t;
      }
      gs_row[j] = s;
      gt_row[j] = t;
      diff_row[j] = d;
      ss += s * s;
      tt += t * t;
      cross += d * (s + t);
    }
    const double rs = std::sqrt(ss), rt = std::sqrt(tt);
    switch (norm) {
      case Norm::kNone:
        break;
      case Norm::kL:
        for (int64_t j = 0; j < c; ++j) {
          diff_row[j] = same_length ? diff_row[j] / length_s
                                    : gs_row[j] / length_s - gt_row[j] / length_t;
        }
        break;
      case Norm::kRow: {
        const double rs_c = std::max(rs, kNormEps), rt_c = std::max(rt, kNormEps);
        if (rs > kNormEps && rt > kNormEps) {
          // r_s − r_t = ⟨ΔG, G_s + G_t⟩ / (r_s + r_t): no cancellation.
          const double gap_scale = (cross / (rs + rt)) / (rs_c * rt_c);
          for (int64_t j = 0; j < c; ++j) diff_row[j] = diff_row[j] / rs_c - gt_row[j] * gap_scale;
        } else {
          for (int64_t j = 0; j < c; ++j) diff_row[j] = gs_row[j] / rs_c - gt_row[j] / rt_c;
        }
        break;
      }
    }
    return {rs, rt};
  }
};

// The Gram products of a channel_correlation_loss call (see GramRows): base, M or G_t, and
// per image whether base is the teacher's Gram; accumulation dtype.
struct LossGrams {
  Tensor base, other;
  std::vector<char> base_is_teacher;  // char, not bool: std::vector<bool> has no data()
};

LossGrams loss_grams(const Tensor& xs, const Tensor& xt) {
  const int64_t images = xs.size(0);
  LossGrams out;
  out.base_is_teacher.assign(images, 0);
  if (xs.size(2) != xt.size(2)) {
    out.base = at::bmm(xs, xs.transpose(1, 2));
    out.other = at::bmm(xt, xt.transpose(1, 2));
    return out;
  }
  // ‖X‖_F per image, one read each (no squared copy of the features).
  const Tensor norms_s = at::linalg_vector_norm(xs, 2, {1, 2}, false, at::kDouble);
  const Tensor norms_t = at::linalg_vector_norm(xt, 2, {1, 2}, false, at::kDouble);
  out.base = at::empty({images, xs.size(1), xs.size(1)}, xs.options());
  for (int64_t n = 0; n < images; ++n) {
    out.base_is_teacher[n] = norms_t[n].item<double>() < norms_s[n].item<double>();
    const Tensor x = out.base_is_teacher[n] ? xt[n] : xs[n];
    Tensor base_n = out.base[n];
    at::mm_out(base_n, x, x.t());
  }
  // Σ = X_s + X_t and D = X_s − X_t in one pass, stacked (N, 2C, L).
  const int64_t n = xs.size(0), c = xs.size(1), l = xs.size(2);
  Tensor operands = at::empty({n, 2 * c, l}, xs.options());
  AT_DISPATCH_FLOATING_TYPES(xs.scalar_type(), "correlation_loss_operands", [&] {
    const scalar_t* s = xs.const_data_ptr<scalar_t>();
    const scalar_t* t = xt.const_data_ptr<scalar_t>();
    scalar_t* out = operands.data_ptr<scalar_t>();
    at::parallel_for(0, n * c, 16, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t image = row / c, ch = row % c;
        const scalar_t* a = s + row * l;
        const scalar_t* b = t + row * l;
        scalar_t* sum = out + (image * 2 * c + ch) * l;
        scalar_t* difference = sum + c * l;
        for (int64_t k = 0; k < l; ++k) {
          sum[k] = a[k] + b[k];
          difference[k] = a[k] - b[k];
        }
      }
    });
  });
  const Tensor sum = operands.narrow(1, 0, c), difference = operands.narrow(1, c, c);
  out.other = at::bmm(sum, difference.transpose(1, 2));
  return out;
}

Tensor channel_correlation_loss_cpu(const Tensor& student, const Tensor& teacher,
                                    c10::string_view norm_name) {
  check_cpu(student, "student");
  correlation::check_pair(student, teacher, /*same_channels=*/true, /*same_spatial=*/false);
  const Norm norm = correlation::parse_norm(norm_name);
  IeeeOneDnnGuard guard;
  const Tensor xs = contiguous_features(student), xt = contiguous_features(teacher);
  const int64_t n = xs.size(0), c = xs.size(1);
  const LossGrams grams = loss_grams(xs, xt);
  std::vector<double> partial(n * c, 0.0);
  AT_DISPATCH_FLOATING_TYPES(xs.scalar_type(), "channel_correlation_loss_cpu", [&] {
    const GramRows<scalar_t> rows{grams.base.const_data_ptr<scalar_t>(),
                                  grams.other.const_data_ptr<scalar_t>(), grams.base_is_teacher.data(),
                                  c, xs.size(2) == xt.size(2), norm,
                                  static_cast<double>(xs.size(2)), static_cast<double>(xt.size(2))};
    at::parallel_for(0, n * c, 8, [&](int64_t begin, int64_t end) {
      std::vector<double> scratch(3 * c);
      for (int64_t row = begin; row < end; ++row) {
        rows.row(row / c, row % c, scratch.data(), scratch.data() + c, scratch.data() + 2 * c);
        double sum = 0.0;
        for (int64_t j = 0; j < c; ++j) sum += scratch[2 * c + j] * scratch[2 * c + j];
        partial[row] = sum;
      }
    });
  });
  return at::scalar_tensor(ordered_sum(partial) / static_cast<double>(n * c),
                           student.options().dtype(correlation::acc_dtype(student)));
}

std::tuple<Tensor, Tensor> channel_correlation_loss_backward_cpu(
    const Tensor& grad_loss, const Tensor& student, const Tensor& teacher,
    c10::string_view norm_name, bool student_requires_grad, bool teacher_requires_grad) {
  check_cpu(student, "student");
  correlation::check_pair(student, teacher, /*same_channels=*/true, /*same_spatial=*/false);
  const Norm norm = correlation::parse_norm(norm_name);
  const double g = correlation::scalar_of("grad_loss", grad_loss);
  const Tensor none = at::empty({0}, student.options());
  if (!student_requires_grad && !teacher_requires_grad) return {none, none};
  IeeeOneDnnGuard guard;
  const Tensor xs = contiguous_features(student), xt = contiguous_features(teacher);
  const int64_t n = xs.size(0), c = xs.size(1);
  const LossGrams grams = loss_grams(xs, xt);
  // Rows of ∂loss/∂G_s and ∂loss/∂G_t, then symmetrised into the weights of X.
  Tensor half_s = at::empty({n, c, c}, xs.options()), half_t = at::empty({n, c, c}, xs.options());
  const double scale = 2.0 * g / static_cast<double>(n * c);  // ∂loss/∂R_s = scale · (R_s − R_t)
  AT_DISPATCH_FLOATING_TYPES(xs.scalar_type(), "channel_correlation_loss_backward_cpu", [&] {
    const GramRows<scalar_t> rows{grams.base.const_data_ptr<scalar_t>(),
                                  grams.other.const_data_ptr<scalar_t>(), grams.base_is_teacher.data(),
                                  c, xs.size(2) == xt.size(2), norm,
                                  static_cast<double>(xs.size(2)), static_cast<double>(xt.size(2))};
    scalar_t* out_s = half_s.data_ptr<scalar_t>();
    scalar_t* out_t = half_t.data_ptr<scalar_t>();
    at::parallel_for(0, n * c, 8, [&](int64_t begin, int64_t end) {
      std::vector<double> scratch(3 * c);
      double* gs_row = scratch.data();
      double* gt_row = gs_row + c;
      double* diff = gt_row + c;
      for (int64_t row = begin; row < end; ++row) {
        const auto [rs, rt] = rows.row(row / c, row % c, gs_row, gt_row, diff);
        // Through each normalisation: "row": (Y − R ⟨R, Y⟩) / r' (no projection where clamped).
        auto write = [&](scalar_t* out, const double* g_row, double r, double sign, double length) {
          if (norm == Norm::kNone) {
            for (int64_t j = 0; j < c; ++j) out[j] = static_cast<scalar_t>(sign * scale * diff[j]);
            return;
          }
          if (norm == Norm::kL) {
            for (int64_t j = 0; j < c; ++j) out[j] = static_cast<scalar_t>(sign * scale * diff[j] / length);
            return;
          }
          const double r_c = std::max(r, kNormEps);
          double radial = 0.0;
          if (r > kNormEps) {
            for (int64_t j = 0; j < c; ++j) radial += g_row[j] * diff[j];
            radial /= r_c * r_c;
          }
          for (int64_t j = 0; j < c; ++j) {
            out[j] = static_cast<scalar_t>(sign * scale * (diff[j] - g_row[j] * radial) / r_c);
          }
        };
        if (student_requires_grad) write(out_s + row * c, gs_row, rs, 1.0, rows.length_s);
        if (teacher_requires_grad) write(out_t + row * c, gt_row, rt, -1.0, rows.length_t);
      }
    });
  });
  auto input_grad = [&](const Tensor& x, const Tensor& features_x, const Tensor& half) {
    ContiguousGradOut out(x);
    const Tensor weights = half + half.transpose(1, 2);
    const Tensor grad = at::bmm(weights, features_x);
    out.written.view({n, c, features_x.size(2)}).copy_(grad);
    return out.finish();
  };
  return {student_requires_grad ? input_grad(student, xs, half_s) : none,
          teacher_requires_grad ? input_grad(teacher, xt, half_t) : none};
}

// ---------------------------------------------------------------------------------------------
// pairwise_affinity_loss

// Per-pixel channel norms of x (N, C, L) contiguous, float64 (N, L); tiles of kPixelTile pixels.
template <typename scalar_t>
void pixel_norms_kernel(const scalar_t* x, int64_t n, int64_t c, int64_t l, double* norms) {
  const int64_t tiles = (l + kPixelTile - 1) / kPixelTile;
  at::parallel_for(0, n * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t image = item / tiles, first = (item % tiles) * kPixelTile;
      const int64_t count = std::min(kPixelTile, l - first);
      double* out = norms + image * l + first;
      for (int64_t k = 0; k < count; ++k) out[k] = 0.0;
      for (int64_t ch = 0; ch < c; ++ch) {
        const scalar_t* row = x + (image * c + ch) * l + first;
        for (int64_t k = 0; k < count; ++k) {
          const double v = row[k];
          out[k] += v * v;
        }
      }
      for (int64_t k = 0; k < count; ++k) out[k] = std::sqrt(out[k]);
    }
  });
}

// operands (N, 2C, L): rows [0, C) D̂ = X̂_s − X̂_t, rows [C, 2C) Σ̂ = X̂_s + X̂_t, formed in float64
// and rounded once; C = max(C_s, C_t), the narrower input read as zero beyond its channels.
// Compiled without FMA contraction: fused, a·inv_s − b·inv_t rounds one product and not the other,
// and equal inputs would give a D̂ of ~1e-17 instead of exactly 0 (a loss of 1e-34, not 0).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
template <typename scalar_t>
void pairwise_operands_kernel(const scalar_t* xs, int64_t cs, const scalar_t* xt, int64_t ct,
                              const double* norms, int64_t n, int64_t l, scalar_t* operands) {
  const int64_t c = std::max(cs, ct);
  const int64_t tiles = (l + kPixelTile - 1) / kPixelTile;
  at::parallel_for(0, n * tiles, 1, [&](int64_t begin, int64_t end) {
    double inv_s[kPixelTile], inv_t[kPixelTile];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t image = item / tiles, first = (item % tiles) * kPixelTile;
      const int64_t count = std::min(kPixelTile, l - first);
      const double* rs = norms + image * 2 * l + first;
      const double* rt = rs + l;
      for (int64_t k = 0; k < count; ++k) {
        inv_s[k] = 1.0 / std::max(rs[k], kNormEps);
        inv_t[k] = 1.0 / std::max(rt[k], kNormEps);
      }
      for (int64_t ch = 0; ch < c; ++ch) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
        scalar_t* difference = operands + (image * 2 * c + ch) * l + first;
        scalar_t* sum = difference + c * l;
        const scalar_t* a = ch < cs ? xs + (image * cs + ch) * l + first : nullptr;
        const scalar_t* b = ch < ct ? xt + (image * ct + ch) * l + first : nullptr;
        for (int64_t k = 0; k < count; ++k) {
          const double hs = a ? static_cast<double>(a[k]) * inv_s[k] : 0.0;
          const double ht = b ? static_cast<double>(b[k]) * inv_t[k] : 0.0;
          difference[k] = static_cast<scalar_t>(hs - ht);
          sum[k] = static_cast<scalar_t>(hs + ht);
        }
      }
    }
  });
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

struct PairwiseState {
  Tensor xs, xt;      // contiguous (N, C, L), accumulation dtype
  Tensor operands;    // (N, 2C, L): [D̂; Σ̂]
  int64_t n, cs, ct, c, l;
  bool pixel_side;    // the L × L form (L ≤ C)
  Tensor difference() const { return operands.narrow(1, 0, c); }
  Tensor sum() const { return operands.narrow(1, c, c); }
};

PairwiseState pairwise_state(const Tensor& student, const Tensor& teacher, const Tensor& norms) {
  PairwiseState st;
  st.xs = contiguous_features(student);
  st.xt = contiguous_features(teacher);
  st.n = st.xs.size(0);
  st.cs = st.xs.size(1);
  st.ct = st.xt.size(1);
  st.c = std::max(st.cs, st.ct);
  st.l = st.xs.size(2);
  st.pixel_side = correlation::pairwise_uses_pixel_side(st.c, st.l);
  st.operands = at::empty({st.n, 2 * st.c, st.l}, st.xs.options());
  AT_DISPATCH_FLOATING_TYPES(st.xs.scalar_type(), "pairwise_operands", [&] {
    pairwise_operands_kernel<scalar_t>(st.xs.const_data_ptr<scalar_t>(), st.cs,
                                       st.xt.const_data_ptr<scalar_t>(), st.ct,
                                       norms.const_data_ptr<double>(), st.n, st.l,
                                       st.operands.data_ptr<scalar_t>());
  });
  return st;
}

// Δ = sym(Σ̂ᵀ D̂) (N, L, L) from M = Σ̂ᵀ D̂, in place.
template <typename scalar_t>
void symmetrise(scalar_t* m, int64_t n, int64_t l) {
  at::parallel_for(0, n * l, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      scalar_t* base = m + (row / l) * l * l;
      const int64_t i = row % l;
      for (int64_t j = i + 1; j < l; ++j) {
        const scalar_t v = static_cast<scalar_t>(0.5 * (static_cast<double>(base[i * l + j]) +
                                                        static_cast<double>(base[j * l + i])));
        base[i * l + j] = v;
        base[j * l + i] = v;
      }
    }
  });
}

std::tuple<Tensor, Tensor> pairwise_affinity_loss_cpu(const Tensor& student, const Tensor& teacher,
                                                      bool /*detach_norm: backward only*/) {
  check_cpu(student, "student");
  correlation::check_pair(student, teacher, /*same_channels=*/false, /*same_spatial=*/true);
  IeeeOneDnnGuard guard;
  const Tensor xs = contiguous_features(student), xt = contiguous_features(teacher);
  const int64_t n = xs.size(0), l = xs.size(2);
  Tensor norms = at::empty({n, 2, l}, student.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(xs.scalar_type(), "pairwise_norms", [&] {
    Tensor rs = at::empty({n, l}, norms.options()), rt = at::empty({n, l}, norms.options());
    pixel_norms_kernel<scalar_t>(xs.const_data_ptr<scalar_t>(), n, xs.size(1), l, rs.data_ptr<double>());
    pixel_norms_kernel<scalar_t>(xt.const_data_ptr<scalar_t>(), n, xt.size(1), l, rt.data_ptr<double>());
    norms.select(1, 0).copy_(rs);
    norms.select(1, 1).copy_(rt);
  });
  const PairwiseState st = pairwise_state(student, teacher, norms);
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES(st.xs.scalar_type(), "pairwise_affinity_loss_cpu", [&] {
    if (st.pixel_side) {
      // ‖sym(M)‖² = Σ_{i} M_ii² + Σ_{i<j} (M_ij + M_ji)² / 2.
      const Tensor m = at::bmm(st.sum().transpose(1, 2), st.difference()).contiguous();
      const scalar_t* p = m.const_data_ptr<scalar_t>();
      std::vector<double> partial(st.n * st.l, 0.0);
      at::parallel_for(0, st.n * st.l, 16, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const scalar_t* base = p + (row / st.l) * st.l * st.l;
          const int64_t i = row % st.l;
          const double diag = base[i * st.l + i];
          double sum = diag * diag;
          for (int64_t j = i + 1; j < st.l; ++j) {
            const double v = static_cast<double>(base[i * st.l + j]) + static_cast<double>(base[j * st.l + i]);
            sum += 0.5 * v * v;
          }
          partial[row] = sum;
        }
      });
      total = ordered_sum(partial);
    } else {
      // ½ (⟨K, E⟩ + ⟨Q, Qᵀ⟩) with K = Σ̂Σ̂ᵀ, E = D̂D̂ᵀ, Q = D̂Σ̂ᵀ.
      const Tensor k = at::bmm(st.sum(), st.sum().transpose(1, 2));
      const Tensor e = at::bmm(st.difference(), st.difference().transpose(1, 2));
      const Tensor q = at::bmm(st.difference(), st.sum().transpose(1, 2));
      const scalar_t* pk = k.const_data_ptr<scalar_t>();
      const scalar_t* pe = e.const_data_ptr<scalar_t>();
      const scalar_t* pq = q.const_data_ptr<scalar_t>();
      const int64_t c = st.c;
      std::vector<double> partial(st.n * c, 0.0);
      at::parallel_for(0, st.n * c, 16, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t image = row / c, i = row % c;
          const int64_t base = image * c * c;
          double sum = 0.0;
          for (int64_t j = 0; j < c; ++j) {
            sum += static_cast<double>(pk[base + i * c + j]) * static_cast<double>(pe[base + i * c + j]) +
                   static_cast<double>(pq[base + i * c + j]) * static_cast<double>(pq[base + j * c + i]);
          }
          partial[row] = 0.5 * sum;
        }
      });
      total = ordered_sum(partial);
    }
  });
  const double scale = static_cast<double>(n) * static_cast<double>(l) * static_cast<double>(l);
  return {at::scalar_tensor(total / scale, student.options().dtype(correlation::acc_dtype(student))),
          norms};
}

// x̂ of x (N, C, L) with the saved norms, rounded to the accumulation dtype.
template <typename scalar_t>
void normalised_kernel(const scalar_t* x, const double* norms, int64_t n, int64_t c, int64_t l,
                       scalar_t* out) {
  at::parallel_for(0, n * c, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const double* r = norms + (row / c) * 2 * l;
      for (int64_t k = 0; k < l; ++k) {
        out[row * l + k] = static_cast<scalar_t>(static_cast<double>(x[row * l + k]) / std::max(r[k], kNormEps));
      }
    }
  });
}

// grad_x = (ĝ − x̂ ⟨x̂, ĝ⟩ [r > eps]) / r' per pixel, or ĝ / r' with the norm detached.
template <typename scalar_t, typename out_t>
void normalisation_backward_kernel(const scalar_t* x, const scalar_t* grad_hat, const double* norms,
                                   int64_t n, int64_t c, int64_t l, bool detach_norm, out_t* out) {
  const int64_t tiles = (l + kPixelTile - 1) / kPixelTile;
  at::parallel_for(0, n * tiles, 1, [&](int64_t begin, int64_t end) {
    double inv[kPixelTile], radial[kPixelTile];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t image = item / tiles, first = (item % tiles) * kPixelTile;
      const int64_t count = std::min(kPixelTile, l - first);
      const double* r = norms + image * 2 * l + first;
      for (int64_t k = 0; k < count; ++k) {
        inv[k] = 1.0 / std::max(r[k], kNormEps);
        radial[k] = 0.0;
      }
      if (!detach_norm) {
        for (int64_t ch = 0; ch < c; ++ch) {
          const scalar_t* xr = x + (image * c + ch) * l + first;
          const scalar_t* gr = grad_hat + (image * c + ch) * l + first;
          for (int64_t k = 0; k < count; ++k) radial[k] += static_cast<double>(xr[k]) * static_cast<double>(gr[k]);
        }
        // ⟨x̂, ĝ⟩ x̂ = ⟨x, ĝ⟩ x / r'²; none where the norm was clamped.
        for (int64_t k = 0; k < count; ++k) radial[k] = r[k] > kNormEps ? radial[k] * inv[k] * inv[k] : 0.0;
      }
      for (int64_t ch = 0; ch < c; ++ch) {
        const int64_t offset = (image * c + ch) * l + first;
        for (int64_t k = 0; k < count; ++k) {
          const double xv = x[offset + k];
          out[offset + k] = static_cast<out_t>((static_cast<double>(grad_hat[offset + k]) - xv * radial[k]) * inv[k]);
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor> pairwise_affinity_loss_backward_cpu(
    const Tensor& grad_loss, const Tensor& student, const Tensor& teacher, const Tensor& norms,
    bool detach_norm, bool student_requires_grad, bool teacher_requires_grad) {
  check_cpu(student, "student");
  correlation::check_pair(student, teacher, /*same_channels=*/false, /*same_spatial=*/true);
  correlation::check_pixel_norms(norms, student);
  const double g = correlation::scalar_of("grad_loss", grad_loss);
  const Tensor none = at::empty({0}, student.options());
  if (!student_requires_grad && !teacher_requires_grad) return {none, none};
  IeeeOneDnnGuard guard;
  const Tensor norms_c = norms.contiguous();
  const PairwiseState st = pairwise_state(student, teacher, norms_c);
  const double scale = g / (static_cast<double>(st.n) * static_cast<double>(st.l) * static_cast<double>(st.l));
  Tensor grad_hat_s, grad_hat_t;  // ∂loss/∂X̂ (N, C_in, L)
  AT_DISPATCH_FLOATING_TYPES(st.xs.scalar_type(), "pairwise_affinity_loss_backward_cpu", [&] {
    if (st.pixel_side) {
      // ∂/∂X̂_s = 4 X̂_s Δ, ∂/∂X̂_t = −4 X̂_t Δ.
      Tensor delta = at::bmm(st.sum().transpose(1, 2), st.difference()).contiguous();
      symmetrise<scalar_t>(delta.data_ptr<scalar_t>(), st.n, st.l);
      auto grad_hat = [&](const Tensor& x, int64_t channels, const double* x_norms, double sign) {
        Tensor hat = at::empty({st.n, channels, st.l}, x.options());
        normalised_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), x_norms, st.n, channels, st.l,
                                    hat.data_ptr<scalar_t>());
        return at::bmm(hat, delta).mul_(4.0 * scale * sign);
      };
      const double* pn = norms_c.const_data_ptr<double>();
      if (student_requires_grad) grad_hat_s = grad_hat(st.xs, st.cs, pn, 1.0);
      if (teacher_requires_grad) grad_hat_t = grad_hat(st.xt, st.ct, pn + st.l, -1.0);
    } else {
      // ∂/∂X̂_s = (K + Q) D̂ + (Qᵀ + E) Σ̂, ∂/∂X̂_t = −(K − Q) D̂ − (Qᵀ − E) Σ̂: the weight rows
      // [K ± Q, Qᵀ ± E] of the wanted inputs' own channels, one GEMM with [D̂; Σ̂].
      const int64_t c = st.c;
      const Tensor k = at::bmm(st.sum(), st.sum().transpose(1, 2));
      const Tensor e = at::bmm(st.difference(), st.difference().transpose(1, 2));
      const Tensor q = at::bmm(st.difference(), st.sum().transpose(1, 2));
      const int64_t rows_s = student_requires_grad ? st.cs : 0;
      const int64_t rows_t = teacher_requires_grad ? st.ct : 0;
      Tensor weights = at::empty({st.n, rows_s + rows_t, 2 * c}, st.xs.options());
      const scalar_t* pk = k.const_data_ptr<scalar_t>();
      const scalar_t* pe = e.const_data_ptr<scalar_t>();
      const scalar_t* pq = q.const_data_ptr<scalar_t>();
      scalar_t* pw = weights.data_ptr<scalar_t>();
      const int64_t rows = rows_s + rows_t;
      at::parallel_for(0, st.n * rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t image = item / rows, r = item % rows;
          const bool is_student = r < rows_s;
          const int64_t i = is_student ? r : r - rows_s;
          const double sign = is_student ? 1.0 : -1.0;
          const int64_t base = image * c * c;
          scalar_t* w = pw + item * 2 * c;
          for (int64_t j = 0; j < c; ++j) {
            const double kk = pk[base + i * c + j], ee = pe[base + i * c + j];
            const double qq = pq[base + i * c + j], qt = pq[base + j * c + i];
            w[j] = static_cast<scalar_t>(sign * scale * (kk + sign * qq));
            w[c + j] = static_cast<scalar_t>(sign * scale * (qt + sign * ee));
          }
        }
      });
      const Tensor grad_hat = at::bmm(weights, st.operands);
      if (student_requires_grad) grad_hat_s = grad_hat.narrow(1, 0, st.cs).contiguous();
      if (teacher_requires_grad) grad_hat_t = grad_hat.narrow(1, rows_s, st.ct).contiguous();
    }
  });
  auto input_grad = [&](const Tensor& x_in, const Tensor& x, int64_t channels, int64_t which,
                        const Tensor& grad_hat) {
    ContiguousGradOut out(x_in);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pairwise_normalisation_backward", [&] {
      using acc = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_in.scalar_type(), "pairwise_grad_out", [&] {
        normalisation_backward_kernel<acc, scalar_t>(
            x.const_data_ptr<acc>(), grad_hat.const_data_ptr<acc>(),
            norms_c.const_data_ptr<double>() + which * st.l, st.n, channels, st.l, detach_norm,
            out.written.data_ptr<scalar_t>());
      });
    });
    return out.finish();
  };
  return {student_requires_grad ? input_grad(student, st.xs, st.cs, 0, grad_hat_s) : none,
          teacher_requires_grad ? input_grad(teacher, st.xt, st.ct, 1, grad_hat_t) : none};
}

// ---------------------------------------------------------------------------------------------
// channel_correlation (not a hot path: the shared ATen formulation)

std::tuple<Tensor, Tensor> channel_correlation_cpu(const Tensor& x, c10::string_view norm) {
  check_cpu(x, "x");
  IeeeOneDnnGuard guard;
  return correlation::channel_correlation_forward(x, norm);
}

Tensor channel_correlation_backward_cpu(const Tensor& grad_gram, const Tensor& x, const Tensor& gram,
                                        const Tensor& row_norms, c10::string_view norm) {
  check_cpu(x, "x");
  IeeeOneDnnGuard guard;
  return correlation::channel_correlation_backward(grad_gram, x, gram, row_norms, norm);
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("channel_correlation", &kdops::cpu::channel_correlation_cpu);
  m.impl("channel_correlation_backward", &kdops::cpu::channel_correlation_backward_cpu);
  m.impl("channel_correlation_loss", &kdops::cpu::channel_correlation_loss_cpu);
  m.impl("channel_correlation_loss_backward", &kdops::cpu::channel_correlation_loss_backward_cpu);
  m.impl("pairwise_affinity_loss", &kdops::cpu::pairwise_affinity_loss_cpu);
  m.impl("pairwise_affinity_loss_backward", &kdops::cpu::pairwise_affinity_loss_backward_cpu);
}
