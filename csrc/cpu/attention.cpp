// CPU kernels of kdops::attention_reduce and kdops::class_attention_scores (forward and backward
// ops) and their registration for the CPU dispatch key. Math: csrc/common/attention.h;
// specification: kdops/reference/attention.py. The map-sized steps of the attention ops (resize,
// spatial normalisation, squared difference) run on the maps in kdops/ops/attention.py.
//
// attention_reduce reads x as (N, C, L) through int64 element strides and writes the float32
// (float64 for float64 x) map a[n, l] = scale·Σ_c |x[n, c, l]|^p: one read of x, no temporary of
// its size. Its backward reads x once more and writes grad_x = g[n, l]·scale·∂|x|^p/∂x once.
// Layouts, each without a copy:
//   rows      (stride_l == 1, contiguous NCHW): SIMD lanes run along L; a chunk of the map stays
//             in L1 while the channels stream past it, kUnroll rows at a time;
//   channels  (stride_c == 1, channels_last):  SIMD lanes run across C, one pixel at a time;
//   any       (other strides that merge the spatial dims): scalar loop.
// Inputs whose spatial dims do not merge into one stride are copied once (contiguous).
//
// Determinism: every map element (and every gradient element) is computed by one thread in a
// fixed order that does not depend on the thread count.
//
// class_attention_scores is a GEMM: at::mm / at::bmm (float32-accurate MKL/oneDNN sgemm on
// CPU — no TF32 there) with the bias and the ReLU applied in place on the (N, K, L) product.
// 16-bit inputs are converted one image at a time, so no float32 copy of the batch is made.

// at::vec compiles its SIMD specialisations only where a CPU_CAPABILITY_* macro is set (see
// csrc/cpu/softmax_kl.cpp): set it from the compiler's target, with a namespace of its own.
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

#include "common/attention.h"
#include "common/tensor_layout.h"

namespace kdops {
namespace cpu {
namespace {

using at::Tensor;

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;  // float for 16/32-bit inputs, double for float64

at::ScalarType acc_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

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

// |x|^p and its derivative on SIMD vectors (csrc/common/attention.h on scalars).
template <typename T>
struct VecPower {
  using V = at::vec::Vectorized<T>;

