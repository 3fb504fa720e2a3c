// CPU kernels of kdops::channel_kl and kdops::pixel_kl (forward and backward ops) and their
// registration for the CPU dispatch key. Math: csrc/common/softmax_kl.h; specification:
// kdops/reference/softmax_kl.py.
//
// Tensors are read as (N, C, L), their spatial dims merged (a view whenever the spatial strides
// allow it), through int64 element strides; inputs are float32/float16/bfloat16 with float32
// accumulation, or float64 computed in float64 (for gradcheck).
//
// Layouts. channel_kl runs without a copy in two layouts:
//   rows      (stride_l == 1, contiguous NCHW): a row is contiguous, SIMD lanes run along L;
//   channels  (stride_c == 1, channels_last):  SIMD lanes run across C, one row per lane,
//             stepping through the pixels (each step reads a contiguous run of channels).
// pixel_kl gathers tiles of kWidth pixels × C channels into a [C][kWidth] buffer: vector loads
// in the rows layout, scalar gathers for any other strides (channels_last included).
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

namespace kdops {

// SIMD vectors for the shared math: each lane runs the scalar recurrences of its own row/pixel.
template <typename T>
struct KLMath<at::vec::Vectorized<T>> {
  using V = at::vec::Vectorized<T>;
  static V exp(const V& x) { return x.exp(); }  // Sleef, 1 ulp
  static V log(const V& x) { return x.log(); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
};

namespace cpu {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// Layouts

struct RowStrides {
  int64_t n, c, l;
};

// The stride of dims [first, dim) of x merged into one, when that is a view.
std::optional<int64_t> merged_stride(const Tensor& x, int64_t first) {
  int64_t stride = 1;   // a run of one element is contiguous
  int64_t merged = -1;  // the stride the next outer dim needs to merge
  for (int64_t d = x.dim() - 1; d >= first; --d) {
    const int64_t size = x.size(d);
    if (size == 1) continue;
    if (merged < 0) {
      stride = x.stride(d);
    } else if (x.stride(d) != merged) {
      return std::nullopt;
    }
    merged = x.stride(d) * size;
  }
  return stride;
}

// The (N, C, L) element strides of x with its spatial dims merged into L, when that is a view.
std::optional<RowStrides> row_strides(const Tensor& x) {
  const auto stride_l = merged_stride(x, 2);
  if (!stride_l) return std::nullopt;
  return RowStrides{x.stride(0), x.stride(1), *stride_l};
}

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
struct GradOut {
  Tensor result;
  Tensor written;

  GradOut(const Tensor& x, Layout layout) : result(at::empty_like(x)) {
    written = fits(result, layout) ? result : empty_in_layout(x, layout);
  }
  void finish() {
    if (!written.is_same(result)) result.copy_(written);
  }
};

// ---------------------------------------------------------------------------------------------
// Vector loads and stores

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;  // float for 16/32-bit inputs, double for float64

// kWidth (or `count` < kWidth, the rest zero-filled) consecutive elements converted to acc_t.
template <typename scalar_t>
struct VecIO {
  using acc = acc_t<scalar_t>;
  using V = at::vec::Vectorized<acc>;
  static constexpr int64_t kWidth = V::size();
  static constexpr bool kConverts = !std::is_same_v<scalar_t, acc>;

