// CPU kernels of kdops::channel_kl (forward and backward ops) and their registration for the
// CPU dispatch key. Math: csrc/common/softmax_kl.h; specification: kdops/reference/softmax_kl.py.
// Layouts, views and checks: csrc/cpu/softmax_kl_common.h.

#include "cpu/softmax_kl_common.h"

namespace kdops {
namespace cpu {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// channel_kl forward: one-pass states of row pieces

constexpr int kAcc = 4;                  // independent accumulators (parallel dependency chains)
constexpr int64_t kRowChunk = 8192;      // elements of a row per work item (rows layout)
constexpr int64_t kPixelChunk = 1024;    // pixels per work item (channels layout)
constexpr int64_t kShortRow = 256;       // shorter rows run kWidth at a time, one per lane

// kAcc vector states fed a block of kAcc vectors of raw logits at a time. The states share their
// maxima, set by the first block and raised (a rescale) only when a lane of a block overshoots
// them by more than kKLSlack (scaled), which is rare; sharing them makes folding the states
// together a plain sum.
template <typename V>
struct BlockAccumulator {
  KLState<V> acc[kAcc];
  V inv_tau;
  bool started = false;

  explicit BlockAccumulator(typename V::value_type k) : inv_tau(k) {}

  // Adds xs[0..m), xt[0..m) (m ≤ kAcc), vector k to state k.
  void add(const V (&xs)[kAcc], const V (&xt)[kAcc], int m = kAcc) {
    using M = KLMath<V>;
    V ms = xs[0], mt = xt[0];
    for (int k = 1; k < m; ++k) {
      ms = M::max(ms, xs[k]);
      mt = M::max(mt, xt[k]);
    }
    if (!started) {
      for (int k = 0; k < kAcc; ++k) acc[k] = kl_state_at(ms, mt);
      started = true;
    } else {
      const V slack(static_cast<typename V::value_type>(kKLSlack));
      const V overshoots =
          ((ms - acc[0].ms) * inv_tau > slack) | ((mt - acc[0].mt) * inv_tau > slack);
      if (overshoots.zero_mask() != (1 << V::size()) - 1) {
        ms = M::max(ms, acc[0].ms);
        mt = M::max(mt, acc[0].mt);
        for (int k = 0; k < kAcc; ++k) kl_rebase(acc[k], ms, mt, inv_tau);
      }
    }
    for (int k = 0; k < m; ++k) kl_add(acc[k], xs[k], xt[k], inv_tau);
  }

