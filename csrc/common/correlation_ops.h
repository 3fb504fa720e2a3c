// The channel-correlation family (channel_correlation, channel_correlation_loss,
// pairwise_affinity_loss), forward and backward, written once with ATen ops for any device:
// the GEMMs are at::bmm in float32 (float64 for float64 inputs), everything of size C×C or
// smaller around them is evaluated in float64. The CPU kernels (csrc/cpu/correlation.cpp) run it
// under an IEEE-matmul guard; the CUDA ones (csrc/cuda/correlation_api.cpp) under a TF32-off guard
// with their own kernels for the per-pixel work. Specification: kdops/reference/correlation.py.
//
// X is an input as (N, C, L). Numerics — why the formulas below are not the textbook ones:
//
// * channel_correlation_loss. With equal L the difference of the Grams is formed as one product,
//   ΔG = G_s − G_t = sym(Σ Dᵀ) with Σ = X_s + X_t, D = X_s − X_t, sym(M) = (M + Mᵀ)/2 (exact
//   algebra: Σ Dᵀ = X_sX_sᵀ − X_tX_tᵀ + X_tX_sᵀ − X_sX_tᵀ and the last two cancel in sym), so
//   when the teacher is close to the student ΔG carries float32 rounding relative to |D|, not to
//   |G|: subtracting two float32 Grams would leave 1e-7·|G| of noise in a 1e-3·|G| difference.
//   The row normalisation is differenced the same way: R_s − R_t = ΔG/r_s + G_t (r_s − r_t)/(r_s r_t)
//   with r_s − r_t = ⟨ΔG, G_s + G_t⟩/(r_s + r_t) per row.
// * pairwise_affinity_loss. The identity of DESIGN.md, Σ(A_s − A_t)² = ‖S‖² − 2‖M‖² + ‖T‖², leaves
//   the float32 rounding of S, M, T (relative to L²/C) in a result that is δ² times smaller. Instead,
//   with x̂ the per-pixel normalised features (zero channels appended to the narrower of the two, which
//   changes no affinity), Σ̂ = X̂_s + X̂_t and D̂ = X̂_s − X̂_t (both formed in float64, then rounded):
//   A_s − A_t = sym(Σ̂ᵀ D̂), and with K = Σ̂Σ̂ᵀ, E = D̂D̂ᵀ, Q = D̂Σ̂ᵀ (C × C)
//       Σ (A_s − A_t)² = ½ (⟨K, E⟩ + ⟨Q, Qᵀ⟩),
//   two terms of the size of the result. The gradients are
//       ∂/∂X̂_s = 4 X̂_s Δ = (K + Q) D̂ + (Qᵀ + E) Σ̂,   ∂/∂X̂_t = −4 X̂_t Δ = −(K − Q) D̂ − (Qᵀ − E) Σ̂.
//   When L ≤ C the L × L matrix Δ = sym(Σ̂ᵀD̂) is no larger than the C × C ones and costs a third of
//   their GEMM work (one product of L·L·C instead of three of C·C·L), so it is used instead.
//
// Memory: the forward ops return (and autograd saves) only their inputs, the per-pixel norms
// (pairwise_affinity_loss) and, for channel_correlation, its output and row norms; the backward ops
// recompute the Grams (a C × C matrix per image is as large as the input when C = L).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>