  static V load(const scalar_t* p) {
    if constexpr (kConverts) {
      V out;
      at::vec::load_to_float(p, out);
      return out;
    } else {
      return V::loadu(p);
    }
  }
  static V load(const scalar_t* p, int64_t count) {
    if (count == kWidth) return load(p);
    if constexpr (kConverts) {
      scalar_t padded[kWidth] = {};
      std::copy(p, p + count, padded);
      return load(padded);
    } else {
      return V::loadu(p, count);
    }
  }
  static void store(scalar_t* p, const V& v, int64_t count = kWidth) {
    if constexpr (kConverts) {
      at::vec::convert_from_float<scalar_t>(v, v).store(p, count);
    } else {
      v.store(p, count);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// channel_kl forward: one-pass states of row pieces

constexpr int kAcc = 4;                  // independent accumulators (parallel dependency chains)
constexpr int64_t kRowChunk = 8192;      // elements of a row per work item (rows layout)
constexpr int64_t kPixelChunk = 1024;    // pixels per work item (channels layout)

// kAcc vector states fed a block of kAcc vectors at a time. The states share their maxima,
// raised (a rescale, rare once a row is under way) only when a lane of the block exceeds them.
template <typename V>
struct BlockAccumulator {
  KLState<V> acc[kAcc];
  bool started = false;

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
      ms = M::max(ms, acc[0].ms);
      mt = M::max(mt, acc[0].mt);
      const V raised = (ms != acc[0].ms) | (mt != acc[0].mt);
      if (raised.zero_mask() != (1 << V::size()) - 1) {
        for (int k = 0; k < kAcc; ++k) kl_rebase(acc[k], ms, mt);
      }
    }
    for (int k = 0; k < m; ++k) kl_add(acc[k], xs[k], xt[k]);
  }

  // The scalar state of each lane (its kAcc states merged in order); empty when not started.
  template <typename T>
  void lane_states(KLState<T>* out) const {
    constexpr int64_t W = V::size();
    for (int64_t j = 0; j < W; ++j) out[j] = kl_state_empty<T>();
    if (!started) return;
    T ms[W], zs[W], mt[W], zt[W], w[W];
    for (int k = 0; k < kAcc; ++k) {
      acc[k].ms.store(ms);
      acc[k].zs.store(zs);
      acc[k].mt.store(mt);
      acc[k].zt.store(zt);
      acc[k].w.store(w);
      for (int64_t j = 0; j < W; ++j) {
        out[j] = kl_merge(out[j], KLState<T>{ms[j], zs[j], mt[j], zt[j], w[j]});
      }
    }
  }
};

// The state of `len` contiguous elements of one row.
template <typename scalar_t>
KLState<acc_t<scalar_t>> contiguous_row_state(const scalar_t* s, const scalar_t* t, int64_t len,
                                              acc_t<scalar_t> inv_tau) {
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  using acc = acc_t<scalar_t>;
  constexpr int64_t W = IO::kWidth;
  const V inv_tau_v(inv_tau);
  BlockAccumulator<V> blocks;
  V xs[kAcc], xt[kAcc];
  int64_t i = 0;
  for (; i + kAcc * W <= len; i += kAcc * W) {
    for (int k = 0; k < kAcc; ++k) {
      xs[k] = IO::load(s + i + k * W) * inv_tau_v;
      xt[k] = IO::load(t + i + k * W) * inv_tau_v;
    }
    blocks.add(xs, xt);
  }
  KLState<acc> lanes[W];
  blocks.lane_states(lanes);
  KLState<acc> state = kl_state_empty<acc>();
  for (int64_t j = 0; j < W; ++j) state = kl_merge(state, lanes[j]);
  for (; i < len; ++i) {
    kl_push(state, static_cast<acc>(s[i]) * inv_tau, static_cast<acc>(t[i]) * inv_tau);
  }
  return state;
}

// The states of `lanes` ≤ kWidth rows with consecutive channels (stride_c == 1) over `npix`
// pixels, one row per lane; s and t point at the first channel of the first pixel.
template <typename scalar_t>
void channel_group_states(const scalar_t* s, int64_t s_stride_l, const scalar_t* t,
                          int64_t t_stride_l, int64_t lanes, int64_t npix,
                          acc_t<scalar_t> inv_tau, KLState<acc_t<scalar_t>>* out) {
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  const V inv_tau_v(inv_tau);
  BlockAccumulator<V> blocks;
  V xs[kAcc], xt[kAcc];
  for (int64_t i = 0; i < npix; i += kAcc) {
    const int m = static_cast<int>(std::min<int64_t>(kAcc, npix - i));
    for (int k = 0; k < m; ++k) {
      xs[k] = IO::load(s + (i + k) * s_stride_l, lanes) * inv_tau_v;
      xt[k] = IO::load(t + (i + k) * t_stride_l, lanes) * inv_tau_v;
    }
    blocks.add(xs, xt, m);
  }
  blocks.lane_states(out);
}

// The student and teacher as the kernels read them.
struct PairView {
  Tensor s, t;
  RowStrides ss, ts;
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
  constexpr int64_t W = VecIO<scalar_t>::kWidth;
  const scalar_t* s = v.s.const_data_ptr<scalar_t>();
  const scalar_t* t = v.t.const_data_ptr<scalar_t>();
  const acc inv_tau = static_cast<acc>(1.0 / tau);
  const int64_t rows = v.n * v.c;