  // The kAcc states as one, per lane (requires started).
  KLState<V> folded() const {
    KLState<V> sum = acc[0];
    for (int k = 1; k < kAcc; ++k) {
      sum.zs = sum.zs + acc[k].zs;
      sum.zt = sum.zt + acc[k].zt;
      sum.w = sum.w + acc[k].w;
    }
    return sum;
  }
};

// The state of all lanes of a vector state together: every lane rebased to the lanes' maxima
// (two vector exps), then summed.
template <typename T>
KLState<T> across_lanes(KLState<at::vec::Vectorized<T>> st, T inv_tau) {
  using V = at::vec::Vectorized<T>;
  const auto max_op = [](const V& a, const V& b) { return at::vec::maximum(a, b); };
  const auto sum_op = [](const V& a, const V& b) { return a + b; };
  const T ms = at::vec::vec_reduce_all<T>(max_op, st.ms);
  const T mt = at::vec::vec_reduce_all<T>(max_op, st.mt);
  kl_rebase(st, V(ms), V(mt), V(inv_tau));
  return KLState<T>{ms, at::vec::vec_reduce_all<T>(sum_op, st.zs), mt,
                    at::vec::vec_reduce_all<T>(sum_op, st.zt), at::vec::vec_reduce_all<T>(sum_op, st.w)};
}

// The state of `len` contiguous elements of one row.
template <typename scalar_t>
KLState<acc_t<scalar_t>> contiguous_row_state(const scalar_t* s, const scalar_t* t, int64_t len,
                                              acc_t<scalar_t> inv_tau) {
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  using acc = acc_t<scalar_t>;
  constexpr int64_t W = IO::kWidth;
  BlockAccumulator<V> blocks(inv_tau);
  V xs[kAcc], xt[kAcc];
  for (int64_t i = 0; i < len / W * W; i += kAcc * W) {
    const int m = static_cast<int>(std::min<int64_t>(kAcc, (len - i) / W));  // whole vectors
    for (int k = 0; k < m; ++k) {
      xs[k] = IO::load(s + i + k * W);
      xt[k] = IO::load(t + i + k * W);
    }
    blocks.add(xs, xt, m);
  }
  KLState<acc> state =
      blocks.started ? across_lanes(blocks.folded(), inv_tau) : kl_state_empty<acc>();
  for (int64_t i = len / W * W; i < len; ++i) {
    kl_push(state, static_cast<acc>(s[i]), static_cast<acc>(t[i]), inv_tau);
  }
  return state;
}

// The states of `lanes` ≤ kWidth rows side by side, one per lane, over `positions` ≥ 1
// positions; load(i, xs, xt) gives position i of every lane as vectors of raw logits.
template <typename V, typename Load>
void lanewise_states(int64_t positions, int64_t lanes, typename V::value_type inv_tau,
                     const Load& load, KLState<typename V::value_type>* out) {
  using T = typename V::value_type;
  constexpr int64_t W = V::size();
  BlockAccumulator<V> blocks(inv_tau);
  V xs[kAcc], xt[kAcc];
  for (int64_t i = 0; i < positions; i += kAcc) {
    const int m = static_cast<int>(std::min<int64_t>(kAcc, positions - i));
    for (int k = 0; k < m; ++k) load(i + k, xs[k], xt[k]);
    blocks.add(xs, xt, m);
  }
  const KLState<V> st = blocks.folded();
  T ms[W], zs[W], mt[W], zt[W], w[W];
  st.ms.store(ms);
  st.zs.store(zs);
  st.mt.store(mt);
  st.zt.store(zt);
  st.w.store(w);
  for (int64_t j = 0; j < lanes; ++j) out[j] = {ms[j], zs[j], mt[j], zt[j], w[j]};
}

template <typename scalar_t>
void channel_kl_forward_kernel(const PairView& v, double tau, Tensor& loss, Tensor& row_stats) {
  using acc = acc_t<scalar_t>;
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  constexpr int64_t W = IO::kWidth;
  const scalar_t* s = v.s.const_data_ptr<scalar_t>();
  const scalar_t* t = v.t.const_data_ptr<scalar_t>();
  const acc inv_tau = static_cast<acc>(1.0 / tau);
  const int64_t rows = v.n * v.c;

  // Partial states of each row, chunk by chunk, then merged in chunk order.
  int64_t chunks = 0;
  std::vector<KLState<acc>> partial;
  if (v.layout == Layout::kRows && v.l >= kShortRow) {
    chunks = (v.l + kRowChunk - 1) / kRowChunk;
    partial.resize(rows * chunks);
    at::parallel_for(0, rows * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t row = item / chunks, l0 = (item % chunks) * kRowChunk;
        const int64_t n = row / v.c, c = row % v.c;
        partial[item] = contiguous_row_state(s + n * v.ss.n + c * v.ss.c + l0,
                                             t + n * v.ts.n + c * v.ts.c + l0,
                                             std::min(kRowChunk, v.l - l0), inv_tau);
      }
    });
  } else if (v.layout == Layout::kRows) {
    // Short rows: kWidth rows side by side, transposed into [L][kWidth] buffers.
    chunks = 1;
    partial.resize(rows);
    const int64_t groups = (rows + W - 1) / W;
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc> buffer(2 * v.l * W);
      acc* bs = buffer.data();
      acc* bt = bs + v.l * W;
      for (int64_t group = begin; group < end; ++group) {
        const int64_t row0 = group * W, lanes = std::min(W, rows - row0);
        std::fill(buffer.begin(), buffer.end(), acc(0));
        for (int64_t j = 0; j < lanes; ++j) {
          const int64_t n = (row0 + j) / v.c, c = (row0 + j) % v.c;
          const scalar_t* sp = s + n * v.ss.n + c * v.ss.c;
          const scalar_t* tp = t + n * v.ts.n + c * v.ts.c;
          for (int64_t l = 0; l < v.l; ++l) {
            bs[l * W + j] = static_cast<acc>(sp[l]);
            bt[l * W + j] = static_cast<acc>(tp[l]);
          }
        }
        lanewise_states<V>(v.l, lanes, inv_tau, [&](int64_t l, V& xs, V& xt) {
          xs = V::loadu(bs + l * W);
          xt = V::loadu(bt + l * W);
        }, partial.data() + row0);
      }
    });
  } else {
    // Channels layout: kWidth consecutive channels side by side, pixel after pixel.
    chunks = (v.l + kPixelChunk - 1) / kPixelChunk;
    const int64_t groups = (v.c + W - 1) / W;
    partial.resize(rows * chunks);
    at::parallel_for(0, v.n * groups * chunks, 1, [&](int64_t begin, int64_t end) {
      KLState<acc> lane_state[W];
      for (int64_t item = begin; item < end; ++item) {
        const int64_t chunk = item % chunks, group = (item / chunks) % groups;
        const int64_t n = item / (chunks * groups);
        const int64_t c0 = group * W, l0 = chunk * kPixelChunk;
        const int64_t lanes = std::min(W, v.c - c0);
        const scalar_t* sp = s + n * v.ss.n + c0 + l0 * v.ss.l;
        const scalar_t* tp = t + n * v.ts.n + c0 + l0 * v.ts.l;
        lanewise_states<V>(std::min(kPixelChunk, v.l - l0), lanes, inv_tau,
                           [&](int64_t l, V& xs, V& xt) {
                             xs = IO::load(sp + l * v.ss.l, lanes);
                             xt = IO::load(tp + l * v.ts.l, lanes);
                           },
                           lane_state);
        for (int64_t j = 0; j < lanes; ++j) {
          partial[(n * v.c + c0 + j) * chunks + chunk] = lane_state[j];
        }
      }
    });
  }

  // Merge each row's chunks, then finalize kWidth rows at a time (vector logs).
  acc* stats = row_stats.data_ptr<acc>();
  at::parallel_for(0, (rows + W - 1) / W, 16, [&](int64_t begin, int64_t end) {
    acc ms[W], zs[W], mt[W], zt[W], w[W], log_zs[W], log_zt[W], kl[W];
    for (int64_t group = begin; group < end; ++group) {
      const int64_t row0 = group * W, lanes = std::min(W, rows - row0);
      for (int64_t j = 0; j < W; ++j) {
        KLState<acc> state = kl_state_empty<acc>();
        for (int64_t chunk = 0; j < lanes && chunk < chunks; ++chunk) {
          state = kl_merge(state, partial[(row0 + j) * chunks + chunk], inv_tau);
        }
        if (j >= lanes) state = {acc(0), acc(1), acc(0), acc(1), acc(0)};  // unused lane
        ms[j] = state.ms;
        zs[j] = state.zs;
        mt[j] = state.mt;
        zt[j] = state.zt;
        w[j] = state.w;
      }
      const KLRowStats<V> r = kl_finalize(KLState<V>{V::loadu(ms), V::loadu(zs), V::loadu(mt),
                                                    V::loadu(zt), V::loadu(w)});
      r.log_zs.store(log_zs);
      r.log_zt.store(log_zt);
      r.kl.store(kl);
      for (int64_t j = 0; j < lanes; ++j) {
        acc* out = stats + kKLRowStats * (row0 + j);
        out[0] = ms[j];
        out[1] = log_zs[j];
        out[2] = mt[j];
        out[3] = log_zt[j];
        out[4] = kl[j];
      }
    }
  });
  double total = 0.0;
  for (int64_t row = 0; row < rows; ++row) total += stats[kKLRowStats * row + 4];
  *loss.data_ptr<acc>() = static_cast<acc>(total * tau * tau / static_cast<double>(rows));
}

