// Math of the softmax-normalised KL shared by the CPU and CUDA kernels (no torch, no CUDA
// runtime): the one-pass ("online") state of a row, its merge, the row statistics and the
// per-element gradients.
//
// Notation: a row holds the τ-scaled logits xs = s/τ (student) and xt = t/τ (teacher);
// q = softmax(xs), p = softmax(xt), KL = Σ p (log p − log q).
//
// The state of a partly read row, for reference values ("maxima") ms ≈ max xs, mt ≈ max xt:
//   zs = Σ e^{xs−ms},  zt = Σ e^{xt−mt},  w = Σ e^{xt−mt} ((xt−mt) − (xs−ms)).
// Then log q = (xs−ms) − log zs, log p = (xt−mt) − log zt and
//   KL = Σ p (log p − log q) = w/zt − log zt + log zs,
// so one pass over the row gives the KL. Raising the maxima to ms' ≥ ms, mt' ≥ mt rescales:
//   zs' = zs e^{ms−ms'},  zt' = α zt,  w' = α (w + ((ms'−ms) − (mt'−mt)) zt),  α = e^{mt−mt'}.
// Every term of w is a difference of logits within the row, never of absolute magnitudes, so
// KL stays accurate when s ≈ t + const (all terms vanish instead of cancelling).
//
// The maxima need not be exact: a state stays valid while its elements exceed its maxima by at
// most kKLSlack (e^8 ≈ 3e3 keeps every sum far from overflow), so streams rescale only when an
// element overshoots by more, not at every new maximum.
//
// The functions are templates over the value type T so that one formula serves scalars
// (float, double: CUDA threads, CPU tails and merges) and SIMD vectors (the CPU kernels
// specialise KLMath for at::vec::Vectorized, one row or one pixel per lane).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define KDOPS_HD __host__ __device__ __forceinline__
#else
#define KDOPS_HD inline
#endif

