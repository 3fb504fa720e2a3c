// CPU kernels of kdops::channel_kl and kdops::pixel_kl (forward and backward ops) and their
// registration for the CPU dispatch key. Math: csrc/common/softmax_kl.h; specification:
// kdops/reference/softmax_kl.py.
//
// Tensors are read as (N, C, L), their spatial dims merged (a view whenever the spatial strides
// allow it), through int64 element strides; inputs are float32/float16/bfloat16 with float32
// accumulation, or float64 computed in float64 (for gradcheck).
//
// Layouts. channel_kl runs without a copy in two layouts, both fast:
//   rows      (stride_l == 1, contiguous NCHW): a row is contiguous, SIMD lanes run along L
//             (rows shorter than kShortRow: kWidth rows side by side, one per lane);
//   channels  (stride_c == 1, channels_last):  SIMD lanes run across C, one row per lane,
//             stepping through the pixels (each step reads a contiguous run of channels).
// pixel_kl copies tiles of kWidth pixels × C channels into a [C][kWidth] buffer: vector loads in
// the rows layout (fast), scalar gathers for any other strides (channels_last included).
// Inputs whose spatial dims cannot be merged into one stride, and channel_kl inputs in neither
// layout, are copied once into the rows layout; a gradient that cannot be written in the
// kernel's layout (the tensor empty_like gives, which the fake kernels promise) is written to
// a buffer and copied in once.
//
// Determinism: the work is cut into fixed pieces (row chunks, pixel tiles) independent of the
// thread count; partial results land in buffers and are combined in a fixed order.

// at::vec compiles its SIMD specialisations only where a CPU_CAPABILITY_* macro is set (ATen
// sets it per kernel file). Set it from the compiler's target, so that -march=native builds get
// AVX-512 or AVX2 vectors, and give the inline namespace a name of its own so these
// instantiations never meet the generic ones of other translation units. Builds without these
// targets (KDOPS_PORTABLE=1) use the generic Vectorized, compiler-vectorised loops.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512 1
#define CPU_CAPABILITY kdops_avx512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY_AVX2 1
#define CPU_CAPABILITY kdops_avx2
#endif

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/softmax_kl.h"
#include "common/tensor_layout.h"
#include "cpu/vec_io.h"