// ---------------------------------------------------------------------------------------------
// channel_kl backward: one more read of s and t, each requested gradient written once

// The gradients at one vector of elements (raw logits xs, xt); g_s / g_t are null when not
// requested.
template <typename scalar_t>
inline void store_channel_grads(const at::vec::Vectorized<acc_t<scalar_t>>& xs,
                                const at::vec::Vectorized<acc_t<scalar_t>>& xt,
                                const KLRowStats<at::vec::Vectorized<acc_t<scalar_t>>>& row,
                                const at::vec::Vectorized<acc_t<scalar_t>>& inv_tau,
                                const at::vec::Vectorized<acc_t<scalar_t>>& scale, scalar_t* g_s,
                                scalar_t* g_t, int64_t count) {
  using IO = VecIO<scalar_t>;
  if (g_s != nullptr && g_t != nullptr) {
    typename IO::V grad_s, grad_t;
    kl_grad_both(xs, xt, row, inv_tau, scale, grad_s, grad_t);
    IO::store(g_s, grad_s, count);
    IO::store(g_t, grad_t, count);
  } else if (g_s != nullptr) {
    IO::store(g_s, kl_grad_student(xs, xt, row, inv_tau, scale), count);
  } else {
    IO::store(g_t, kl_grad_teacher(xs, xt, row, inv_tau, scale), count);
  }
}