namespace kdops {
namespace correlation {

using at::Tensor;

// The eps of F.normalize: x / max(‖x‖, kNormEps).
constexpr double kNormEps = 1e-12;

enum class Norm { kRow, kL, kNone };

inline Norm parse_norm(c10::string_view norm) {
  if (norm == "row") return Norm::kRow;
  if (norm == "l") return Norm::kL;
  TORCH_CHECK_VALUE(norm == "none", "norm must be one of ('row', 'l', 'none'), got '",
                    std::string(norm), "'");
  return Norm::kNone;
}

inline at::ScalarType acc_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_features(const char* name, const Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 3, name, " must have shape (N, C, *spatial), got ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                       dtype == at::kDouble,
                   name, " must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK_VALUE(x.numel() > 0, name, " must not be empty, got shape ", x.sizes());
}

// same_channels: channel_correlation_loss; same_spatial: pairwise_affinity_loss.
inline void check_pair(const Tensor& student, const Tensor& teacher, bool same_channels,
                       bool same_spatial) {
  check_features("student", student);
  check_features("teacher", teacher);
  TORCH_CHECK_TYPE(teacher.scalar_type() == student.scalar_type(),
                   "teacher must have the dtype of student (", student.scalar_type(), "), got ",
                   teacher.scalar_type());
  TORCH_CHECK_VALUE(teacher.device() == student.device(),
                    "teacher must be on the device of student (", student.device(), "), got ",
                    teacher.device());
  TORCH_CHECK_VALUE(teacher.size(0) == student.size(0), "teacher must have the batch size of student (",
                    student.size(0), "), got shape ", teacher.sizes());
  if (same_channels) {
    TORCH_CHECK_VALUE(teacher.size(1) == student.size(1), "teacher must have the channels of student (",
                      student.size(1), "), got shape ", teacher.sizes());
  }
  if (same_spatial) {
    TORCH_CHECK_VALUE(teacher.sizes().slice(2) == student.sizes().slice(2),
                      "teacher must have the spatial shape of student (", student.sizes().slice(2),
                      "), got shape ", teacher.sizes());
  }
}

inline int64_t spatial_size(const Tensor& x) { return x.numel() / (x.size(0) * x.size(1)); }

// x as (N, C, L) in the accumulation dtype (a view when x is float32/64 and its dims merge).
inline Tensor features(const Tensor& x) {
  return x.reshape({x.size(0), x.size(1), spatial_size(x)}).to(acc_dtype(x));
}

inline Tensor transposed(const Tensor& x) { return x.transpose(1, 2); }

// A gradient computed as (N, C, L) in the layout the fake kernels promise (empty_like of x) and
// x's dtype.
inline Tensor as_input_grad(const Tensor& grad, const Tensor& x) {
  Tensor out = at::empty_like(x);
  if (out.is_contiguous()) return grad.reshape(x.sizes()).to(x.scalar_type()).contiguous();
  return out.copy_(grad.reshape(x.sizes()));
}

inline Tensor symmetric_part(const Tensor& m) { return (m + transposed(m)).mul_(0.5); }

// Σ over all elements of a ⊙ b, a 0-dim float64 tensor (a, b of one shape; no host sync).
inline Tensor frobenius_dot(const Tensor& a, const Tensor& b) {
  return at::sum(a.to(at::kDouble) * b.to(at::kDouble));
}

// The L2 norm of each row of g (N, C, C) → (N, C, 1), float64.
inline Tensor row_norms(const Tensor& g) {
  return at::linalg_vector_norm(g.to(at::kDouble), 2, {2}, /*keepdim=*/true);
}

// The gradient through out = rows of g / max(‖row‖, eps) ("row"), g / length ("l") or g ("none"):
// grad_out, g (N, C, C) float64, norms (N, C, 1) float64 unclamped.
inline Tensor norm_backward(const Tensor& grad_out, const Tensor& g, const Tensor& norms, Norm norm,
                            int64_t length) {
  if (norm == Norm::kNone) return grad_out;
  if (norm == Norm::kL) return grad_out / static_cast<double>(length);
  const Tensor clamped = norms.clamp_min(kNormEps);
  const Tensor rows = g / clamped;
  // Rows whose norm was clamped divide by the constant eps: no projection.
  const Tensor radial = (rows * grad_out).sum(2, /*keepdim=*/true) * (norms > kNormEps);
  return (grad_out - rows * radial) / clamped;
}

// ---------------------------------------------------------------------------------------------
// channel_correlation

// (gram (N, C, C) normalised per `norm`, row_norms (N, C) of the raw Gram), accumulation dtype.
inline std::tuple<Tensor, Tensor> channel_correlation_forward(const Tensor& x, c10::string_view norm_name) {
  check_features("x", x);
  const Norm norm = parse_norm(norm_name);
  const Tensor features_x = features(x);
  const Tensor gram = at::bmm(features_x, transposed(features_x));
  const Tensor norms = row_norms(gram);
  Tensor out;
  switch (norm) {
    case Norm::kRow: out = (gram.to(at::kDouble) / norms.clamp_min(kNormEps)).to(gram.scalar_type()); break;
    case Norm::kL: out = gram / static_cast<double>(features_x.size(2)); break;
    case Norm::kNone: out = gram; break;
  }
  return {out, norms.squeeze(2).to(gram.scalar_type())};
}

inline Tensor channel_correlation_backward(const Tensor& grad_gram, const Tensor& x,
                                           const Tensor& gram, const Tensor& norms,
                                           c10::string_view norm_name) {
  check_features("x", x);
  const Norm norm = parse_norm(norm_name);
  const int64_t n = x.size(0), c = x.size(1);
  TORCH_CHECK_VALUE(grad_gram.dim() == 3 && grad_gram.size(0) == n && grad_gram.size(1) == c &&
                        grad_gram.size(2) == c,
                    "grad_gram must have shape (N, C, C) = (", n, ", ", c, ", ", c, "), got ",
                    grad_gram.sizes());
  TORCH_CHECK_VALUE(gram.sizes() == grad_gram.sizes(), "gram must have shape (", n, ", ", c, ", ", c,
                    "), got ", gram.sizes());
  TORCH_CHECK_VALUE(norms.dim() == 2 && norms.size(0) == n && norms.size(1) == c,
                    "row_norms must have shape (N, C) = (", n, ", ", c, "), got ", norms.sizes());
  const Tensor features_x = features(x);
  const Tensor norms64 = norms.to(at::kDouble).unsqueeze(2);
  // For "row", gram is the normalised output R = G / r': the raw rows are R · r'.
  const Tensor raw = norm == Norm::kRow ? gram.to(at::kDouble) * norms64.clamp_min(kNormEps)
                                        : gram.to(at::kDouble);
  const Tensor grad_raw = norm_backward(grad_gram.to(at::kDouble), raw, norms64, norm,
                                        features_x.size(2));
  const Tensor weights = (grad_raw + transposed(grad_raw)).to(features_x.scalar_type());
  return as_input_grad(at::bmm(weights, features_x), x);
}

// ---------------------------------------------------------------------------------------------
// channel_correlation_loss

struct GramDifference {
  Tensor student_gram;  // G_s, float64 (N, C, C)
  Tensor teacher_gram;  // G_t
  Tensor student_norms, teacher_norms;  // row norms of G_s, G_t (N, C, 1), unclamped
  Tensor difference;    // R_s − R_t, the normalised Grams' difference, float64
};

inline GramDifference gram_difference(const Tensor& student, const Tensor& teacher, Norm norm) {
  const Tensor xs = features(student), xt = features(teacher);
  const int64_t ls = xs.size(2), lt = xt.size(2);
  GramDifference out;
  Tensor raw_difference;  // G_s − G_t
  if (ls == lt) {
    raw_difference = symmetric_part(at::bmm(xs + xt, transposed(xs - xt))).to(at::kDouble);
    // Per image, the Gram of the side with the smaller ‖X‖_F is formed directly and the other
    // is it ± ΔG: no cancellation whether the two are close or far apart (a teacher 1000×
    // smaller than the student lost every digit of G_t = G_s − ΔG). Chosen on the device.
    const Tensor teacher_smaller = (at::linalg_vector_norm(xt, 2, {1, 2}, false, at::kDouble) <
                                    at::linalg_vector_norm(xs, 2, {1, 2}, false, at::kDouble))
                                       .view({-1, 1, 1});
    const Tensor x_small = at::where(teacher_smaller, xt, xs);
    const Tensor g_small = at::bmm(x_small, transposed(x_small)).to(at::kDouble);
    out.student_gram = at::where(teacher_smaller, g_small + raw_difference, g_small);
    out.teacher_gram = at::where(teacher_smaller, g_small, g_small - raw_difference);
  } else {
    out.student_gram = at::bmm(xs, transposed(xs)).to(at::kDouble);
    out.teacher_gram = at::bmm(xt, transposed(xt)).to(at::kDouble);
    raw_difference = out.student_gram - out.teacher_gram;
  }
  switch (norm) {
    case Norm::kNone:
      out.difference = raw_difference;
      break;
    case Norm::kL:
      out.difference = ls == lt ? raw_difference / static_cast<double>(ls)
                                : out.student_gram / static_cast<double>(ls) -
                                      out.teacher_gram / static_cast<double>(lt);
      break;
    case Norm::kRow: {
      const Tensor rs = row_norms(out.student_gram), rt = row_norms(out.teacher_gram);
      out.student_norms = rs;
      out.teacher_norms = rt;
      const Tensor rs_c = rs.clamp_min(kNormEps), rt_c = rt.clamp_min(kNormEps);
      // r_s − r_t without cancelling: ⟨ΔG, G_s + G_t⟩ / (r_s + r_t). A row whose norm is clamped
      // is differenced directly (dividing ΔG by eps would blow its rounding up by 1e12).
      const Tensor unclamped = (rs > kNormEps).logical_and(rt > kNormEps);
      const Tensor norm_gap = (raw_difference * (out.student_gram + out.teacher_gram)).sum(2, true) /
                              (rs + rt).clamp_min(kNormEps);
      out.difference = at::where(
          unclamped, raw_difference / rs_c - out.teacher_gram * (norm_gap / (rs_c * rt_c)),
          out.student_gram / rs_c - out.teacher_gram / rt_c);
      break;
    }
  }
  if (norm != Norm::kRow) {
    out.student_norms = row_norms(out.student_gram);
    out.teacher_norms = row_norms(out.teacher_gram);
  }
  return out;
}

// Σ (R_s − R_t)² / (N·C), a 0-dim tensor in the accumulation dtype.
inline Tensor channel_correlation_loss_forward(const Tensor& student, const Tensor& teacher,
                                               c10::string_view norm_name) {
  check_pair(student, teacher, /*same_channels=*/true, /*same_spatial=*/false);
  const Norm norm = parse_norm(norm_name);
  const GramDifference d = gram_difference(student, teacher, norm);
  const double rows = static_cast<double>(student.size(0) * student.size(1));
  return (d.difference.square().sum() / rows).to(acc_dtype(student));
}

inline void check_scalar(const char* name, const Tensor& x) {
  TORCH_CHECK_VALUE(x.numel() == 1, name, " must hold one element, got shape ", x.sizes());
}

// The value of a one-element tensor on the host (CPU kernels: no device to wait for).
inline double scalar_of(const char* name, const Tensor& x) {
  check_scalar(name, x);
  return x.item<double>();
}

// A one-element tensor as a 0-dim float64 tensor on its device (GPU paths: read there).
inline Tensor device_scalar(const char* name, const Tensor& x) {
  check_scalar(name, x);
  return x.reshape({}).to(at::kDouble);
}

inline std::tuple<Tensor, Tensor> channel_correlation_loss_backward(
    const Tensor& grad_loss, const Tensor& student, const Tensor& teacher,
    c10::string_view norm_name, bool student_requires_grad, bool teacher_requires_grad) {
  check_pair(student, teacher, /*same_channels=*/true, /*same_spatial=*/false);
  const Norm norm = parse_norm(norm_name);
  const Tensor g = device_scalar("grad_loss", grad_loss);
  const Tensor none = at::empty({0}, student.options());
  if (!student_requires_grad && !teacher_requires_grad) return {none, none};
  const GramDifference d = gram_difference(student, teacher, norm);
  const double rows = static_cast<double>(student.size(0) * student.size(1));
  const Tensor grad_normalised = d.difference * (g * (2.0 / rows));  // ∂loss/∂R_s = −∂loss/∂R_t
  auto input_grad = [&](const Tensor& x, const Tensor& gram, const Tensor& norms, double sign) {
    const Tensor features_x = features(x);
    const Tensor grad_gram =
        norm_backward(grad_normalised * sign, gram, norms, norm, features_x.size(2));
    const Tensor weights = (grad_gram + transposed(grad_gram)).to(features_x.scalar_type());
    return as_input_grad(at::bmm(weights, features_x), x);
  };
  return {student_requires_grad ? input_grad(student, d.student_gram, d.student_norms, 1.0) : none,
          teacher_requires_grad ? input_grad(teacher, d.teacher_gram, d.teacher_norms, -1.0) : none};
}

// ---------------------------------------------------------------------------------------------
// pairwise_affinity_loss

// The per-pixel work of pairwise_affinity_loss, written with ATen ops (any device). A backend
// with its own kernels for it passes another struct with the same three functions.
struct AtenPixelKernels {
  // The per-pixel channel norms of x (N, C, L) → (N, L) in float64. They stay float64 (2·N·L
  // values, saved for backward): rounded to float32, each pixel's x̂ would be off by a relative
  // 6e-8, which is 1e-4 of a 1e-3 student–teacher difference.
  static Tensor pixel_norms(const Tensor& x) {
    return at::linalg_vector_norm(x, 2, {1}, /*keepdim=*/false, at::kDouble);
  }

