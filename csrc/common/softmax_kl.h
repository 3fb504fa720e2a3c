// Math of the softmax-normalised KL shared by the CPU and CUDA kernels (no torch, no CUDA
// runtime): the one-pass ("online") state of a row, its merge, the row statistics and the
// per-element gradients.
//
// Notation: a row holds student logits s and teacher logits t (raw, unscaled), k = 1/τ;
// q = softmax(k·s), p = softmax(k·t), KL = Σ p (log p − log q).
//
// Shift-safe: every exponent is formed AFTER the shift, in input units, then scaled:
//   ds = (s − ms)·k,  dt = (t − mt)·k,
// where ms, mt (the state's "maxima") are raw logits of the row. Forming k·s first and then
// subtracting would round k·s at the magnitude of the logits (|k·s| ~ 1e4 in float32: an
// absolute error ~1e-3 in every exponent); s − ms is exact when s and ms are close and rounds
// only at the magnitude of the difference otherwise. For the same reason the row statistics
// keep each maximum and log-sum apart ([ms, log zs, mt, log zt, KL]): their sum ms·k + log zs,
// rounded to one float, would lose those digits again in the backward.
//
// The state of a partly read row:
//   zs = Σ e^{ds},  zt = Σ e^{dt},  w = Σ e^{dt} (dt − ds).
// Then log q = ds − log zs, log p = dt − log zt and
//   KL = Σ p (log p − log q) = w/zt − log zt + log zs,
// so one pass over the row gives the KL. Raising the maxima to ms' ≥ ms, mt' ≥ mt rescales:
//   zs' = zs e^{(ms−ms')k},  zt' = α zt,  w' = α w + α zt ((ms'−ms) − (mt'−mt)) k,  α = e^{(mt−mt')k}.
// Every term of w is a difference of logits within the row, never of absolute magnitudes, so
// KL stays accurate when s ≈ t + const (all terms vanish instead of cancelling).
//
// The maxima need not be exact: a state stays valid while its elements exceed its maxima by at
// most kKLSlack after scaling (e^8 ≈ 3e3 keeps every sum far from overflow), so streams rescale
// only when an element overshoots by more, not at every new maximum.
//
// Infinities. A teacher logit of −inf is a probability of exactly 0: its term of w is 0 (not
// 0·(−inf)), so the loss stays finite, and its teacher gradient is 0. A student logit of −inf
// where p > 0 makes the KL +inf (not NaN). Maxima are kept finite (kKLLowest at least), so that
// a row that starts with −inf never forms −inf − (−inf); a rescale from such a maximum adds
// nothing where the teacher has no mass yet.
//
// The functions are templates over the value type T so that one formula serves scalars
// (float, double: CUDA threads, CPU tails and merges) and SIMD vectors (the CPU kernels
// specialise KLMath for at::vec::Vectorized, one row or one pixel per lane).
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define KDOPS_HD __host__ __device__ __forceinline__
#else
#define KDOPS_HD inline
#endif

