// Torch-free math of the spatial attention maps (kdops::attention_reduce), shared by the CPU and
// CUDA kernels. Specification: kdops/reference/attention.py.
//
//   a[n, l] = scale · Σ_c |x[n, c, l]|^p,      scale = 1 ("sum") or 1/C ("mean"),
//   ∂a/∂x   = scale · p·|x|^(p−1)·sign(x),
//
// with the derivative taken as 0 at x = 0 for every p > 0: sign(0) = 0, the subgradient of |x|
// that autograd uses at p = 1 and the limit for p > 1. For 0 < p < 1 the derivative is unbounded
// near 0 and the reference's autograd gives 0·∞ = NaN at an exact zero; the kernels give 0, so a
// ReLU feature map (many exact zeros) trains at p = 0.5.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define KDOPS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define KDOPS_HOST_DEVICE inline
#endif

namespace kdops {

// The exponents with a pow-free form; every other p > 0 goes through exp2(p·log2|x|).
enum class PowerKind : int { kAbs = 1, kSquare = 2, kCube = 3, kGeneral = 0 };

inline PowerKind power_kind(double p) {
  if (p == 1.0) return PowerKind::kAbs;
  if (p == 2.0) return PowerKind::kSquare;
  if (p == 3.0) return PowerKind::kCube;
  return PowerKind::kGeneral;
}

// |v|^p.
template <typename T>
KDOPS_HOST_DEVICE T abs_power(T v, T p, PowerKind kind) {
  const T a = v < T(0) ? -v : v;
  switch (kind) {
    case PowerKind::kAbs: return a;
    case PowerKind::kSquare: return v * v;
    case PowerKind::kCube: return a * v * v;
    default: return a == T(0) ? T(0) : static_cast<T>(pow(a, p));
  }
}

// d|v|^p / dv = p·|v|^(p−1)·sign(v), 0 at v = 0.
template <typename T>
KDOPS_HOST_DEVICE T abs_power_grad(T v, T p, PowerKind kind) {
  switch (kind) {
    case PowerKind::kAbs: return v > T(0) ? T(1) : (v < T(0) ? T(-1) : T(0));
    case PowerKind::kSquare: return T(2) * v;
    case PowerKind::kCube: return T(3) * v * (v < T(0) ? -v : v);
    default: {
      if (v == T(0)) return T(0);
      const T a = v < T(0) ? -v : v;
      const T d = p * static_cast<T>(pow(a, p - T(1)));
      return v < T(0) ? -d : d;
    }
  }
}

}  // namespace kdops