  // [D̂; Σ̂] (N, 2C, L) in x's (accumulation) dtype, C = max(C_s, C_t): D̂ = X̂_s − X̂_t and
  // Σ̂ = X̂_s + X̂_t formed in float64 and rounded once; the narrower input gets zero channels
  // (its affinities and norms are unchanged). norms (N, 2, L) float64.
  static Tensor operands(const Tensor& xs, const Tensor& xt, const Tensor& norms) {
    const int64_t c = std::max(xs.size(1), xt.size(1));
    auto padded_hat = [&](const Tensor& x, int64_t which) {
      const Tensor hat = x.to(at::kDouble) /
                         norms.select(1, which).clamp_min(kNormEps).unsqueeze(1);
      return x.size(1) == c ? hat : at::constant_pad_nd(hat, {0, 0, 0, c - x.size(1)});
    };
    const Tensor hs = padded_hat(xs, 0), ht = padded_hat(xt, 1);
    return at::cat({hs - ht, hs + ht}, 1).to(xs.scalar_type());
  }

  // ∂loss/∂x from ∂loss/∂x̂ (N, C, L): (ĝ − x̂ ⟨x̂, ĝ⟩ [r > eps]) / r', or ĝ / r' with the norm
  // detached; in the layout of empty_like(x_in) and x_in's dtype.
  static Tensor input_grad(const Tensor& x_in, const Tensor& x, const Tensor& norms, int64_t which,
                           const Tensor& grad_hat, bool detach_norm) {
    const Tensor r = norms.select(1, which).unsqueeze(1);
    const Tensor r_clamped = r.clamp_min(kNormEps);
    Tensor grad = grad_hat.to(at::kDouble);
    if (!detach_norm) {
      const Tensor hat = x.to(at::kDouble) / r_clamped;
      const Tensor radial = (hat * grad).sum(1, /*keepdim=*/true) * (r > kNormEps);
      grad = grad - hat * radial;
    }
    return as_input_grad(grad / r_clamped, x_in);
  }
};

// The L × L form is used when L ≤ C (see the header comment).
inline bool pairwise_uses_pixel_side(int64_t channels, int64_t length) { return length <= channels; }

inline void check_pixel_norms(const Tensor& norms, const Tensor& student) {
  const int64_t n = student.size(0), l = spatial_size(student);
  TORCH_CHECK_VALUE(norms.dim() == 3 && norms.size(0) == n && norms.size(1) == 2 && norms.size(2) == l,
                    "norms must have shape (N, 2, L) = (", n, ", 2, ", l, "), got ", norms.sizes());
  TORCH_CHECK_TYPE(norms.scalar_type() == at::kDouble, "norms must be float64, got ",
                   norms.scalar_type());
}

// (loss: Σ (A_s − A_t)² / (N·L²), 0-dim in the accumulation dtype; norms (N, 2, L): the per-pixel
// norms of student and teacher, float64). No host synchronisation.
template <typename Kernels = AtenPixelKernels>
std::tuple<Tensor, Tensor> pairwise_affinity_loss_forward(const Tensor& student, const Tensor& teacher) {
  check_pair(student, teacher, /*same_channels=*/false, /*same_spatial=*/true);
  const Tensor xs = features(student), xt = features(teacher);
  const int64_t n = xs.size(0), l = xs.size(2), c = std::max(xs.size(1), xt.size(1));
  const Tensor norms = at::stack({Kernels::pixel_norms(xs), Kernels::pixel_norms(xt)}, 1);
  const Tensor operands = Kernels::operands(xs, xt, norms);
  const Tensor difference = operands.narrow(1, 0, c), sum = operands.narrow(1, c, c);
  Tensor total;
  if (pairwise_uses_pixel_side(c, l)) {
    const Tensor delta = symmetric_part(at::bmm(transposed(sum), difference));
    total = frobenius_dot(delta, delta);
  } else {
    const Tensor k = at::bmm(sum, transposed(sum));
    const Tensor e = at::bmm(difference, transposed(difference));
    const Tensor q = at::bmm(difference, transposed(sum));
    total = 0.5 * (frobenius_dot(k, e) + frobenius_dot(q, transposed(q)));
  }
  const double scale = static_cast<double>(n) * static_cast<double>(l) * static_cast<double>(l);
  return {(total / scale).to(acc_dtype(student)), norms};
}

template <typename Kernels = AtenPixelKernels>
std::tuple<Tensor, Tensor> pairwise_affinity_loss_backward(
    const Tensor& grad_loss, const Tensor& student, const Tensor& teacher, const Tensor& norms_in,
    bool detach_norm, bool student_requires_grad, bool teacher_requires_grad) {
  check_pair(student, teacher, /*same_channels=*/false, /*same_spatial=*/true);
  check_pixel_norms(norms_in, student);
  const Tensor g = device_scalar("grad_loss", grad_loss);
  const Tensor none = at::empty({0}, student.options());
  if (!student_requires_grad && !teacher_requires_grad) return {none, none};

  const Tensor xs = features(student), xt = features(teacher);
  const Tensor norms = norms_in.contiguous();
  const int64_t n = xs.size(0), cs = xs.size(1), ct = xt.size(1), l = xs.size(2);
  const int64_t c = std::max(cs, ct);
  const Tensor operands = Kernels::operands(xs, xt, norms);
  const Tensor difference = operands.narrow(1, 0, c), sum = operands.narrow(1, c, c);
  // ∂loss/∂x = grad_loss · c_scale · (…), c_scale = 1/(N·L²).
  const Tensor scale = (g / (static_cast<double>(n) * static_cast<double>(l) * static_cast<double>(l)))
                           .to(xs.scalar_type());

  Tensor grad_hat_s, grad_hat_t;
  if (pairwise_uses_pixel_side(c, l)) {
    // ∂/∂X̂_s = 4 X̂_s Δ, ∂/∂X̂_t = −4 X̂_t Δ; X̂ = (Σ̂ ± D̂)/2, the own channels only.
    const Tensor delta = symmetric_part(at::bmm(transposed(sum), difference));
    if (student_requires_grad) {
      grad_hat_s = at::bmm((sum + difference).narrow(1, 0, cs), delta).mul_(scale * 2.0);
    }
    if (teacher_requires_grad) {
      grad_hat_t = at::bmm((sum - difference).narrow(1, 0, ct), delta).mul_(scale * -2.0);
    }
  } else {
    const Tensor k = at::bmm(sum, transposed(sum));
    const Tensor e = at::bmm(difference, transposed(difference));
    const Tensor q = at::bmm(difference, transposed(sum));
    const Tensor qt = transposed(q);
    auto grad_hat = [&](const Tensor& on_difference, const Tensor& on_sum, int64_t channels,
                        double sign) {
      // Only the input's own rows: the zero channels appended to it get no gradient.
      const Tensor weights = at::cat({on_difference, on_sum}, 2).narrow(1, 0, channels);
      return at::bmm(weights, operands).mul_(scale * sign);
    };
    if (student_requires_grad) grad_hat_s = grad_hat(k + q, qt + e, cs, 1.0);
    if (teacher_requires_grad) grad_hat_t = grad_hat(k - q, qt - e, ct, -1.0);
  }
  return {student_requires_grad ? Kernels::input_grad(student, xs, norms, 0, grad_hat_s, detach_norm) : none,
          teacher_requires_grad ? Kernels::input_grad(teacher, xt, norms, 1, grad_hat_t, detach_norm) : none};
}

}  // namespace correlation
}  // namespace kdops