  // Partial states of each row, chunk by chunk, then merged in chunk order.
  int64_t chunks = 0;
  std::vector<KLState<acc>> partial;
  if (v.layout == Layout::kRows) {
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
  } else {
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
        channel_group_states(s + n * v.ss.n + c0 + l0 * v.ss.l, v.ss.l,
                             t + n * v.ts.n + c0 + l0 * v.ts.l, v.ts.l, lanes,
                             std::min(kPixelChunk, v.l - l0), inv_tau, lane_state);
        for (int64_t j = 0; j < lanes; ++j) {
          partial[(n * v.c + c0 + j) * chunks + chunk] = lane_state[j];
        }
      }
    });
  }

  acc* stats = row_stats.data_ptr<acc>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      KLState<acc> state = kl_state_empty<acc>();
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        state = kl_merge(state, partial[row * chunks + chunk]);
      }
      const KLRowStats<acc> r = kl_finalize(state);
      stats[3 * row] = r.lse_s;
      stats[3 * row + 1] = r.lse_t;
      stats[3 * row + 2] = r.kl;
    }
  });
  double total = 0.0;
  for (int64_t row = 0; row < rows; ++row) total += stats[3 * row + 2];
  *loss.data_ptr<acc>() = static_cast<acc>(total * tau * tau / static_cast<double>(rows));
}

// ---------------------------------------------------------------------------------------------
// channel_kl backward: one more read of s and t, each requested gradient written once

// The gradients at one vector of elements; g_s / g_t are null when not requested.
template <typename scalar_t>
inline void store_channel_grads(const at::vec::Vectorized<acc_t<scalar_t>>& xs,
                                const at::vec::Vectorized<acc_t<scalar_t>>& xt,
                                const KLRowStats<at::vec::Vectorized<acc_t<scalar_t>>>& row,
                                const at::vec::Vectorized<acc_t<scalar_t>>& scale, scalar_t* g_s,
                                scalar_t* g_t, int64_t count) {
  using IO = VecIO<scalar_t>;
  if (g_s != nullptr && g_t != nullptr) {
    typename IO::V grad_s, grad_t;
    kl_grad_both(xs, xt, row, scale, grad_s, grad_t);
    IO::store(g_s, grad_s, count);
    IO::store(g_t, grad_t, count);
  } else if (g_s != nullptr) {
    IO::store(g_s, kl_grad_student(xs, xt, row, scale), count);
  } else {
    IO::store(g_t, kl_grad_teacher(xs, xt, row, scale), count);
  }
}