namespace kdops {

// exp, log and max of a value type; specialised by the CPU kernels for SIMD vectors.
template <typename T>
struct KLMath;

template <>
struct KLMath<float> {
  static KDOPS_HD float exp(float x) {
#if defined(__CUDA_ARCH__)
    return __expf(x);  // ex2.approx: a few ulp for the arguments here (≤ kKLSlack)
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
};

template <>
struct KLMath<double> {
  static KDOPS_HD double exp(double x) { return ::exp(x); }
  static KDOPS_HD double log(double x) { return ::log(x); }
  static KDOPS_HD double max(double a, double b) { return a > b ? a : b; }
};

// How far elements may exceed their state's maxima (see the top of the file).
constexpr float kKLSlack = 8.0f;

// The one-pass state of a row (see the top of the file). An empty state has zs = zt = 0.
template <typename T>
struct KLState {
  T ms, zs, mt, zt, w;
};

// The per-row results: log-sum-exps of the τ-scaled logits and the row's KL(p‖q).
template <typename T>
struct KLRowStats {
  T lse_s, lse_t, kl;
};

// A state with no element and no maxima yet (kl_push and kl_merge start from it).
template <typename T>
KDOPS_HD KLState<T> kl_state_empty() {
  return KLState<T>{T(0), T(0), T(0), T(0), T(0)};
}

// A state with no element yet, with given maxima (every element to come ≤ maxima + kKLSlack).
template <typename T>
KDOPS_HD KLState<T> kl_state_at(T ms, T mt) {
  return KLState<T>{ms, T(0), mt, T(0), T(0)};
}

// Adds one element given its shifted logits ds = xs − st.ms, dt = xt − st.mt and their exps
// (for callers that keep the exps for a gradient pass).
template <typename T>
KDOPS_HD void kl_add_terms(KLState<T>& st, T ds, T dt, T es, T et) {
  st.zs = st.zs + es;
  st.zt = st.zt + et;
  st.w = st.w + et * (dt - ds);
}

// Adds one element; requires xs ≤ st.ms + kKLSlack and xt ≤ st.mt + kKLSlack.
template <typename T>
KDOPS_HD void kl_add(KLState<T>& st, T xs, T xt) {
  using M = KLMath<T>;
  const T ds = xs - st.ms;
  const T dt = xt - st.mt;
  kl_add_terms(st, ds, dt, M::exp(ds), M::exp(dt));
}

// Raises the maxima to ms ≥ st.ms, mt ≥ st.mt. The state's maxima must be finite: they are
// for a state made by kl_state_at; kl_push and kl_merge guard the empty state.
template <typename T>
KDOPS_HD void kl_rebase(KLState<T>& st, T ms, T mt) {
  using M = KLMath<T>;
  const T alpha = M::exp(st.mt - mt);
  st.w = alpha * (st.w + ((ms - st.ms) - (mt - st.mt)) * st.zt);
  st.zt = alpha * st.zt;
  st.zs = M::exp(st.ms - ms) * st.zs;
  st.ms = ms;
  st.mt = mt;
}

// Whether elements up to (xs, xt) need the state's maxima raised first.
template <typename T>
KDOPS_HD bool kl_overshoots(const KLState<T>& st, T xs, T xt) {
  return xs > st.ms + T(kKLSlack) || xt > st.mt + T(kKLSlack);
}

// Scalar streaming: adds one element, raising the maxima when it overshoots them.
template <typename T>
KDOPS_HD void kl_push(KLState<T>& st, T xs, T xt) {
  if (!(st.zt > T(0))) {
    st = kl_state_at(xs, xt);
  } else if (kl_overshoots(st, xs, xt)) {
    kl_rebase(st, KLMath<T>::max(st.ms, xs), KLMath<T>::max(st.mt, xt));
  }
  kl_add(st, xs, xt);
}

// The state of the union of two disjoint parts of a row (either may be empty).
template <typename T>
KDOPS_HD KLState<T> kl_merge(KLState<T> a, KLState<T> b) {
  if (!(b.zt > T(0))) return a;
  if (!(a.zt > T(0))) return b;
  const T ms = KLMath<T>::max(a.ms, b.ms);
  const T mt = KLMath<T>::max(a.mt, b.mt);
  kl_rebase(a, ms, mt);
  kl_rebase(b, ms, mt);
  return KLState<T>{ms, a.zs + b.zs, mt, a.zt + b.zt, a.w + b.w};
}

template <typename T>
KDOPS_HD KLRowStats<T> kl_finalize(const KLState<T>& st) {
  using M = KLMath<T>;
  const T log_zs = M::log(st.zs);
  const T log_zt = M::log(st.zt);
  return KLRowStats<T>{st.ms + log_zs, st.mt + log_zt, st.w / st.zt + (log_zs - log_zt)};
}

// The KL of a complete row alone, with one log: w/zt + log(zs/zt).
template <typename T>
KDOPS_HD T kl_of(const KLState<T>& st) {
  return st.w / st.zt + KLMath<T>::log(st.zs / st.zt);
}

// Gradients of scale · KL(p‖q) of one row with respect to its τ-scaled logits, at one
// element (the caller folds 1/τ, the loss weight and the incoming gradient into scale):
//   ∂/∂xs = scale · (q − p),   ∂/∂xt = scale · p (log p − log q − KL).
// The *_at forms take the element's probabilities; the others recompute them from the row's
// log-sum-exps.
template <typename T>
KDOPS_HD T kl_grad_student_at(T q, T p, T scale) {
  return scale * (q - p);
}

template <typename T>
KDOPS_HD T kl_grad_teacher_at(T p, T log_p, T log_q, T kl, T scale) {
  return scale * p * ((log_p - log_q) - kl);
}

template <typename T>
KDOPS_HD T kl_grad_student(T xs, T xt, const KLRowStats<T>& row, T scale) {
  using M = KLMath<T>;
  return kl_grad_student_at(M::exp(xs - row.lse_s), M::exp(xt - row.lse_t), scale);
}

template <typename T>
KDOPS_HD T kl_grad_teacher(T xs, T xt, const KLRowStats<T>& row, T scale) {
  const T log_p = xt - row.lse_t;
  return kl_grad_teacher_at(KLMath<T>::exp(log_p), log_p, xs - row.lse_s, row.kl, scale);
}

// Both gradients at one element, sharing p.
template <typename T>
KDOPS_HD void kl_grad_both(T xs, T xt, const KLRowStats<T>& row, T scale, T& grad_s, T& grad_t) {
  using M = KLMath<T>;
  const T log_p = xt - row.lse_t;
  const T log_q = xs - row.lse_s;
  const T p = M::exp(log_p);
  grad_s = kl_grad_student_at(M::exp(log_q), p, scale);
  grad_t = kl_grad_teacher_at(p, log_p, log_q, row.kl, scale);
}

}  // namespace kdops
