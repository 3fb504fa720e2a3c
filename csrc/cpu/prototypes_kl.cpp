// CPU kernels of kdops::prototype_kl and its backward (APD's observation KL), registered for the
// CPU dispatch key. The (K × L) observations are never stored: a tile's cosines to the present
// classes, (P × kTile), live in the thread's buffer; the backward recomputes them. Shared pieces:
// csrc/cpu/prototypes_common.h.
#include "cpu/prototypes_common.h"

namespace kdops {
namespace cpu {
namespace {

using namespace proto;

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

// Per pixel, the log-softmax and softmax over the present classes of o = cos/τ:
// log_prob[j][t] = o_j − m − log z, prob[j][t] = e^{o_j − m} / z with z = Σ_j' e^{o_j' − m}
// (m the pixel's max). One exp per entry: the probabilities come from the sum's own terms.
template <typename acc>
void tile_log_softmax(const acc* cos, int64_t num_present, acc inv_tau, acc* log_prob, acc* prob) {
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
    acc* pj = prob + j * kTile;
    for (int64_t t = 0; t < kTile; ++t) {
      lj[t] -= mx[t];
      pj[t] = std::exp(lj[t]);
      z[t] += pj[t];
    }
  }
  acc log_z[kTile];
  for (int64_t t = 0; t < kTile; ++t) log_z[t] = std::log(z[t]);
  for (int64_t j = 0; j < num_present; ++j) {
    acc* lj = log_prob + j * kTile;
    acc* pj = prob + j * kTile;
    for (int64_t t = 0; t < kTile; ++t) {
      lj[t] -= log_z[t];
      pj[t] /= z[t];
    }
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
  std::vector<acc> xs, xt, cos_s, cos_t, log_q, log_p, prob_q, prob_p;  // [C][kTile], [P][kTile]
  acc norm_s[kTile], inv_s[kTile], norm_t[kTile], inv_t[kTile], kl[kTile];
  const acc* s_tile = nullptr;  // the tile of each side: the input itself or xs / xt (load_tile)
  const acc* t_tile = nullptr;
  int64_t s_stride = kTile, t_stride = kTile;

  KLTileBuffers(int64_t cs, int64_t ct, int64_t k)
      : xs(cs * kTile), xt(ct * kTile), cos_s(k * kTile), cos_t(k * kTile), log_q(k * kTile),
        log_p(k * kTile), prob_q(k * kTile), prob_p(k * kTile) {}
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
  tile_log_softmax(b.cos_s.data(), num_present, inv_tau, b.log_q.data(), b.prob_q.data());
  tile_log_softmax(b.cos_t.data(), num_present, inv_tau, b.log_p.data(), b.prob_p.data());
  for (int64_t j = 0; j < num_present; ++j) {
    const acc* lq = b.log_q.data() + j * kTile;
    const acc* lp = b.log_p.data() + j * kTile;
    const acc* pj = b.prob_p.data() + j * kTile;
    for (int64_t t = 0; t < kTile; ++t) b.kl[t] += pj[t] * (lp[t] - lq[t]);
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

// out[j][c] += Σ_t w[j][t] · x[t][c] for kClasses classes (rows kTile apart in w, `channels`
// apart in out) and c < width ≤ kWidth (x rows `channels` apart): kClasses × kWidth independent
// accumulators, t in order, so the FMA chains overlap and each sum keeps a fixed order.
template <typename acc, int64_t kClasses, int64_t kWidth>
inline void add_tile_products(const acc* w, const acc* x, int64_t channels, acc* out, int64_t width) {
  acc sums[kClasses][kWidth] = {};
  for (int64_t t = 0; t < kTile; ++t) {
    const acc* xt = x + t * channels;
    for (int64_t jj = 0; jj < kClasses; ++jj) {
      const acc wj = w[jj * kTile + t];
      for (int64_t c = 0; c < kWidth; ++c) sums[jj][c] += wj * (c < width ? xt[c] : acc(0));
    }
  }
  for (int64_t jj = 0; jj < kClasses; ++jj) {
    for (int64_t c = 0; c < width; ++c) out[jj * channels + c] += sums[jj][c];
  }
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
    // ∂P̂_j += Σ_t dcos_j[t] x̂_t with x̂ transposed to [kTile][C]: per block of kClassBlock
    // classes × one SIMD width of channels the tile's sum runs in registers (t in order, lanes
    // independent: no cross-lane reduction, which strict IEEE order would keep scalar), and is
    // added to grad_hat once. dcos is 0 past the tile's pixels, where x̂ is 0 too.
    for (int64_t c = 0; c < channels; ++c) {
      const acc* xc = x + c * stride;
      for (int64_t t = 0; t < kTile; ++t) x_hat_t[t * channels + c] = xc[t] * inv[t];
    }
    constexpr int64_t kLanes = 64 / sizeof(acc);
    const int64_t full_channels = channels - channels % kLanes;
    for (int64_t j0 = 0; j0 < num_present; j0 += kClassBlock) {
      const int64_t classes = std::min(kClassBlock, num_present - j0);
      const acc* w = dcos + j0 * kTile;
      acc* out = grad_hat + j0 * channels;
      for (int64_t c0 = 0; c0 < full_channels; c0 += kLanes) {
        switch (classes) {
          case 4: add_tile_products<acc, 4, kLanes>(w, x_hat_t + c0, channels, out + c0, kLanes); break;
          case 3: add_tile_products<acc, 3, kLanes>(w, x_hat_t + c0, channels, out + c0, kLanes); break;
          case 2: add_tile_products<acc, 2, kLanes>(w, x_hat_t + c0, channels, out + c0, kLanes); break;
          default: add_tile_products<acc, 1, kLanes>(w, x_hat_t + c0, channels, out + c0, kLanes); break;
        }
      }
      for (int64_t jj = 0; jj < classes && full_channels < channels; ++jj) {
        add_tile_products<acc, 1, kLanes>(w + jj * kTile, x_hat_t + full_channels, channels,
                                          out + jj * channels + full_channels, channels - full_channels);
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
          const acc* qj = b.prob_q.data() + j * kTile;
          const acc* pj = b.prob_p.data() + j * kTile;
          const acc* cs = b.cos_s.data() + j * kTile;
          const acc* ct = b.cos_t.data() + j * kTile;
          acc* ds = dcos_s.data() + j * kTile;
          acc* dt = dcos_t.data() + j * kTile;
          for (int64_t t = 0; t < kTile; ++t) {
            const acc valid = t < count ? scale : acc(0);
            ds[t] = valid * (qj[t] - pj[t]);
            dt[t] = valid * pj[t] * (lp[t] - lq[t] - b.kl[t]);
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

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("prototype_kl", &kdops::cpu::prototype_kl_cpu);
  m.impl("prototype_kl_backward", &kdops::cpu::prototype_kl_backward_cpu);
}