  static V value(const V& x, const V& p, PowerKind kind) {
    switch (kind) {
      case PowerKind::kAbs: return x.abs();
      case PowerKind::kSquare: return x * x;
      case PowerKind::kCube: return x.abs() * x * x;
      default: return x.abs().pow(p);  // pow(0, p > 0) = 0
    }
  }
  static V grad(const V& x, const V& p, PowerKind kind) {
    const V zero(T(0));
    switch (kind) {
      case PowerKind::kAbs:
        return V::blendv(zero, V(T(1)), x > zero) - V::blendv(zero, V(T(1)), x < zero);
      case PowerKind::kSquare: return V(T(2)) * x;
      case PowerKind::kCube: return V(T(3)) * x * x.abs();
      default: {
        // p·|x|^(p−1)·sign(x); at x = 0 the pow is ∞ for p < 1: the blend makes it 0.
        const V magnitude = p * x.abs().pow(p - V(T(1)));
        const V signed_magnitude = V::blendv(magnitude, zero - magnitude, x < zero);
        return V::blendv(signed_magnitude, zero, x == zero);
      }
    }
  }
};

enum class Layout { kRows, kChannels, kAny };

Layout layout_of(const Strides3& x) {
  if (x.l == 1) return Layout::kRows;
  if (x.c == 1) return Layout::kChannels;
  return Layout::kAny;
}

// x read as (N, C, L): x itself when its spatial dims merge, else a contiguous copy.
struct FeatureView {
  Tensor x;
  Strides3 strides;
  int64_t n, c, l;
};

FeatureView feature_view(const Tensor& x) {
  FeatureView v;
  v.x = row_strides(x) ? x : x.contiguous();
  v.strides = *row_strides(v.x);
  v.n = x.size(0);
  v.c = x.size(1);
  v.l = x.numel() / std::max<int64_t>(v.n * v.c, 1);
  return v;
}

// Pixels of one rows-layout work item: enough items for every thread, each a few vectors long.
int64_t rows_chunk(int64_t n, int64_t l, int64_t width) {
  constexpr int64_t kMaxChunk = 1024;  // 4 KB of float32 map: stays in L1 while C streams past
  const int64_t threads = at::get_num_threads();
  int64_t chunk = kMaxChunk;
  while (chunk > 4 * width && n * ((l + chunk - 1) / chunk) < 4 * threads) chunk /= 2;
  return chunk;
}

constexpr int64_t kUnroll = 4;  // rows of x summed before the map chunk is touched

// ---------------------------------------------------------------------------------------------
// attention_reduce forward

template <typename scalar_t>
void attention_reduce_kernel(const FeatureView& v, double p_value, double scale_value, Tensor& map) {
  using acc = acc_t<scalar_t>;
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  using P = VecPower<acc>;
  constexpr int64_t W = IO::kWidth;
  const PowerKind kind = power_kind(p_value);
  const acc p = static_cast<acc>(p_value), scale = static_cast<acc>(scale_value);
  const scalar_t* x = v.x.const_data_ptr<scalar_t>();
  acc* out = map.data_ptr<acc>();
  const Strides3 s = v.strides;
  const int64_t C = v.c, L = v.l;

  switch (layout_of(s)) {
    case Layout::kRows: {
      const int64_t chunk = rows_chunk(v.n, L, W);
      const int64_t chunks = (L + chunk - 1) / chunk;
      at::parallel_for(0, v.n * chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t n = item / chunks, l0 = (item % chunks) * chunk;
          const int64_t len = std::min(chunk, L - l0);
          acc* a = out + n * L + l0;
          std::fill(a, a + len, acc(0));
          const scalar_t* xn = x + n * s.n + l0;
          int64_t c = 0;
          for (; c + kUnroll <= C; c += kUnroll) {
            const scalar_t* r0 = xn + c * s.c;
            for (int64_t i = 0; i < len; i += W) {
              const int64_t m = std::min(W, len - i);
              const V f0 = P::value(IO::load(r0 + i, m), V(p), kind);
              const V f1 = P::value(IO::load(r0 + s.c + i, m), V(p), kind);
              const V f2 = P::value(IO::load(r0 + 2 * s.c + i, m), V(p), kind);
              const V f3 = P::value(IO::load(r0 + 3 * s.c + i, m), V(p), kind);
              (V::loadu(a + i, m) + ((f0 + f1) + (f2 + f3))).store(a + i, m);
            }
          }
          for (; c < C; ++c) {
            const scalar_t* r = xn + c * s.c;
            for (int64_t i = 0; i < len; i += W) {
              const int64_t m = std::min(W, len - i);
              (V::loadu(a + i, m) + P::value(IO::load(r + i, m), V(p), kind)).store(a + i, m);
            }
          }
          for (int64_t i = 0; i < len; i += W) {
            const int64_t m = std::min(W, len - i);
            (V::loadu(a + i, m) * V(scale)).store(a + i, m);
          }
        }
      });
      break;
    }
    case Layout::kChannels: {
      at::parallel_for(0, v.n * L, 64, [&](int64_t begin, int64_t end) {
        const auto sum_op = [](const V& a, const V& b) { return a + b; };
        for (int64_t pixel = begin; pixel < end; ++pixel) {
          const int64_t n = pixel / L, l = pixel % L;
          const scalar_t* xp = x + n * s.n + l * s.l;
          V acc0(acc(0)), acc1(acc(0));
          int64_t c = 0;
          for (; c + 2 * W <= C; c += 2 * W) {
            acc0 = acc0 + P::value(IO::load(xp + c), V(p), kind);
            acc1 = acc1 + P::value(IO::load(xp + c + W), V(p), kind);
          }
          for (; c < C; c += W) {
            // The zero fill of a partial load contributes |0|^p = 0.
            acc0 = acc0 + P::value(IO::load(xp + c, std::min(W, C - c)), V(p), kind);
          }
          out[pixel] = at::vec::vec_reduce_all<acc>(sum_op, acc0 + acc1) * scale;
        }
      });
      break;
    }
    case Layout::kAny: {
      at::parallel_for(0, v.n * L, 64, [&](int64_t begin, int64_t end) {
        for (int64_t pixel = begin; pixel < end; ++pixel) {
          const int64_t n = pixel / L, l = pixel % L;
          const scalar_t* xp = x + n * s.n + l * s.l;
          acc total = 0;
          for (int64_t c = 0; c < C; ++c) {
            total += abs_power<acc>(static_cast<acc>(xp[c * s.c]), p, kind);
          }
          out[pixel] = total * scale;
        }
      });
      break;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// attention_reduce backward

template <typename scalar_t>
void attention_reduce_backward_kernel(const FeatureView& v, const Tensor& grad_map, double p_value,
                                      double scale_value, Tensor& grad_x) {
  using acc = acc_t<scalar_t>;
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  using P = VecPower<acc>;
  constexpr int64_t W = IO::kWidth;
  const PowerKind kind = power_kind(p_value);
  const acc p = static_cast<acc>(p_value), scale = static_cast<acc>(scale_value);
  const scalar_t* x = v.x.const_data_ptr<scalar_t>();
  const acc* g = grad_map.const_data_ptr<acc>();
  scalar_t* gx = grad_x.data_ptr<scalar_t>();
  const Strides3 s = v.strides;
  const auto gs3 = row_strides(grad_x);
  TORCH_INTERNAL_ASSERT(gs3.has_value());
  const Strides3 gs = *gs3;
  const int64_t C = v.c, L = v.l;

  Layout layout = layout_of(s);
  if (layout != layout_of(gs)) layout = Layout::kAny;
  switch (layout) {
    case Layout::kRows: {
      const int64_t chunk = rows_chunk(v.n, L, W);
      const int64_t chunks = (L + chunk - 1) / chunk;
      at::parallel_for(0, v.n * chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t n = item / chunks, l0 = (item % chunks) * chunk;
          const int64_t len = std::min(chunk, L - l0);
          const acc* gn = g + n * L + l0;
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t* r = x + n * s.n + c * s.c + l0;
            scalar_t* out = gx + n * gs.n + c * gs.c + l0;
            for (int64_t i = 0; i < len; i += W) {
              const int64_t m = std::min(W, len - i);
              const V gv = V::loadu(gn + i, m) * V(scale);
              IO::store(out + i, gv * P::grad(IO::load(r + i, m), V(p), kind), m);
            }
          }
        }
      });
      break;
    }
    case Layout::kChannels: {
      at::parallel_for(0, v.n * L, 64, [&](int64_t begin, int64_t end) {
        for (int64_t pixel = begin; pixel < end; ++pixel) {
          const int64_t n = pixel / L, l = pixel % L;
          const scalar_t* xp = x + n * s.n + l * s.l;
          scalar_t* out = gx + n * gs.n + l * gs.l;
          const V gv(g[pixel] * scale);
          for (int64_t c = 0; c < C; c += W) {
            const int64_t m = std::min(W, C - c);
            IO::store(out + c, gv * P::grad(IO::load(xp + c, m), V(p), kind), m);
          }
        }
      });
      break;
    }
    case Layout::kAny: {
      at::parallel_for(0, v.n * L, 64, [&](int64_t begin, int64_t end) {
        for (int64_t pixel = begin; pixel < end; ++pixel) {
          const int64_t n = pixel / L, l = pixel % L;
          const scalar_t* xp = x + n * s.n + l * s.l;
          scalar_t* out = gx + n * gs.n + l * gs.l;
          const acc gv = g[pixel] * scale;
          for (int64_t c = 0; c < C; ++c) {
            out[c * gs.c] = static_cast<scalar_t>(
                gv * abs_power_grad<acc>(static_cast<acc>(xp[c * s.c]), p, kind));
          }
        }
      });
      break;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Checks and the ops

void check_features(const char* name, const Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 3, name, " must have shape (N, C, *spatial), got ", x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                       dtype == at::kDouble,
                   name, " must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK_VALUE(x.device().is_cpu(), name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK_VALUE(x.numel() > 0, name, " must not be empty, got shape ", x.sizes());
}

void check_p(double p) {
  TORCH_CHECK_VALUE(std::isfinite(p) && p > 0, "p must be finite and > 0, got ", p);
}

std::vector<int64_t> map_shape(const Tensor& x) {
  std::vector<int64_t> shape{x.size(0)};
  for (int64_t d = 2; d < x.dim(); ++d) shape.push_back(x.size(d));
  return shape;
}

Tensor attention_reduce_cpu(const Tensor& x, double p, bool mean) {
  check_features("x", x);
  check_p(p);
  const FeatureView v = feature_view(x);
  Tensor map = at::empty(map_shape(x), x.options().dtype(acc_dtype(x)));
  const double scale = mean ? 1.0 / static_cast<double>(v.c) : 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "attention_reduce_cpu",
                                  [&] { attention_reduce_kernel<scalar_t>(v, p, scale, map); });
  return map;
}

Tensor attention_reduce_backward_cpu(const Tensor& grad_map, const Tensor& x, double p, bool mean) {
  check_features("x", x);
  check_p(p);
  TORCH_CHECK_VALUE(grad_map.sizes() == at::IntArrayRef(map_shape(x)),
                    "grad_map must have the map's shape ", at::IntArrayRef(map_shape(x)), ", got ",
                    grad_map.sizes());
  TORCH_CHECK_TYPE(grad_map.scalar_type() == acc_dtype(x), "grad_map must be ", acc_dtype(x),
                   ", got ", grad_map.scalar_type());
  const FeatureView v = feature_view(x);
  const Tensor g = grad_map.contiguous();
  // The tensor empty_like(x) gives (what the fake kernel promises); written in place when its
  // spatial dims merge, else through a contiguous buffer.
  Tensor grad_x = at::empty_like(x);
  Tensor written = row_strides(grad_x) ? grad_x : at::empty(x.sizes(), x.options());
  const double scale = mean ? 1.0 / static_cast<double>(v.c) : 1.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "attention_reduce_backward_cpu",
      [&] { attention_reduce_backward_kernel<scalar_t>(v, g, p, scale, written); });
  if (!written.is_same(grad_x)) grad_x.copy_(written);
  return grad_x;
}

// ---------------------------------------------------------------------------------------------
// class_attention_scores: R = ReLU(W·X + b) per image, (N, K, *spatial)

void check_class_args(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  check_features("x", x);
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(1),
                    "weight must have shape (K, C) with C = ", x.size(1), ", got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) >= 1, "weight must have at least one row (K >= 1)");
  TORCH_CHECK_TYPE(at::isFloatingType(weight.scalar_type()), "weight must be floating point, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), "weight must be on x's device ", x.device());
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0),
                      "bias must have shape (K,) = (", weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(bias->scalar_type()), "bias must be floating point, got ",
                     bias->scalar_type());
    TORCH_CHECK_VALUE(bias->device() == x.device(), "bias must be on x's device ", x.device());
  }
}