namespace kdops {

// exp, log, max and a masked select of a value type; specialised by the CPU kernels for SIMD
// vectors.
template <typename T>
struct KLMath;

template <>
struct KLMath<float> {
  static KDOPS_HD float exp(float x) {
#if defined(__CUDA_ARCH__)
    return __expf(x);  // ex2.approx: a few ulp for the arguments here (≤ kKLSlack); 0 at −inf
#else
    return std::exp(x);
#endif
  }
  static KDOPS_HD float log(float x) {
#if defined(__CUDA_ARCH__)
    return __logf(x);
#else
    return std::log(x);
#endif
  }
  static KDOPS_HD float max(float a, float b) { return a > b ? a : b; }
  // value where weight > 0, else 0 (also when value is NaN or infinite).
  static KDOPS_HD float where_positive(float weight, float value) {
    return weight > 0.f ? value : 0.f;
  }
};

template <>
struct KLMath<double> {
  static KDOPS_HD double exp(double x) { return ::exp(x); }
  static KDOPS_HD double log(double x) { return ::log(x); }
  static KDOPS_HD double max(double a, double b) { return a > b ? a : b; }
  static KDOPS_HD double where_positive(double weight, double value) {
    return weight > 0.0 ? value : 0.0;
  }
};

// How far elements may exceed their state's maxima after scaling (see the top of the file).
constexpr float kKLSlack = 8.0f;
// The lowest value a state's maximum takes: a row of −inf logits (so far) gets a finite maximum.
constexpr float kKLLowest = -FLT_MAX;

// The one-pass state of a row (see the top of the file); ms, mt in raw units. A state with
// zs = zt = 0 holds no element (or only elements of probability 0 in both rows) and is empty.
template <typename T>
struct KLState {
  T ms, zs, mt, zt, w;
};

// The per-row results: the maxima (raw units) and log-sums of the state, and the row's KL(p‖q).
// log q = (s − ms)·k − log_zs, log p = (t − mt)·k − log_zt. channel_kl saves them per row as
// kKLRowStats numbers in this order (its row_stats output, (N·C, 5)).
template <typename T>
struct KLRowStats {
  T ms, log_zs, mt, log_zt, kl;
};
constexpr int kKLRowStats = 5;

// A state with no element and no maxima yet (kl_push and kl_merge start from it).
template <typename T>
KDOPS_HD KLState<T> kl_state_empty() {
  return KLState<T>{T(0), T(0), T(0), T(0), T(0)};
}

// Whether a state holds nothing (NaN sums are not empty: they propagate).
template <typename T>
KDOPS_HD bool kl_is_empty(const KLState<T>& st) {
  return st.zs == T(0) && st.zt == T(0);
}

// A raw logit as a state's maximum: at least kKLLowest (finite).
template <typename T>
KDOPS_HD T kl_floor(T x) {
  return KLMath<T>::max(x, T(kKLLowest));
}

// A state with no element yet, with given maxima (every element to come must satisfy
// (x − maximum)·k ≤ kKLSlack).
template <typename T>
KDOPS_HD KLState<T> kl_state_at(T ms, T mt) {
  return KLState<T>{kl_floor(ms), T(0), kl_floor(mt), T(0), T(0)};
}

// Adds one element given its shifted, scaled logits ds = (s − st.ms)·k, dt = (t − st.mt)·k and
// their exps (for callers that keep the exps for a gradient pass).
template <typename T>
KDOPS_HD void kl_add_terms(KLState<T>& st, T ds, T dt, T es, T et) {
  st.zs = st.zs + es;
  st.zt = st.zt + et;
  st.w = st.w + KLMath<T>::where_positive(et, et * (dt - ds));  // p = 0: no term, whatever s is
}

// Adds one element (raw logits s, t); requires (s − st.ms)·k ≤ kKLSlack, (t − st.mt)·k ≤ kKLSlack.
template <typename T>
KDOPS_HD void kl_add(KLState<T>& st, T s, T t, T k) {
  using M = KLMath<T>;
  const T ds = (s - st.ms) * k;
  const T dt = (t - st.mt) * k;
  kl_add_terms(st, ds, dt, M::exp(ds), M::exp(dt));
}

// Raises the maxima to ms ≥ st.ms, mt ≥ st.mt (raw units; both finite, as kl_floor makes them).
template <typename T>
KDOPS_HD void kl_rebase(KLState<T>& st, T ms, T mt, T k) {
  using M = KLMath<T>;
  const T alpha = M::exp((st.mt - mt) * k);
  const T zt = alpha * st.zt;
  // A maximum raised from kKLLowest can make the shift infinite: it only matters where the
  // teacher already has mass (then the student had −inf there, and w is +inf already).
  const T shift = ((ms - st.ms) - (mt - st.mt)) * k;
  st.w = alpha * st.w + M::where_positive(zt, zt * shift);
  st.zt = zt;
  st.zs = M::exp((st.ms - ms) * k) * st.zs;
  st.ms = ms;
  st.mt = mt;
}

// Whether elements up to (s, t) (raw) need the state's maxima raised first.
template <typename T>
KDOPS_HD bool kl_overshoots(const KLState<T>& st, T s, T t, T k) {
  return (s - st.ms) * k > T(kKLSlack) || (t - st.mt) * k > T(kKLSlack);
}

// Scalar streaming: adds one element (raw logits), raising the maxima when it overshoots them.
template <typename T>
KDOPS_HD void kl_push(KLState<T>& st, T s, T t, T k) {
  if (kl_is_empty(st)) {
    st = kl_state_at(s, t);
  } else if (kl_overshoots(st, s, t, k)) {
    kl_rebase(st, KLMath<T>::max(st.ms, s), KLMath<T>::max(st.mt, t), k);
  }
  kl_add(st, s, t, k);
}

// The state of the union of two disjoint parts of a row (either may be empty).
template <typename T>
KDOPS_HD KLState<T> kl_merge(KLState<T> a, KLState<T> b, T k) {
  if (kl_is_empty(b)) return a;
  if (kl_is_empty(a)) return b;
  const T ms = KLMath<T>::max(a.ms, b.ms);
  const T mt = KLMath<T>::max(a.mt, b.mt);
  kl_rebase(a, ms, mt, k);
  kl_rebase(b, ms, mt, k);
  return KLState<T>{ms, a.zs + b.zs, mt, a.zt + b.zt, a.w + b.w};
}

template <typename T>
KDOPS_HD KLRowStats<T> kl_finalize(const KLState<T>& st) {
  using M = KLMath<T>;
  const T log_zs = M::log(st.zs);
  const T log_zt = M::log(st.zt);
  return KLRowStats<T>{st.ms, log_zs, st.mt, log_zt, st.w / st.zt + (log_zs - log_zt)};
}

// The KL of a complete row alone, with one log: w/zt + log(zs/zt).
template <typename T>
KDOPS_HD T kl_of(const KLState<T>& st) {
  return st.w / st.zt + KLMath<T>::log(st.zs / st.zt);
}

// Gradients of scale · KL(p‖q) of one row with respect to its scaled logits k·s, k·t, at one
// element (the caller folds 1/τ, the loss weight and the incoming gradient into scale):
//   ∂/∂(k·s) = scale · (q − p),   ∂/∂(k·t) = scale · p (log p − log q − KL)  (0 where p = 0).
// The *_at forms take the element's probabilities; the others recompute them from the raw
// logits and the row's statistics.
template <typename T>
KDOPS_HD T kl_grad_student_at(T q, T p, T scale) {
  return scale * (q - p);
}

template <typename T>
KDOPS_HD T kl_grad_teacher_at(T p, T log_p, T log_q, T kl, T scale) {
  return KLMath<T>::where_positive(p, scale * p * ((log_p - log_q) - kl));
}

// log q and log p of one element (raw logits s, t).
template <typename T>
KDOPS_HD T kl_log_q(T s, const KLRowStats<T>& row, T k) {
  return (s - row.ms) * k - row.log_zs;
}

template <typename T>
KDOPS_HD T kl_log_p(T t, const KLRowStats<T>& row, T k) {
  return (t - row.mt) * k - row.log_zt;
}

template <typename T>
KDOPS_HD T kl_grad_student(T s, T t, const KLRowStats<T>& row, T k, T scale) {
  using M = KLMath<T>;
  return kl_grad_student_at(M::exp(kl_log_q(s, row, k)), M::exp(kl_log_p(t, row, k)), scale);
}

template <typename T>
KDOPS_HD T kl_grad_teacher(T s, T t, const KLRowStats<T>& row, T k, T scale) {
  const T log_p = kl_log_p(t, row, k);
  return kl_grad_teacher_at(KLMath<T>::exp(log_p), log_p, kl_log_q(s, row, k), row.kl, scale);
}

// Both gradients at one element, sharing p.
template <typename T>
KDOPS_HD void kl_grad_both(T s, T t, const KLRowStats<T>& row, T k, T scale, T& grad_s, T& grad_t) {
  using M = KLMath<T>;
  const T log_p = kl_log_p(t, row, k);
  const T log_q = kl_log_q(s, row, k);
  const T p = M::exp(log_p);
  grad_s = kl_grad_student_at(M::exp(log_q), p, scale);
  grad_t = kl_grad_teacher_at(p, log_p, log_q, row.kl, scale);
}

}  // namespace kdops
