// The map-sized steps of kdops::attention_loss, in ATen (device-generic): csrc/cuda/attention_api.cpp
// calls them around its channel-reduction kernels (the CPU kernels do these steps in their own
// loops, csrc/cpu/attention.cpp). Torch-facing (like common/tensor_layout.h).
//
// With raw maps a = scale·Σ_c |x_c|^p of student and teacher:
//   S = resize(a, size) (bilinear, align_corners=False),  A = norm(S),
//   loss = mean over N·H'·W' of (A_s − A_t)².
// Forward returns (loss, S_s, S_t): the resized raw maps are what backward needs (A is recomputed
// from S, and the l2 norm with it), and what is saved: two tensors of the output map's size.
// Backward, with d = grad·2(A_s − A_t)/(N·H'·W'):
//   softmax: ∂/∂S = A ⊙ (d − Σ A⊙d);  l2: (d − A (A·d)) / max(‖S‖, eps);  none: d;
// then the transposed resize back to each input's (H, W), then the kernels' reduce backward.
#pragma once

#include <ATen/ATen.h>

#include <string_view>
#include <tuple>
#include <vector>

namespace kdops {

enum class MapNorm { kSoftmax, kL2, kNone };

constexpr double kMapNormEps = 1e-12;  // F.normalize's eps: a / max(‖a‖, eps)

inline MapNorm map_norm(std::string_view norm) {
  if (norm == "softmax") return MapNorm::kSoftmax;
  if (norm == "l2") return MapNorm::kL2;
  TORCH_CHECK_VALUE(norm == "none", "norm must be \"softmax\", \"l2\" or \"none\", got \"",
                    std::string(norm), "\"");
  return MapNorm::kNone;
}

// (N, H, W) → (N, H', W').
inline at::Tensor resize_map(const at::Tensor& map, at::IntArrayRef size) {
  if (map.size(1) == size[0] && map.size(2) == size[1]) return map;
  return at::upsample_bilinear2d(map.unsqueeze(1), size, /*align_corners=*/false).squeeze(1);
}

// The (out, in) matrix of resize_map along one axis: row o holds the two bilinear weights of
// output o (align_corners=False: source (o + 0.5)·in/out − 0.5, clamped at 0), in float64.
// Built by elementwise ops on the maps' device (no host copy, no scatter).
inline at::Tensor resize_matrix(int64_t in, int64_t out, const at::TensorOptions& options) {
  const at::TensorOptions f64 = options.dtype(at::kDouble);
  const at::Tensor source = ((at::arange(out, f64) + 0.5) * (static_cast<double>(in) / out) - 0.5).clamp_min(0.0);
  const at::Tensor low = source.floor().clamp_max(static_cast<double>(in - 1));
  const at::Tensor high = (low + 1).clamp_max(static_cast<double>(in - 1));
  const at::Tensor weight_high = (source - low).unsqueeze(1);
  const at::Tensor columns = at::arange(in, f64).unsqueeze(0);
  return (1.0 - weight_high) * columns.eq(low.unsqueeze(1)) + weight_high * columns.eq(high.unsqueeze(1));
}

// The transpose of resize_map: a gradient (N, H', W') back to (N, H, W), as R_hᵀ · g · R_w in
// float64. ATen's upsample_bilinear2d_backward adds with atomics on CUDA: its bits change from
// run to run, and kdops' gradients are deterministic.
inline at::Tensor resize_map_backward(const at::Tensor& grad, int64_t height, int64_t width) {
  if (grad.size(1) == height && grad.size(2) == width) return grad;
  const at::Tensor rows = resize_matrix(height, grad.size(1), grad.options());
  const at::Tensor cols = resize_matrix(width, grad.size(2), grad.options());
  return at::matmul(at::matmul(rows.t(), grad.to(at::kDouble)), cols).to(grad.scalar_type());
}

// A = norm(S) over the positions of each map; S (N, H', W').
inline at::Tensor normalize_map(const at::Tensor& s, MapNorm norm) {
  if (norm == MapNorm::kNone) return s;
  const at::Tensor flat = s.reshape({s.size(0), -1});
  if (norm == MapNorm::kSoftmax) return at::_softmax(flat, 1, false).view(s.sizes());
  return flat.div(at::linalg_vector_norm(flat, 2, {1}, true).clamp_min(kMapNormEps)).view(s.sizes());
}

// ∂loss/∂S from ∂loss/∂A = d.
inline at::Tensor normalize_map_backward(const at::Tensor& s, const at::Tensor& a,
                                         const at::Tensor& d, MapNorm norm) {
  if (norm == MapNorm::kNone) return d;
  const int64_t n = s.size(0);
  const at::Tensor a_flat = a.reshape({n, -1}), d_flat = d.reshape({n, -1});
  const at::Tensor dot = (a_flat * d_flat).sum(1, true);
  if (norm == MapNorm::kSoftmax) return (a_flat * (d_flat - dot)).view(s.sizes());
  // l2: where ‖S‖ > eps, (d − A (A·d))/‖S‖; where the clamp holds, A = S/eps and ∂ = d/eps.
  const at::Tensor length = at::linalg_vector_norm(s.reshape({n, -1}), 2, {1}, true);
  const at::Tensor above = length > kMapNormEps;
  const at::Tensor grad = at::where(above, d_flat - a_flat * dot, d_flat) / length.clamp_min(kMapNormEps);
  return grad.view(s.sizes());
}

// size: (H', W') or empty (the student's (H, W)).
inline std::vector<int64_t> loss_size(const at::Tensor& student, at::OptionalIntArrayRef size) {
  if (size.has_value()) {
    TORCH_CHECK_VALUE(size->size() == 2 && (*size)[0] >= 1 && (*size)[1] >= 1,
                      "size must be two positive ints (H', W'), got ", *size);
    return {(*size)[0], (*size)[1]};
  }
  return {student.size(-2), student.size(-1)};
}

// Forward: (loss, S_s, S_t) from the raw maps.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_loss_from_maps(
    const at::Tensor& student_map, const at::Tensor& teacher_map, MapNorm norm,
    at::IntArrayRef size) {
  const at::Tensor s = resize_map(student_map, size);
  const at::Tensor t = resize_map(teacher_map, size);
  const at::Tensor loss = (normalize_map(s, norm) - normalize_map(t, norm)).square().mean();
  return {loss, s, t};
}

// Backward: (∂loss/∂a_s (N, H_s, W_s), ∂loss/∂a_t (N, H_t, W_t)); either undefined when not wanted.
inline std::tuple<at::Tensor, at::Tensor> attention_loss_map_grads(
    const at::Tensor& grad_loss, const at::Tensor& s, const at::Tensor& t, MapNorm norm,
    at::IntArrayRef student_hw, at::IntArrayRef teacher_hw, bool want_student, bool want_teacher) {
  const at::Tensor a_s = normalize_map(s, norm), a_t = normalize_map(t, norm);
  const at::Tensor d = (a_s - a_t).mul(grad_loss.to(s.scalar_type()) * (2.0 / static_cast<double>(s.numel())));
  at::Tensor grad_s, grad_t;
  if (want_student) {
    grad_s = resize_map_backward(normalize_map_backward(s, a_s, d, norm), student_hw[0], student_hw[1]);
  }
  if (want_teacher) {
    grad_t = resize_map_backward(normalize_map_backward(t, a_t, d.neg(), norm), teacher_hw[0],
                                 teacher_hw[1]);
  }
  return {grad_s, grad_t};
}

}  // namespace kdops
