// CPU kernels of kdops::pixel_kl (forward and backward ops) and their registration for the
// CPU dispatch key. Math: csrc/common/softmax_kl.h; specification: kdops/reference/softmax_kl.py.
// Pixel tiles, views and checks: csrc/cpu/softmax_kl_common.h.

#include "cpu/softmax_kl_common.h"

namespace kdops {
namespace cpu {
namespace {

using at::Tensor;

template <typename scalar_t>
void pixel_kl_forward_kernel(const PixelView& v, double tau, Tensor& loss, Tensor& num_valid) {
  using acc = acc_t<scalar_t>;
  using V = at::vec::Vectorized<acc>;
  constexpr int64_t W = V::size();
  const PairView& p = v.pair;
  const scalar_t* s = p.s.const_data_ptr<scalar_t>();
  const scalar_t* t = p.t.const_data_ptr<scalar_t>();
  const acc inv_tau = static_cast<acc>(1.0 / tau);
  const int64_t tiles = (p.l + W - 1) / W;

  std::vector<acc> tile_kl(p.n * tiles);
  std::vector<int64_t> tile_valid(p.n * tiles);
  at::parallel_for(0, p.n * tiles, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc> gathered(2 * p.c * W);
    acc valid[W];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / tiles, l0 = (item % tiles) * W, count = std::min(W, p.l - l0);
      tile_valid[item] = v.valid_lanes(n, l0, count, valid);
      tile_kl[item] = acc(0);
      if (tile_valid[item] == 0) continue;
      const TileReader<scalar_t> xs(s + n * p.ss.n + l0 * p.ss.l, p.ss, p.c, count,
                                    gathered.data());
      const TileReader<scalar_t> xt(t + n * p.ts.n + l0 * p.ts.l, p.ts, p.c, count,
                                    gathered.data() + p.c * W);
      const V kl = kl_of(tile_state(xs, xt, p.c, V(inv_tau), nullptr, nullptr));
      // Blend, not multiply: an ignored pixel's KL may be anything, even inf or NaN.
      const V counted = V::blendv(V(acc(0)), kl, V::loadu(valid) != V(acc(0)));
      tile_kl[item] = at::vec::vec_reduce_all<acc>([](const V& a, const V& b) { return a + b; },
                                                   counted);
    }
  });
  double total = 0.0;
  int64_t count = 0;
  for (int64_t item = 0; item < p.n * tiles; ++item) {
    total += tile_kl[item];
    count += tile_valid[item];
  }
  *loss.data_ptr<acc>() =
      static_cast<acc>(total * tau * tau / static_cast<double>(std::max<int64_t>(count, 1)));
  *num_valid.data_ptr<int64_t>() = count;
}

// scale = τ · grad_loss / max(num_valid, 1): the factor of ∂KL/∂x (x = logits/τ) in ∂loss/∂logits.
template <typename scalar_t>
void pixel_kl_backward_kernel(const PixelView& v, double tau, double scale, LayoutGradOut* grad_s,
                              LayoutGradOut* grad_t) {
  using acc = acc_t<scalar_t>;
  using V = at::vec::Vectorized<acc>;
  constexpr int64_t W = V::size();
  const PairView& p = v.pair;
  const scalar_t* s = p.s.const_data_ptr<scalar_t>();
  const scalar_t* t = p.t.const_data_ptr<scalar_t>();
  scalar_t* gs = grad_s != nullptr ? grad_s->written.data_ptr<scalar_t>() : nullptr;
  scalar_t* gt = grad_t != nullptr ? grad_t->written.data_ptr<scalar_t>() : nullptr;
  const Strides3 gss = gs != nullptr ? *row_strides(grad_s->written) : Strides3{0, 0, 0};
  const Strides3 gts = gt != nullptr ? *row_strides(grad_t->written) : Strides3{0, 0, 0};
  const acc inv_tau = static_cast<acc>(1.0 / tau);
  const int64_t tiles = (p.l + W - 1) / W;

  at::parallel_for(0, p.n * tiles, 16, [&](int64_t begin, int64_t end) {
    // es, et: the exps of the shifted logits, each channel's then overwritten by its gradients;
    // gathered: the tile's logits.
    std::vector<acc> buf(4 * p.c * W);
    acc* es = buf.data();
    acc* et = es + p.c * W;
    acc* gathered = et + p.c * W;
    acc valid[W];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / tiles, l0 = (item % tiles) * W, count = std::min(W, p.l - l0);
      const TileWriter<scalar_t> write_s{gs + n * gss.n + l0 * gss.l, gss, p.c, count, es};
      const TileWriter<scalar_t> write_t{gt + n * gts.n + l0 * gts.l, gts, p.c, count, et};
      if (v.valid_lanes(n, l0, count, valid) == 0) {
        for (int64_t c = 0; c < p.c; ++c) {
          if (gs != nullptr) write_s(c, V(acc(0)));
          if (gt != nullptr) write_t(c, V(acc(0)));
        }
      } else {
        const TileReader<scalar_t> xs(s + n * p.ss.n + l0 * p.ss.l, p.ss, p.c, count, gathered);
        const TileReader<scalar_t> xt(t + n * p.ts.n + l0 * p.ts.l, p.ts, p.c, count,
                                      gathered + p.c * W);
        const V inv_tau_v(inv_tau);
        const KLState<V> state = tile_state(xs, xt, p.c, inv_tau_v, es, et);
        const KLRowStats<V> r = kl_finalize(state);
        const V inv_zs = V(acc(1)) / state.zs, inv_zt = V(acc(1)) / state.zt;
        const V scale_v(static_cast<acc>(scale)), zero(acc(0));
        // Ignored pixels get exact zeros, whatever their logits (blend, not multiply by 0).
        const V counted = V::loadu(valid) != zero;
        for (int64_t c = 0; c < p.c; ++c) {
          const V q = V::loadu(es + c * W) * inv_zs;
          const V prob = V::loadu(et + c * W) * inv_zt;
          if (gs != nullptr) write_s(c, V::blendv(zero, kl_grad_student_at(q, prob, scale_v), counted));
          if (gt != nullptr) {
            const V grad = kl_grad_teacher_at(prob, kl_log_p(xt(c), r, inv_tau_v),
                                              kl_log_q(xs(c), r, inv_tau_v), r.kl, scale_v);
            write_t(c, V::blendv(zero, grad, counted));
          }
        }
      }
      if (gs != nullptr) write_s.finish();
      if (gt != nullptr) write_t.finish();
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Op entry points

std::tuple<Tensor, Tensor> pixel_kl_cpu(const Tensor& student, const Tensor& teacher,
                                        const std::optional<Tensor>& target, int64_t ignore_index,
                                        double tau) {
  check_pair(student, teacher);
  check_tau(tau);
  check_target(target, student);
  const PixelView v = pixel_view(student, teacher, target, ignore_index);
  Tensor loss = at::empty({}, student.options().dtype(acc_dtype(student)));
  Tensor num_valid = at::empty({}, student.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(),
                                  "pixel_kl_cpu", [&] {
                                    pixel_kl_forward_kernel<scalar_t>(v, tau, loss, num_valid);
                                  });
  return {loss, num_valid};
}

std::tuple<Tensor, Tensor> pixel_kl_backward_cpu(const Tensor& grad_loss, const Tensor& student,
                                                 const Tensor& teacher,
                                                 const std::optional<Tensor>& target,
                                                 const Tensor& num_valid, int64_t ignore_index,
                                                 double tau, bool student_requires_grad,
                                                 bool teacher_requires_grad) {
  check_pair(student, teacher);
  check_tau(tau);
  check_target(target, student);
  const double g = scalar_of("grad_loss", grad_loss);
  const double valid = scalar_of("num_valid", num_valid);
  const Tensor none = at::empty({0}, student.options());
  if (!student_requires_grad && !teacher_requires_grad) return {none, none};

  const PixelView v = pixel_view(student, teacher, target, ignore_index);
  PairGradOut grads(student, teacher, student_requires_grad, teacher_requires_grad, Layout::kAny);
  const double scale = tau * g / std::max(valid, 1.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, student.scalar_type(), "pixel_kl_backward_cpu", [&] {
        pixel_kl_backward_kernel<scalar_t>(v, tau, scale, grads.student(),
                                           grads.teacher());
      });
  return grads.finish(none);
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("pixel_kl", &kdops::cpu::pixel_kl_cpu);
  m.impl("pixel_kl_backward", &kdops::cpu::pixel_kl_backward_cpu);
}