template <typename scalar_t>
void channel_kl_backward_kernel(const PairView& v, const Tensor& row_stats, double tau,
                                double scale, GradOut* grad_s, GradOut* grad_t) {
  using acc = acc_t<scalar_t>;
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  constexpr int64_t W = IO::kWidth;
  const scalar_t* s = v.s.const_data_ptr<scalar_t>();
  const scalar_t* t = v.t.const_data_ptr<scalar_t>();
  scalar_t* gs = grad_s != nullptr ? grad_s->written.data_ptr<scalar_t>() : nullptr;
  scalar_t* gt = grad_t != nullptr ? grad_t->written.data_ptr<scalar_t>() : nullptr;
  const RowStrides gss = gs != nullptr ? *row_strides(grad_s->written) : RowStrides{0, 0, 0};
  const RowStrides gts = gt != nullptr ? *row_strides(grad_t->written) : RowStrides{0, 0, 0};
  const acc* stats = row_stats.const_data_ptr<acc>();
  const V inv_tau(static_cast<acc>(1.0 / tau));
  const V scale_v(static_cast<acc>(scale));

  if (v.layout == Layout::kRows) {
    const int64_t chunks = (v.l + kRowChunk - 1) / kRowChunk;
    at::parallel_for(0, v.n * v.c * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t row = item / chunks, l0 = (item % chunks) * kRowChunk;
        const int64_t n = row / v.c, c = row % v.c, len = std::min(kRowChunk, v.l - l0);
        const KLRowStats<V> r{V(stats[3 * row]), V(stats[3 * row + 1]), V(stats[3 * row + 2])};
        const scalar_t* sp = s + n * v.ss.n + c * v.ss.c + l0;
        const scalar_t* tp = t + n * v.ts.n + c * v.ts.c + l0;
        scalar_t* gsp = gs != nullptr ? gs + n * gss.n + c * gss.c + l0 : nullptr;
        scalar_t* gtp = gt != nullptr ? gt + n * gts.n + c * gts.c + l0 : nullptr;
        for (int64_t i = 0; i < len; i += W) {
          const int64_t count = std::min(W, len - i);
          store_channel_grads(IO::load(sp + i, count) * inv_tau, IO::load(tp + i, count) * inv_tau,
                              r, scale_v, gsp != nullptr ? gsp + i : nullptr,
                              gtp != nullptr ? gtp + i : nullptr, count);
        }
      }
    });
    return;
  }

  // Channels layout: a vector holds consecutive channels of one pixel, each its own row.
  const int64_t rows = v.n * v.c;
  std::vector<acc> lse_s(rows), lse_t(rows), kl(rows);
  for (int64_t row = 0; row < rows; ++row) {
    lse_s[row] = stats[3 * row];
    lse_t[row] = stats[3 * row + 1];
    kl[row] = stats[3 * row + 2];
  }
  const int64_t chunks = (v.l + kPixelChunk - 1) / kPixelChunk;
  at::parallel_for(0, v.n * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / chunks, l0 = (item % chunks) * kPixelChunk;
      const int64_t l1 = std::min(v.l, l0 + kPixelChunk);
      for (int64_t l = l0; l < l1; ++l) {
        for (int64_t c0 = 0; c0 < v.c; c0 += W) {
          const int64_t lanes = std::min(W, v.c - c0), row = n * v.c + c0;
          const KLRowStats<V> r{V::loadu(&lse_s[row], lanes), V::loadu(&lse_t[row], lanes),
                                V::loadu(&kl[row], lanes)};
          const V xs = IO::load(s + n * v.ss.n + c0 + l * v.ss.l, lanes) * inv_tau;
          const V xt = IO::load(t + n * v.ts.n + c0 + l * v.ts.l, lanes) * inv_tau;
          store_channel_grads(xs, xt, r, scale_v,
                              gs != nullptr ? gs + n * gss.n + c0 + l * gss.l : nullptr,
                              gt != nullptr ? gt + n * gts.n + c0 + l * gts.l : nullptr, lanes);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// pixel_kl: tiles of kWidth consecutive pixels of one image (one pixel per lane) × C channels

// Pixels [l0, l0 + count) of one image, τ-scaled, into buf as [C][kWidth]; lanes ≥ count are
// zero. x points at (n, 0, l0).
template <typename scalar_t>
void load_tile(const scalar_t* x, const RowStrides& st, int64_t channels, int64_t count,
               acc_t<scalar_t> inv_tau, acc_t<scalar_t>* buf) {
  using IO = VecIO<scalar_t>;
  constexpr int64_t W = IO::kWidth;
  if (st.l == 1) {
    const typename IO::V inv_tau_v(inv_tau);
    for (int64_t c = 0; c < channels; ++c) {
      (IO::load(x + c * st.c, count) * inv_tau_v).store(buf + c * W);
    }
    return;
  }
  std::fill(buf, buf + channels * W, acc_t<scalar_t>(0));
  for (int64_t j = 0; j < count; ++j) {
    for (int64_t c = 0; c < channels; ++c) {
      buf[c * W + j] = static_cast<acc_t<scalar_t>>(x[c * st.c + j * st.l]) * inv_tau;
    }
  }
}

// Lanes [0, count) of a [C][kWidth] tile into pixels [l0, l0 + count); x points at (n, 0, l0).
template <typename scalar_t>
void store_tile(const acc_t<scalar_t>* buf, scalar_t* x, const RowStrides& st, int64_t channels,
                int64_t count) {
  using IO = VecIO<scalar_t>;
  constexpr int64_t W = IO::kWidth;
  if (st.l == 1) {
    for (int64_t c = 0; c < channels; ++c) {
      IO::store(x + c * st.c, IO::V::loadu(buf + c * W), count);
    }
    return;
  }
  for (int64_t j = 0; j < count; ++j) {
    for (int64_t c = 0; c < channels; ++c) {
      x[c * st.c + j * st.l] = static_cast<scalar_t>(buf[c * W + j]);
    }
  }
}

// The per-pixel states of a tile: a max pass, then a pass adding the exps (kept in es, et
// when those are given, for the gradient pass).
template <typename acc>
KLState<at::vec::Vectorized<acc>> tile_state(const acc* xs, const acc* xt, int64_t channels,
                                             acc* es, acc* et) {
  using V = at::vec::Vectorized<acc>;
  using M = KLMath<V>;
  constexpr int64_t W = V::size();
  V ms = V::loadu(xs), mt = V::loadu(xt);
  for (int64_t c = 1; c < channels; ++c) {
    ms = M::max(ms, V::loadu(xs + c * W));
    mt = M::max(mt, V::loadu(xt + c * W));
  }
  KLState<V> state = kl_state_at(ms, mt);
  for (int64_t c = 0; c < channels; ++c) {
    const V ds = V::loadu(xs + c * W) - ms;
    const V dt = V::loadu(xt + c * W) - mt;
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
  Tensor labels;                    // int64; undefined: every pixel is valid
  const int64_t* target = nullptr;
  int64_t target_stride_n = 0, target_stride_l = 0;
  int64_t ignore_index = 0;

  // valid[j]: whether pixel l0 + j of image n counts (false for j ≥ count); returns how many do.
  template <int64_t W>
  int64_t valid_lanes(int64_t n, int64_t l0, int64_t count, bool (&valid)[W]) const {
    int64_t how_many = 0;
    for (int64_t j = 0; j < W; ++j) {
      valid[j] = j < count &&
                 (target == nullptr ||
                  target[n * target_stride_n + (l0 + j) * target_stride_l] != ignore_index);
      how_many += valid[j];
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

  std::vector<double> tile_kl(p.n * tiles);
  std::vector<int64_t> tile_valid(p.n * tiles);
  at::parallel_for(0, p.n * tiles, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc> buf(2 * p.c * W);
    acc* xs = buf.data();
    acc* xt = xs + p.c * W;
    bool valid[W];
    acc kl[W];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / tiles, l0 = (item % tiles) * W, count = std::min(W, p.l - l0);
      tile_valid[item] = v.valid_lanes(n, l0, count, valid);
      tile_kl[item] = 0.0;
      if (tile_valid[item] == 0) continue;
      load_tile(s + n * p.ss.n + l0 * p.ss.l, p.ss, p.c, count, inv_tau, xs);
      load_tile(t + n * p.ts.n + l0 * p.ts.l, p.ts, p.c, count, inv_tau, xt);
      kl_finalize(tile_state<acc>(xs, xt, p.c, nullptr, nullptr)).kl.store(kl);
      double sum = 0.0;
      for (int64_t j = 0; j < count; ++j) sum += valid[j] ? static_cast<double>(kl[j]) : 0.0;
      tile_kl[item] = sum;
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
void pixel_kl_backward_kernel(const PixelView& v, double tau, double scale, GradOut* grad_s,
                              GradOut* grad_t) {
  using acc = acc_t<scalar_t>;
  using V = at::vec::Vectorized<acc>;
  constexpr int64_t W = V::size();
  const PairView& p = v.pair;
  const scalar_t* s = p.s.const_data_ptr<scalar_t>();
  const scalar_t* t = p.t.const_data_ptr<scalar_t>();
  scalar_t* gs = grad_s != nullptr ? grad_s->written.data_ptr<scalar_t>() : nullptr;
  scalar_t* gt = grad_t != nullptr ? grad_t->written.data_ptr<scalar_t>() : nullptr;
  const RowStrides gss = gs != nullptr ? *row_strides(grad_s->written) : RowStrides{0, 0, 0};
  const RowStrides gts = gt != nullptr ? *row_strides(grad_t->written) : RowStrides{0, 0, 0};
  const acc inv_tau = static_cast<acc>(1.0 / tau);
  const int64_t tiles = (p.l + W - 1) / W;

  at::parallel_for(0, p.n * tiles, 16, [&](int64_t begin, int64_t end) {
    // xs, xt: τ-scaled logits; es, et: exps of the shifted logits, then the gradients.
    std::vector<acc> buf(4 * p.c * W);
    acc* xs = buf.data();
    acc* xt = xs + p.c * W;
    acc* es = xt + p.c * W;
    acc* et = es + p.c * W;
    bool valid[W];
    acc lane_scale[W];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / tiles, l0 = (item % tiles) * W, count = std::min(W, p.l - l0);
      if (v.valid_lanes(n, l0, count, valid) == 0) {
        std::fill(es, es + 2 * p.c * W, acc(0));
      } else {
        for (int64_t j = 0; j < W; ++j) lane_scale[j] = valid[j] ? static_cast<acc>(scale) : acc(0);
        const V scale_v = V::loadu(lane_scale);
        load_tile(s + n * p.ss.n + l0 * p.ss.l, p.ss, p.c, count, inv_tau, xs);
        load_tile(t + n * p.ts.n + l0 * p.ts.l, p.ts, p.c, count, inv_tau, xt);
        const KLState<V> state = tile_state<acc>(xs, xt, p.c, es, et);
        const KLRowStats<V> r = kl_finalize(state);
        const V inv_zs = V(acc(1)) / state.zs, inv_zt = V(acc(1)) / state.zt;
        for (int64_t c = 0; c < p.c; ++c) {
          const V q = V::loadu(es + c * W) * inv_zs;
          const V prob = V::loadu(et + c * W) * inv_zt;
          kl_grad_student_at(q, prob, scale_v).store(es + c * W);
          kl_grad_teacher_at(prob, V::loadu(xt + c * W) - r.lse_t, V::loadu(xs + c * W) - r.lse_s,
                             r.kl, scale_v)
              .store(et + c * W);
        }
      }
      if (gs != nullptr) store_tile(es, gs + n * gss.n + l0 * gss.l, gss, p.c, count);
      if (gt != nullptr) store_tile(et, gt + n * gts.n + l0 * gts.l, gts, p.c, count);
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
  Tensor row_stats = at::empty({v.n * v.c, 3}, stats_options);
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
  TORCH_CHECK_VALUE(row_stats.dim() == 2 && row_stats.size(0) == rows && row_stats.size(1) == 3,
                    "row_stats must have shape (N*C, 3) = (", rows, ", 3), got ",
                    row_stats.sizes());
  TORCH_CHECK_TYPE(row_stats.scalar_type() == acc_dtype(student), "row_stats must be ",
                   acc_dtype(student), ", got ", row_stats.scalar_type());
  const double g = scalar_of("grad_loss", grad_loss);
  const Tensor none = at::empty({0}, student.options());
  if (!student_requires_grad && !teacher_requires_grad) return {none, none};

  const Layout layout = layout_of(student);
  const PairView v = pair_view(student, teacher, layout);
  const Tensor stats = row_stats.contiguous();
  std::optional<GradOut> grad_s, grad_t;
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
  std::optional<GradOut> grad_s, grad_t;
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
