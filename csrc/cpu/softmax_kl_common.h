// Shared by the CPU softmax-KL kernels (csrc/cpu/channel_kl.cpp, pixel_kl.cpp,
// resized_pixel_kl.cpp): SIMD math, layouts, the pair and pixel-tile views, argument checks.
// Each including file gets its own copy (anonymous namespace, CPU_CAPABILITY inline
// namespace): include it first, before any ATen header.
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
#pragma once


#include "cpu/simd_capability.h"  // first: it sets at::vec's SIMD target

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

inline bool fits(const Tensor& x, Layout layout) {
  const auto strides = row_strides(x);
  if (!strides) return false;
  switch (layout) {
    case Layout::kRows: return strides->l == 1;
    case Layout::kChannels: return strides->c == 1;
    case Layout::kAny: return true;
  }
  return false;
}

inline Tensor empty_in_layout(const Tensor& x, Layout layout) {
  if (layout != Layout::kChannels) return at::empty(x.sizes(), x.options());
  return at::empty_like(x.movedim(1, -1), at::MemoryFormat::Contiguous).movedim(-1, 1);
}

// x itself when it can be read in `layout`, else a copy in it.
inline Tensor in_layout(const Tensor& x, Layout layout) {
  if (fits(x, layout)) return x;
  return empty_in_layout(x, layout).copy_(x);
}

// The channel_kl layout the student is in (rows when it is in neither: it is then copied).
inline Layout layout_of(const Tensor& student) {
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

// The requested gradients of a student/teacher pair (each an empty tensor when not requested).
struct PairGradOut {
  std::optional<LayoutGradOut> s, t;

  PairGradOut(const Tensor& student, const Tensor& teacher, bool student_requires_grad,
              bool teacher_requires_grad, Layout layout) {
    if (student_requires_grad) s.emplace(student, layout);
    if (teacher_requires_grad) t.emplace(teacher, layout);
  }
  LayoutGradOut* student() { return s ? &*s : nullptr; }
  LayoutGradOut* teacher() { return t ? &*t : nullptr; }
  // (grad_student, grad_teacher) once the kernel has written them.
  std::tuple<Tensor, Tensor> finish(const Tensor& none) {
    if (s) s->finish();
    if (t) t->finish();
    return {s ? s->result : none, t ? t->result : none};
  }
};

// The student and teacher as the kernels read them.
struct PairView {
  Tensor s, t;
  Strides3 ss, ts;
  int64_t n, c, l;
  Layout layout;
};

inline PairView pair_view(const Tensor& student, const Tensor& teacher, Layout layout) {
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

inline PixelView pixel_view(const Tensor& student, const Tensor& teacher,
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

// ---------------------------------------------------------------------------------------------
// Argument checks of the op entry points

inline void check_pair(const Tensor& student, const Tensor& teacher) {
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

inline void check_tau(double tau) {
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, "tau must be finite and > 0, got ", tau);
}

// target: integer labels of shape (N, *spatial), spatial the student's (or `spatial` when given:
// resized_pixel_kl's output size), on the student's device.
inline void check_target(const std::optional<Tensor>& target, const Tensor& student,
                         std::optional<at::IntArrayRef> spatial = std::nullopt) {
  if (!target.has_value()) return;
  TORCH_CHECK_TYPE(at::isIntegralType(target->scalar_type(), /*includeBool=*/false),
                   "target must be an integer tensor, got ", target->scalar_type());
  std::vector<int64_t> expected{student.size(0)};
  const at::IntArrayRef rest = spatial ? *spatial : student.sizes().slice(2);
  expected.insert(expected.end(), rest.begin(), rest.end());
  TORCH_CHECK_VALUE(target->sizes() == at::IntArrayRef(expected), "target must have shape ",
                    at::IntArrayRef(expected), spatial ? " (N, *size)" : " (N, *spatial of student)",
                    ", got ", target->sizes());
  TORCH_CHECK_VALUE(target->device() == student.device(),
                    "target must be on the device of student (", student.device(), "), got ",
                    target->device());
}

inline at::ScalarType acc_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline double scalar_of(const char* name, const Tensor& x) {
  TORCH_CHECK_VALUE(x.numel() == 1, name, " must hold one element, got shape ", x.sizes());
  return x.item<double>();
}

}  // namespace
}  // namespace cpu
}  // namespace kdops