template <typename scalar_t>
void channel_kl_backward_kernel(const PairView& v, const Tensor& row_stats, double tau,
                                double scale, LayoutGradOut* grad_s, LayoutGradOut* grad_t) {
  using acc = acc_t<scalar_t>;
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  constexpr int64_t W = IO::kWidth;
  const scalar_t* s = v.s.const_data_ptr<scalar_t>();
  const scalar_t* t = v.t.const_data_ptr<scalar_t>();
  scalar_t* gs = grad_s != nullptr ? grad_s->written.data_ptr<scalar_t>() : nullptr;
  scalar_t* gt = grad_t != nullptr ? grad_t->written.data_ptr<scalar_t>() : nullptr;
  const Strides3 gss = gs != nullptr ? *row_strides(grad_s->written) : Strides3{0, 0, 0};
  const Strides3 gts = gt != nullptr ? *row_strides(grad_t->written) : Strides3{0, 0, 0};
  const acc* stats = row_stats.const_data_ptr<acc>();
  const V inv_tau(static_cast<acc>(1.0 / tau));
  const V scale_v(static_cast<acc>(scale));

  if (v.layout == Layout::kRows) {
    const int64_t chunks = (v.l + kRowChunk - 1) / kRowChunk;
    at::parallel_for(0, v.n * v.c * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t row = item / chunks, l0 = (item % chunks) * kRowChunk;
        const int64_t n = row / v.c, c = row % v.c, len = std::min(kRowChunk, v.l - l0);
        const acc* in = stats + kKLRowStats * row;
        const KLRowStats<V> r{V(in[0]), V(in[1]), V(in[2]), V(in[3]), V(in[4])};
        const scalar_t* sp = s + n * v.ss.n + c * v.ss.c + l0;
        const scalar_t* tp = t + n * v.ts.n + c * v.ts.c + l0;
        scalar_t* gsp = gs != nullptr ? gs + n * gss.n + c * gss.c + l0 : nullptr;
        scalar_t* gtp = gt != nullptr ? gt + n * gts.n + c * gts.c + l0 : nullptr;
        for (int64_t i = 0; i < len; i += W) {
          const int64_t count = std::min(W, len - i);
          store_channel_grads(IO::load(sp + i, count), IO::load(tp + i, count), r, inv_tau,
                              scale_v, gsp != nullptr ? gsp + i : nullptr,
                              gtp != nullptr ? gtp + i : nullptr, count);
        }
      }
    });
    return;
  }

  // Channels layout: a vector holds consecutive channels of one pixel, each its own row; the
  // statistics are transposed to one array per statistic for vector loads.
  const int64_t rows = v.n * v.c;
  std::vector<acc> columns(kKLRowStats * rows);
  for (int64_t row = 0; row < rows; ++row) {
    for (int j = 0; j < kKLRowStats; ++j) columns[j * rows + row] = stats[kKLRowStats * row + j];
  }
  const int64_t chunks = (v.l + kPixelChunk - 1) / kPixelChunk;
  at::parallel_for(0, v.n * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / chunks, l0 = (item % chunks) * kPixelChunk;
      const int64_t l1 = std::min(v.l, l0 + kPixelChunk);
      for (int64_t l = l0; l < l1; ++l) {
        for (int64_t c0 = 0; c0 < v.c; c0 += W) {
          const int64_t lanes = std::min(W, v.c - c0), row = n * v.c + c0;
          const acc* column = columns.data() + row;
          const KLRowStats<V> r{V::loadu(column, lanes), V::loadu(column + rows, lanes),
                                V::loadu(column + 2 * rows, lanes),
                                V::loadu(column + 3 * rows, lanes),
                                V::loadu(column + 4 * rows, lanes)};
          const V xs = IO::load(s + n * v.ss.n + c0 + l * v.ss.l, lanes);
          const V xt = IO::load(t + n * v.ts.n + c0 + l * v.ts.l, lanes);
          store_channel_grads(xs, xt, r, inv_tau, scale_v,
                              gs != nullptr ? gs + n * gss.n + c0 + l * gss.l : nullptr,
                              gt != nullptr ? gt + n * gts.n + c0 + l * gts.l : nullptr, lanes);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Op entry points

std::tuple<Tensor, Tensor> channel_kl_cpu(const Tensor& student, const Tensor& teacher,
                                          double tau) {
  check_pair(student, teacher);
  check_tau(tau);
  const PairView v = pair_view(student, teacher, layout_of(student));
  const auto stats_options = student.options().dtype(acc_dtype(student));
  Tensor loss = at::empty({}, stats_options);
  Tensor row_stats = at::empty({v.n * v.c, kKLRowStats}, stats_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(),
                                  "channel_kl_cpu", [&] {
                                    channel_kl_forward_kernel<scalar_t>(v, tau, loss, row_stats);
                                  });
  return {loss, row_stats};
}

std::tuple<Tensor, Tensor> channel_kl_backward_cpu(const Tensor& grad_loss, const Tensor& student,
                                                   const Tensor& teacher, const Tensor& row_stats,
                                                   double tau, bool student_requires_grad,
                                                   bool teacher_requires_grad) {
  check_pair(student, teacher);
  check_tau(tau);
  const int64_t rows = student.size(0) * student.size(1);
  TORCH_CHECK_VALUE(
      row_stats.dim() == 2 && row_stats.size(0) == rows && row_stats.size(1) == kKLRowStats,
      "row_stats must have shape (N*C, ", kKLRowStats, ") = (", rows, ", ", kKLRowStats, "), got ",
      row_stats.sizes());
  TORCH_CHECK_TYPE(row_stats.scalar_type() == acc_dtype(student), "row_stats must be ",
                   acc_dtype(student), ", got ", row_stats.scalar_type());
  const double g = scalar_of("grad_loss", grad_loss);
  const Tensor none = at::empty({0}, student.options());
  if (!student_requires_grad && !teacher_requires_grad) return {none, none};

  const Layout layout = layout_of(student);
  const PairView v = pair_view(student, teacher, layout);
  const Tensor stats = row_stats.contiguous();
  PairGradOut grads(student, teacher, student_requires_grad, teacher_requires_grad, layout);
  const double scale = tau * g / static_cast<double>(rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, student.scalar_type(), "channel_kl_backward_cpu", [&] {
        channel_kl_backward_kernel<scalar_t>(v, stats, tau, scale, grads.student(),
                                             grads.teacher());
      });
  return grads.finish(none);
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("channel_kl", &kdops::cpu::channel_kl_cpu);
  m.impl("channel_kl_backward", &kdops::cpu::channel_kl_backward_cpu);
}