// x as (N, C, L) (a view when its spatial dims merge).
Tensor features3(const Tensor& x) { return x.reshape({x.size(0), x.size(1), -1}); }

std::vector<int64_t> class_map_shape(const Tensor& x, int64_t k) {
  std::vector<int64_t> shape{x.size(0), k};
  for (int64_t d = 2; d < x.dim(); ++d) shape.push_back(x.size(d));
  return shape;
}

Tensor class_attention_scores_cpu(const Tensor& x, const Tensor& weight,
                                  const std::optional<Tensor>& bias) {
  check_class_args(x, weight, bias);
  const auto acc = acc_dtype(x);
  const int64_t N = x.size(0), K = weight.size(0);
  const Tensor w = weight.to(acc).contiguous();
  const Tensor x3 = features3(x);
  Tensor scores = at::empty({N, K, x3.size(2)}, x.options().dtype(acc));
  if (x.scalar_type() == acc) {
    at::bmm_out(scores, w.unsqueeze(0).expand({N, K, x.size(1)}), x3);
  } else {
    for (int64_t n = 0; n < N; ++n) {
      Tensor image_scores = scores[n];
      at::mm_out(image_scores, w, x3[n].to(acc));
    }
  }
  if (bias) scores.add_(bias->to(acc).view({1, K, 1}));
  scores.relu_();
  return scores.view(class_map_shape(x, K));
}