namespace kdops {

// SIMD vectors for the shared math: each lane runs the scalar recurrences of its own row/pixel.
template <typename T>
struct KLMath<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V exp(const V& x) { return x.exp(); }  // Sleef, 1 ulp
  static V log(const V& x) { return x.log(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static V where_positive(const V& weight, const V& value) {
    return V::blendv(V(T(0)), value, weight > V(T(0)));
  }
};

// float vectors: exp inlined (the kernels' hot operation, two per element in each pass) instead of
// the Sleef call: Cephes' reduction x = n·ln2 + r and degree-6 polynomial, ≤ 1.3 ulp. The
// arguments here are scaled logits minus a running max, ≤ kKLSlack, so only the low end needs
// care: below −87.3 (−inf included: a probability of exactly 0) the result is 0; NaN stays NaN.
template <>
struct KLMath<at::vec::Vectorized<float>> {
  using V = at::vec::Vectorized<float>;
  static V exp(const V& x) {
    const V clamped = at::vec::maximum(x, V(-87.33654f));
    const V n = (clamped * V(1.44269504088896341f)).round();
    V r = at::vec::fmadd(n, V(-0.693359375f), clamped);  // ln2 in two parts: r exact
    r = at::vec::fmadd(n, V(2.12194440e-4f), r);
    V y = at::vec::fmadd(V(1.9875691500e-4f), r, V(1.3981999507e-3f));
    y = at::vec::fmadd(y, r, V(8.3334519073e-3f));
    y = at::vec::fmadd(y, r, V(4.1665795894e-2f));
    y = at::vec::fmadd(y, r, V(1.6666665459e-1f));
    y = at::vec::fmadd(y, r, V(5.0000001201e-1f));
    y = at::vec::fmadd(y, r * r, r + V(1.0f));
    // 2^n from its bits: (n + 127) · 2^23, exact in float, is the bit pattern of 2^n.
    const V bits = at::vec::fmadd(n, V(8388608.0f), V(127.0f * 8388608.0f));
    const V result = y * at::vec::cast<float>(at::vec::convert_to_int_of_same_size(bits));
    return V::blendv(result, V(0.0f), x < V(-87.33654f));
  }
  static V log(const V& x) { return x.log(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static V where_positive(const V& weight, const V& value) {
    return V::blendv(V(0.0f), value, weight > V(0.0f));
  }
};

namespace cpu {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// Layouts

// kRows: stride_l == 1; kChannels: stride_c == 1; kAny: any strides whose spatial dims merge.
enum class Layout { kRows, kChannels, kAny };

bool fits(const Tensor& x, Layout layout) {
  const auto strides = row_strides(x);
  if (!strides) return false;
  switch (layout) {
    case Layout::kRows: return strides->l == 1;
    case Layout::kChannels: return strides->c == 1;
    case Layout::kAny: return true;
  }
  return false;
}

Tensor empty_in_layout(const Tensor& x, Layout layout) {
  if (layout != Layout::kChannels) return at::empty(x.sizes(), x.options());
  return at::empty_like(x.movedim(1, -1), at::MemoryFormat::Contiguous).movedim(-1, 1);
}

// x itself when it can be read in `layout`, else a copy in it.
Tensor in_layout(const Tensor& x, Layout layout) {
  if (fits(x, layout)) return x;
  return empty_in_layout(x, layout).copy_(x);
}

// The channel_kl layout the student is in (rows when it is in neither: it is then copied).
Layout layout_of(const Tensor& student) {
  return !fits(student, Layout::kRows) && fits(student, Layout::kChannels) ? Layout::kChannels
                                                                           : Layout::kRows;
}

// The gradient of x: the tensor empty_like(x) gives, which the kernel writes directly when it
// can, else through a buffer in `layout` copied in by finish().
struct LayoutGradOut {
  Tensor result;
  Tensor written;

  LayoutGradOut(const Tensor& x, Layout layout) : result(at::empty_like(x)) {
    written = fits(result, layout) ? result : empty_in_layout(x, layout);
  }
  void finish() {
    if (!written.is_same(result)) result.copy_(written);
  }
};

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

// The student and teacher as the kernels read them.
struct PairView {
  Tensor s, t;
  Strides3 ss, ts;
  int64_t n, c, l;
  Layout layout;
};

PairView pair_view(const Tensor& student, const Tensor& teacher, Layout layout) {
  PairView v;
  v.layout = layout;
  v.s = in_layout(student, layout);
  v.t = in_layout(teacher, layout);
  v.ss = *row_strides(v.s);
  v.ts = *row_strides(v.t);
  v.n = student.size(0);
  v.c = student.size(1);
  v.l = student.numel() / (v.n * v.c);
  return v;
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
// pixel_kl: tiles of kWidth consecutive pixels of one image (one pixel per lane) × C channels.
// A tile is first copied (raw logits, in acc_t) into a [C][kWidth] buffer (one vector load per channel in the
// rows layout, a scalar gather for other strides): the copy issues the loads of the C rows
// (4·L bytes apart) back to back, and the passes over C (statistics, then gradients) read L1.
// Measured: faster than reading the rows inside the exp-heavy passes.

// Channel c of a tile of pixels [l0, l0 + count), as a vector of raw logits (lanes ≥ count zero).
template <typename scalar_t>
struct TileReader {
  using IO = VecIO<scalar_t>;
  using acc = acc_t<scalar_t>;
  using V = typename IO::V;
  static constexpr int64_t W = IO::kWidth;

  acc* buffer;  // [C][W]

  // x points at (n, 0, l0).
  TileReader(const scalar_t* x, const Strides3& st, int64_t channels, int64_t count, acc* buffer)
      : buffer(buffer) {
    if (st.l == 1) {
      for (int64_t c = 0; c < channels; ++c) IO::load(x + c * st.c, count).store(buffer + c * W);
      return;
    }
    std::fill(buffer, buffer + channels * W, acc(0));
    for (int64_t j = 0; j < count; ++j) {
      for (int64_t c = 0; c < channels; ++c) {
        buffer[c * W + j] = static_cast<acc>(x[c * st.c + j * st.l]);
      }
    }
  }

  V operator()(int64_t c) const { return V::loadu(buffer + c * W); }
};

// Collects a tile's gradient, channel by channel, in a [C][kWidth] buffer that finish() writes out
// (row by row in the rows layout, else scattered).
template <typename scalar_t>
struct TileWriter {
  using IO = VecIO<scalar_t>;
  using acc = acc_t<scalar_t>;
  static constexpr int64_t W = IO::kWidth;

  scalar_t* x;  // (n, 0, l0)
  Strides3 st;
  int64_t channels, count;
  acc* buffer;

  void operator()(int64_t c, const typename IO::V& value) const { value.store(buffer + c * W); }
  void finish() const {
    if (st.l == 1) {
      for (int64_t c = 0; c < channels; ++c) {
        IO::store(x + c * st.c, IO::V::loadu(buffer + c * W), count);
      }
      return;
    }
    for (int64_t j = 0; j < count; ++j) {
      for (int64_t c = 0; c < channels; ++c) {
        x[c * st.c + j * st.l] = static_cast<scalar_t>(buffer[c * W + j]);
      }
    }
  }
};

// The per-pixel states of a tile in one pass over C: maxima from the first channel, raised only
// when a channel overshoots them by more than kKLSlack (scaled). With es, et given, the exps of
// the shifted logits are kept for the gradient pass (rescaled along when the maxima rise).
template <typename Reader>
KLState<typename Reader::V> tile_state(const Reader& xs, const Reader& xt, int64_t channels,
                                       const typename Reader::V& inv_tau,
                                       typename Reader::acc* es, typename Reader::acc* et) {
  using V = typename Reader::V;
  using M = KLMath<V>;
  constexpr int64_t W = Reader::W;
  const V slack(static_cast<typename Reader::acc>(kKLSlack));
  KLState<V> state = kl_state_at(xs(0), xt(0));
  for (int64_t c = 0; c < channels; ++c) {
    const V x_s = xs(c), x_t = xt(c);
    const V overshoots =
        ((x_s - state.ms) * inv_tau > slack) | ((x_t - state.mt) * inv_tau > slack);
    if (overshoots.zero_mask() != (1 << V::size()) - 1) {
      const V ms = M::max(state.ms, x_s), mt = M::max(state.mt, x_t);
      if (es != nullptr) {
        const V alpha_s = M::exp((state.ms - ms) * inv_tau);
        const V alpha_t = M::exp((state.mt - mt) * inv_tau);
        for (int64_t k = 0; k < c; ++k) {
          (V::loadu(es + k * W) * alpha_s).store(es + k * W);
          (V::loadu(et + k * W) * alpha_t).store(et + k * W);
        }
      }
      kl_rebase(state, ms, mt, inv_tau);
    }
    const V ds = (x_s - state.ms) * inv_tau, dt = (x_t - state.mt) * inv_tau;
    const V exp_s = M::exp(ds), exp_t = M::exp(dt);
    kl_add_terms(state, ds, dt, exp_s, exp_t);
    if (es != nullptr) {
      exp_s.store(es + c * W);
      exp_t.store(et + c * W);
    }
  }
  return state;
}

// The student, teacher and labels as the pixel kernels read them.
struct PixelView {
  PairView pair;
  Tensor labels;  // int64; undefined: every pixel is valid
  const int64_t* target = nullptr;
  int64_t target_stride_n = 0, target_stride_l = 0;
  int64_t ignore_index = 0;

  // 1 where pixel l0 + j of image n counts, else 0 (0 for j ≥ count); returns how many count.
  template <typename acc, int64_t W>
  int64_t valid_lanes(int64_t n, int64_t l0, int64_t count, acc (&valid)[W]) const {
    int64_t how_many = 0;
    for (int64_t j = 0; j < W; ++j) {
      const bool counts = j < count && (target == nullptr ||
                                        target[n * target_stride_n + (l0 + j) * target_stride_l] !=
                                            ignore_index);
      valid[j] = counts ? acc(1) : acc(0);
      how_many += counts;
    }
    return how_many;
  }
};

PixelView pixel_view(const Tensor& student, const Tensor& teacher,
                     const std::optional<Tensor>& target, int64_t ignore_index) {
  PixelView v;
  v.pair = pair_view(student, teacher, Layout::kAny);
  v.ignore_index = ignore_index;
  if (target.has_value()) {
    // Labels are O(pixels), C times smaller than the logits: other integer dtypes and
    // unmergeable strides are copied once into int64.
    v.labels = target->to(at::kLong);
    if (!merged_stride(v.labels, 1)) v.labels = v.labels.contiguous();
    v.target = v.labels.const_data_ptr<int64_t>();
    v.target_stride_n = v.labels.stride(0);
    v.target_stride_l = *merged_stride(v.labels, 1);
  }
  return v;
}

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

void check_pair(const Tensor& student, const Tensor& teacher) {
  TORCH_CHECK_VALUE(student.dim() >= 2, "student must have shape (N, C, *spatial), got ",
                    student.sizes());
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "teacher must have the shape of student (",
                    student.sizes(), "), got ", teacher.sizes());
  const auto dtype = student.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                       dtype == at::kDouble,
                   "student must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK_TYPE(teacher.scalar_type() == dtype, "teacher must have the dtype of student (",
                   dtype, "), got ", teacher.scalar_type());
  TORCH_CHECK_VALUE(student.device().is_cpu() && teacher.device().is_cpu(),
                    "student and teacher must be CPU tensors, got ", student.device(), " and ",
                    teacher.device());
  TORCH_CHECK_VALUE(student.numel() > 0, "student must not be empty, got shape ", student.sizes());
}

void check_tau(double tau) {
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, "tau must be finite and > 0, got ", tau);
}

void check_target(const std::optional<Tensor>& target, const Tensor& student) {
  if (!target.has_value()) return;
  TORCH_CHECK_TYPE(at::isIntegralType(target->scalar_type(), /*includeBool=*/false),
                   "target must be an integer tensor, got ", target->scalar_type());
  std::vector<int64_t> expected{student.size(0)};
  expected.insert(expected.end(), student.sizes().begin() + 2, student.sizes().end());
  TORCH_CHECK_VALUE(target->sizes() == at::IntArrayRef(expected), "target must have shape ",
                    at::IntArrayRef(expected), " (N, *spatial of student), got ", target->sizes());
  TORCH_CHECK_VALUE(target->device() == student.device(),
                    "target must be on the device of student (", student.device(), "), got ",
                    target->device());
}

at::ScalarType acc_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

double scalar_of(const char* name, const Tensor& x) {
  TORCH_CHECK_VALUE(x.numel() == 1, name, " must hold one element, got shape ", x.sizes());
  return x.item<double>();
}

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
  std::optional<LayoutGradOut> grad_s, grad_t;
  if (student_requires_grad) grad_s.emplace(student, layout);
  if (teacher_requires_grad) grad_t.emplace(teacher, layout);
  const double scale = tau * g / static_cast<double>(rows);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, student.scalar_type(), "channel_kl_backward_cpu", [&] {
        channel_kl_backward_kernel<scalar_t>(v, stats, tau, scale, grad_s ? &*grad_s : nullptr,
                                             grad_t ? &*grad_t : nullptr);
      });
  if (grad_s) grad_s->finish();
  if (grad_t) grad_t->finish();
  return {grad_s ? grad_s->result : none, grad_t ? grad_t->result : none};
}

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
  std::optional<LayoutGradOut> grad_s, grad_t;
  if (student_requires_grad) grad_s.emplace(student, Layout::kAny);
  if (teacher_requires_grad) grad_t.emplace(teacher, Layout::kAny);
  const double scale = tau * g / std::max(valid, 1.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, student.scalar_type(), "pixel_kl_backward_cpu", [&] {
        pixel_kl_backward_kernel<scalar_t>(v, tau, scale, grad_s ? &*grad_s : nullptr,
                                           grad_t ? &*grad_t : nullptr);
      });
  if (grad_s) grad_s->finish();
  if (grad_t) grad_t->finish();
  return {grad_s ? grad_s->result : none, grad_t ? grad_t->result : none};
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("channel_kl", &kdops::cpu::channel_kl_cpu);
  m.impl("channel_kl_backward", &kdops::cpu::channel_kl_backward_cpu);
  m.impl("pixel_kl", &kdops::cpu::pixel_kl_cpu);
  m.impl("pixel_kl_backward", &kdops::cpu::pixel_kl_backward_cpu);
}