std::tuple<Tensor, Tensor, Tensor> class_attention_scores_backward_cpu(
    const Tensor& grad_maps, const Tensor& maps, const Tensor& x, const Tensor& weight,
    bool x_requires_grad, bool weight_requires_grad, bool bias_requires_grad) {
  check_class_args(x, weight, std::nullopt);
  const auto acc = acc_dtype(x);
  const int64_t N = x.size(0), K = weight.size(0), C = x.size(1);
  const auto shape = class_map_shape(x, K);
  TORCH_CHECK_VALUE(maps.sizes() == at::IntArrayRef(shape), "maps must have shape ",
                    at::IntArrayRef(shape), ", got ", maps.sizes());
  TORCH_CHECK_VALUE(grad_maps.sizes() == at::IntArrayRef(shape), "grad_maps must have shape ",
                    at::IntArrayRef(shape), ", got ", grad_maps.sizes());
  TORCH_CHECK_TYPE(maps.scalar_type() == acc && grad_maps.scalar_type() == acc,
                   "maps and grad_maps must be ", acc);
  // The gradient through the ReLU: zero where the map is 0 (ReLU'(0) = 0, as autograd).
  const Tensor g = grad_maps.reshape({N, K, -1}).mul(maps.reshape({N, K, -1}).gt(0));
  // An empty tensor of its own for each gradient not requested (outputs must not alias).
  Tensor grad_x = at::empty({0}, x.options()), grad_w = at::empty({0}, x.options()),
         grad_b = at::empty({0}, x.options());
  const Tensor x3 = features3(x);
  const Tensor w = weight.to(acc);
  if (x_requires_grad) {
    grad_x = at::empty_like(x);
    const Tensor wt = w.t().contiguous();  // (C, K)
    if (x.scalar_type() == acc) {
      const Tensor product = at::bmm(wt.unsqueeze(0).expand({N, C, K}), g);
      grad_x.copy_(product.view(x.sizes()));
    } else {
      for (int64_t n = 0; n < N; ++n) {
        grad_x[n].copy_(at::mm(wt, g[n]).view(x[n].sizes()));
      }
    }
  }
  if (weight_requires_grad) {
    // Σ_n G_n · X_nᵀ, summed over images in a fixed order.
    Tensor total = at::zeros({K, C}, x.options().dtype(acc));
    for (int64_t n = 0; n < N; ++n) {
      total.addmm_(g[n], x.scalar_type() == acc ? x3[n].t() : x3[n].to(acc).t());
    }
    grad_w = total;
  }
  if (bias_requires_grad) grad_b = g.sum({0, 2});
  return {grad_x, grad_w, grad_b};
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("attention_reduce", &kdops::cpu::attention_reduce_cpu);
  m.impl("attention_reduce_backward", &kdops::cpu::attention_reduce_backward_cpu);
  m.impl("class_attention_scores", &kdops::cpu::class_attention_scores_cpu);
  m.impl("class_attention_scores_backward", &kdops::cpu::class_attention_scores_backward_cpu);
}
