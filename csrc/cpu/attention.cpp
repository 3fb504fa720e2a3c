// CPU kernels of kdops::attention_reduce, kdops::class_attention_scores and the whole losses
// kdops::attention_loss / kdops::class_attention_loss (forward and backward ops), and their
// registration for the CPU dispatch key. Math: csrc/common/attention.h; specification:
// kdops/reference/attention.py. The losses' map-sized steps (resize, spatial normalisation,
// squared difference) are in csrc/cpu/attention_maps.h.
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

#include "common/attention.h"
#include "common/attention_loss.h"
#include "common/tensor_layout.h"
#include "cpu/attention_maps.h"
#include "cpu/vec_io.h"

namespace kdops {
namespace cpu {
namespace {

using at::Tensor;

at::ScalarType acc_dtype(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// |x|^p and its derivative on SIMD vectors (csrc/common/attention.h on scalars).
template <typename T>
struct VecPower {
  using V = at::vec::Vectorized<T>;

  template <PowerKind kKind>
  static V value(const V& x, const V& p) {
    if constexpr (kKind == PowerKind::kAbs) return x.abs();
    else if constexpr (kKind == PowerKind::kSquare) return x * x;
    else if constexpr (kKind == PowerKind::kCube) return x.abs() * x * x;
    else return x.abs().pow(p);  // pow(0, p > 0) = 0
  }
  template <PowerKind kKind>
  static V grad(const V& x, const V& p) {
    const V zero(T(0));
    if constexpr (kKind == PowerKind::kAbs) {
      return V::blendv(zero, V(T(1)), x > zero) - V::blendv(zero, V(T(1)), x < zero);
    } else if constexpr (kKind == PowerKind::kSquare) {
      return V(T(2)) * x;
    } else if constexpr (kKind == PowerKind::kCube) {
      return V(T(3)) * x * x.abs();
    } else {
      // p·|x|^(p−1)·sign(x); at x = 0 the pow is ∞ for p < 1: the blend makes it 0.
      const V magnitude = p * x.abs().pow(p - V(T(1)));
      const V signed_magnitude = V::blendv(magnitude, zero - magnitude, x < zero);
      return V::blendv(signed_magnitude, zero, x == zero);
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

// Calls f(std::integral_constant<PowerKind, kind>{}): the power's form fixed at compile time.
template <typename F>
void with_kind(PowerKind kind, F&& f) {
  switch (kind) {
    case PowerKind::kAbs: return f(std::integral_constant<PowerKind, PowerKind::kAbs>{});
    case PowerKind::kSquare: return f(std::integral_constant<PowerKind, PowerKind::kSquare>{});
    case PowerKind::kCube: return f(std::integral_constant<PowerKind, PowerKind::kCube>{});
    default: return f(std::integral_constant<PowerKind, PowerKind::kGeneral>{});
  }
}

template <typename scalar_t, PowerKind kind>
void attention_reduce_kernel(const FeatureView& v, double p_value, double scale_value, Tensor& map) {
  using acc = acc_t<scalar_t>;
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  using P = VecPower<acc>;
  constexpr int64_t W = IO::kWidth;
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
              const V f0 = P::template value<kind>(IO::load(r0 + i, m), V(p));
              const V f1 = P::template value<kind>(IO::load(r0 + s.c + i, m), V(p));
              const V f2 = P::template value<kind>(IO::load(r0 + 2 * s.c + i, m), V(p));
              const V f3 = P::template value<kind>(IO::load(r0 + 3 * s.c + i, m), V(p));
              (V::loadu(a + i, m) + ((f0 + f1) + (f2 + f3))).store(a + i, m);
            }
          }
          for (; c < C; ++c) {
            const scalar_t* r = xn + c * s.c;
            for (int64_t i = 0; i < len; i += W) {
              const int64_t m = std::min(W, len - i);
              (V::loadu(a + i, m) + P::template value<kind>(IO::load(r + i, m), V(p))).store(a + i, m);
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
            acc0 = acc0 + P::template value<kind>(IO::load(xp + c), V(p));
            acc1 = acc1 + P::template value<kind>(IO::load(xp + c + W), V(p));
          }
          for (; c < C; c += W) {
            // The zero fill of a partial load contributes |0|^p = 0.
            acc0 = acc0 + P::template value<kind>(IO::load(xp + c, std::min(W, C - c)), V(p));
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

template <typename scalar_t, PowerKind kind>
void attention_reduce_backward_kernel(const FeatureView& v, const Tensor& grad_map, double p_value,
                                      double scale_value, Tensor& grad_x) {
  using acc = acc_t<scalar_t>;
  using IO = VecIO<scalar_t>;
  using V = typename IO::V;
  using P = VecPower<acc>;
  constexpr int64_t W = IO::kWidth;
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
              IO::store(out + i, gv * P::template grad<kind>(IO::load(r + i, m), V(p)), m);
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
            IO::store(out + c, gv * P::template grad<kind>(IO::load(xp + c, m), V(p)), m);
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
                                  [&] {
                                    with_kind(power_kind(p), [&](auto kind) {
                                      attention_reduce_kernel<scalar_t, decltype(kind)::value>(
                                          v, p, scale, map);
                                    });
                                  });
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
      [&] {
        with_kind(power_kind(p), [&](auto kind) {
          attention_reduce_backward_kernel<scalar_t, decltype(kind)::value>(v, g, p, scale, written);
        });
      });
  if (!written.is_same(grad_x)) grad_x.copy_(written);
  return grad_x;
}

// ---------------------------------------------------------------------------------------------
// attention_loss: the reductions above around the map-sized steps of common/attention_loss.h

void check_loss_pair(const Tensor& student, const Tensor& teacher) {
  check_features("student", student);
  check_features("teacher", teacher);
  TORCH_CHECK_VALUE(student.dim() == 4 && teacher.dim() == 4,
                    "student and teacher must have shape (N, C, H, W), got ", student.sizes(),
                    " and ", teacher.sizes());
  TORCH_CHECK_VALUE(teacher.size(0) == student.size(0),
                    "teacher must have the batch size of student (N=", student.size(0), "), got ",
                    teacher.sizes());
  TORCH_CHECK_TYPE(teacher.scalar_type() == student.scalar_type(),
                   "teacher must have the dtype of student (", student.scalar_type(), "), got ",
                   teacher.scalar_type());
}

struct LossGeometry {
  int64_t n, hs, ws, ht, wt, out_h, out_w;
};

LossGeometry loss_geometry(const Tensor& student, const Tensor& teacher,
                           at::OptionalIntArrayRef size) {
  const auto out = loss_size(student, size);
  return {student.size(0), student.size(2), student.size(3), teacher.size(2), teacher.size(3),
          out[0], out[1]};
}

template <typename T>
void attention_loss_maps_forward(const LossGeometry& g, MapNorm norm, const Tensor& raw_s,
                                 const Tensor& raw_t, Tensor& s_map, Tensor& t_map, Tensor& loss) {
  const int64_t L = g.out_h * g.out_w;
  const MapResize rs(g.hs, g.ws, g.out_h, g.out_w), rt(g.ht, g.wt, g.out_h, g.out_w);
  // Images in parallel (the softmax's exps are most of the map work), per-image sums added in order.
  std::vector<MapAcc> per_image(g.n);
  at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
    MapPair pair(L);
    for (int64_t n = begin; n < end; ++n) {
      rs.forward(raw_s.const_data_ptr<T>() + n * g.hs * g.ws, pair.s.data());
      rt.forward(raw_t.const_data_ptr<T>() + n * g.ht * g.wt, pair.t.data());
      round_trip(pair.s.data(), s_map.data_ptr<T>() + n * L, L);
      round_trip(pair.t.data(), t_map.data_ptr<T>() + n * L, L);
      per_image[n] = pair.squared_distance(norm);
    }
  });
  MapAcc total = 0;
  for (const MapAcc v : per_image) total += v;
  *loss.data_ptr<T>() = static_cast<T>(total / static_cast<MapAcc>(g.n * L));
}

template <typename T>
void attention_loss_maps_backward(const LossGeometry& g, MapNorm norm, double grad_loss,
                                  const Tensor& s_map, const Tensor& t_map, Tensor* grad_raw_s,
                                  Tensor* grad_raw_t) {
  const int64_t L = g.out_h * g.out_w;
  const MapResize rs(g.hs, g.ws, g.out_h, g.out_w), rt(g.ht, g.wt, g.out_h, g.out_w);
  const MapAcc coef = 2.0 * grad_loss / static_cast<MapAcc>(g.n * L);
  at::parallel_for(0, g.n, 1, [&](int64_t begin, int64_t end) {
    MapPair pair(L);
    std::vector<MapAcc> scratch(std::max(g.hs * g.ws, g.ht * g.wt));
    for (int64_t n = begin; n < end; ++n) {
      pair.load(s_map.const_data_ptr<T>() + n * L, t_map.const_data_ptr<T>() + n * L);
      pair.squared_distance(norm);
      pair.backward(norm, coef, grad_raw_s != nullptr, grad_raw_t != nullptr);
      if (grad_raw_s != nullptr) {
        rs.backward(pair.d_s.data(), scratch.data(), grad_raw_s->data_ptr<T>() + n * g.hs * g.ws);
      }
      if (grad_raw_t != nullptr) {
        rt.backward(pair.d_t.data(), scratch.data(), grad_raw_t->data_ptr<T>() + n * g.ht * g.wt);
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> attention_loss_cpu(const Tensor& student, const Tensor& teacher,
                                                      double p, bool mean, c10::string_view norm,
                                                      at::OptionalIntArrayRef size) {
  check_loss_pair(student, teacher);
  const MapNorm map_norm_kind = map_norm(std::string_view(norm.data(), norm.size()));
  const LossGeometry g = loss_geometry(student, teacher, size);
  const Tensor raw_s = attention_reduce_cpu(student, p, mean);
  const Tensor raw_t = attention_reduce_cpu(teacher, p, mean);
  const auto options = raw_s.options();
  Tensor s_map = at::empty({g.n, g.out_h, g.out_w}, options);
  Tensor t_map = at::empty({g.n, g.out_h, g.out_w}, options);
  Tensor loss = at::empty({}, options);
  AT_DISPATCH_FLOATING_TYPES(raw_s.scalar_type(), "attention_loss_cpu", [&] {
    attention_loss_maps_forward<scalar_t>(g, map_norm_kind, raw_s, raw_t, s_map, t_map, loss);
  });
  return {loss, s_map, t_map};
}

std::tuple<Tensor, Tensor> attention_loss_backward_cpu(
    const Tensor& grad_loss, const Tensor& student, const Tensor& teacher,
    const Tensor& student_map, const Tensor& teacher_map, double p, bool mean,
    c10::string_view norm, bool student_requires_grad, bool teacher_requires_grad) {
  check_loss_pair(student, teacher);
  const MapNorm map_norm_kind = map_norm(std::string_view(norm.data(), norm.size()));
  const LossGeometry g = loss_geometry(student, teacher, at::IntArrayRef{
      student_map.dim() == 3 ? student_map.size(1) : 1, student_map.dim() == 3 ? student_map.size(2) : 1});
  const std::vector<int64_t> expected{g.n, g.out_h, g.out_w};
  TORCH_CHECK_VALUE(student_map.sizes() == at::IntArrayRef(expected) &&
                        teacher_map.sizes() == student_map.sizes(),
                    "student_map and teacher_map must be the forward's (N, H', W') maps, got ",
                    student_map.sizes(), " and ", teacher_map.sizes());
  const auto acc = acc_dtype(student);
  TORCH_CHECK_TYPE(student_map.scalar_type() == acc && teacher_map.scalar_type() == acc,
                   "student_map and teacher_map must be ", acc);
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "grad_loss must hold one element, got shape ",
                    grad_loss.sizes());
  const double grad = grad_loss.item<double>();
  const Tensor s = student_map.contiguous(), t = teacher_map.contiguous();
  std::optional<Tensor> grad_raw_s, grad_raw_t;
  if (student_requires_grad) grad_raw_s = at::empty({g.n, g.hs, g.ws}, s.options());
  if (teacher_requires_grad) grad_raw_t = at::empty({g.n, g.ht, g.wt}, s.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "attention_loss_backward_cpu", [&] {
    attention_loss_maps_backward<scalar_t>(g, map_norm_kind, grad, s, t,
                                           grad_raw_s ? &*grad_raw_s : nullptr,
                                           grad_raw_t ? &*grad_raw_t : nullptr);
  });
  Tensor grad_s = student_requires_grad
                      ? attention_reduce_backward_cpu(*grad_raw_s, student, p, mean)
                      : at::empty({0}, student.options());
  Tensor grad_t = teacher_requires_grad
                      ? attention_reduce_backward_cpu(*grad_raw_t, teacher, p, mean)
                      : at::empty({0}, teacher.options());
  return {grad_s, grad_t};
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

// (grad_x, grad_weight, grad_bias) from g' = ∂loss/∂z (N, K, L) in the accumulation dtype:
// grad_x = Wᵀ g' (written straight into the tensor empty_like(x) gives, contiguous or
// channels_last), grad_W = Σ_n g'_n x_nᵀ (images in order), grad_b = Σ g'.
std::tuple<Tensor, Tensor, Tensor> class_scores_grads(const Tensor& g, const Tensor& x,
                                                      const Tensor& weight, bool x_requires_grad,
                                                      bool weight_requires_grad,
                                                      bool bias_requires_grad) {
  const auto acc = acc_dtype(x);
  const int64_t N = x.size(0), K = weight.size(0), C = x.size(1), L = g.size(2);
  // An empty tensor of its own for each gradient not requested (outputs must not alias).
  Tensor grad_x = at::empty({0}, x.options()), grad_w = at::empty({0}, x.options()),
         grad_b = at::empty({0}, x.options());
  const Tensor x3 = features3(x);
  const Tensor w = weight.to(acc).contiguous();  // (K, C)
  if (x_requires_grad) {
    grad_x = at::empty_like(x);
    const auto strides = row_strides(grad_x);
    const bool rows = strides && strides->l == 1 && strides->c == L;
    const bool channels = strides && strides->c == 1 && strides->l == C;
    if (x.scalar_type() == acc && rows && strides->n == C * L) {
      Tensor out = grad_x.view({N, C, L});
      at::bmm_out(out, w.t().unsqueeze(0).expand({N, C, K}), g);
    } else if (x.scalar_type() == acc && channels && strides->n == C * L) {
      // (N, L, C) contiguous: g'ᵀ W per image.
      Tensor out = at::from_blob(grad_x.data_ptr(), {N, L, C}, grad_x.options());
      at::bmm_out(out, g.transpose(1, 2), w.unsqueeze(0).expand({N, K, C}));
    } else {
      const Tensor wt = w.t().contiguous();  // (C, K)
      for (int64_t n = 0; n < N; ++n) {
        grad_x[n].copy_(at::mm(wt, g[n]).view(x[n].sizes()));
      }
    }
  }
  if (weight_requires_grad) {
    Tensor total = at::zeros({K, C}, x.options().dtype(acc));
    for (int64_t n = 0; n < N; ++n) {
      total.addmm_(g[n], x.scalar_type() == acc ? x3[n].t() : x3[n].to(acc).t());
    }
    grad_w = total;
  }
  if (bias_requires_grad) grad_b = g.sum(at::IntArrayRef{0, 2});
  return {grad_x, grad_w, grad_b};
}

std::tuple<Tensor, Tensor, Tensor> class_attention_scores_backward_cpu(
    const Tensor& grad_maps, const Tensor& maps, const Tensor& x, const Tensor& weight,
    bool x_requires_grad, bool weight_requires_grad, bool bias_requires_grad) {
  check_class_args(x, weight, std::nullopt);
  const auto acc = acc_dtype(x);
  const int64_t N = x.size(0), K = weight.size(0);
  const auto shape = class_map_shape(x, K);
  TORCH_CHECK_VALUE(maps.sizes() == at::IntArrayRef(shape), "maps must have shape ",
                    at::IntArrayRef(shape), ", got ", maps.sizes());
  TORCH_CHECK_VALUE(grad_maps.sizes() == at::IntArrayRef(shape), "grad_maps must have shape ",
                    at::IntArrayRef(shape), ", got ", grad_maps.sizes());
  TORCH_CHECK_TYPE(maps.scalar_type() == acc && grad_maps.scalar_type() == acc,
                   "maps and grad_maps must be ", acc);
  // The gradient through the ReLU: zero where the map is 0 (ReLU'(0) = 0, as autograd).
  const Tensor g = grad_maps.reshape({N, K, -1}).mul(maps.reshape({N, K, -1}).gt(0));
  return class_scores_grads(g, x, weight, x_requires_grad, weight_requires_grad,
                            bias_requires_grad);
}

// ---------------------------------------------------------------------------------------------
// class_attention_loss: both score GEMMs, the per-(n, k) normalisation and the squared
// difference in one op (map-sized steps in the double loops of attention_loss), so that autograd
// sees one node; its backward forms g' and runs the gradient GEMMs.

void check_class_loss_pair(const Tensor& student, const Tensor& teacher) {
  check_features("student", student);
  check_features("teacher", teacher);
  TORCH_CHECK_VALUE(teacher.size(0) == student.size(0) &&
                        teacher.sizes().slice(2) == student.sizes().slice(2),
                    "teacher must have the batch and spatial size of student (", student.sizes(),
                    "), got ", teacher.sizes());
  TORCH_CHECK_TYPE(teacher.scalar_type() == student.scalar_type(),
                   "teacher must have the dtype of student (", student.scalar_type(), "), got ",
                   teacher.scalar_type());
}

template <typename T>
void class_loss_maps_forward(const Tensor& r_s, const Tensor& r_t, MapNorm norm, Tensor& loss) {
  const int64_t maps = r_s.size(0) * r_s.size(1), L = r_s.numel() / maps;
  // The N·K maps are independent: one thread's share each, per-map sums added in map order.
  std::vector<MapAcc> per_map(maps);
  at::parallel_for(0, maps, 1, [&](int64_t begin, int64_t end) {
    MapPair pair(L);
    for (int64_t m = begin; m < end; ++m) {
      pair.load(r_s.const_data_ptr<T>() + m * L, r_t.const_data_ptr<T>() + m * L);
      per_map[m] = pair.squared_distance(norm);
    }
  });
  MapAcc total = 0;
  for (const MapAcc v : per_map) total += v;
  *loss.data_ptr<T>() = static_cast<T>(total / static_cast<MapAcc>(maps * L));
}

// g' = ∂loss/∂z (through the normalisation and the ReLU) of each requested side.
template <typename T>
void class_loss_maps_backward(const Tensor& r_s, const Tensor& r_t, MapNorm norm, double grad_loss,
                              Tensor* g_s, Tensor* g_t) {
  const int64_t maps = r_s.size(0) * r_s.size(1), L = r_s.numel() / maps;
  const MapAcc coef = 2.0 * grad_loss / static_cast<MapAcc>(maps * L);
  // The ReLU's gradient: d where the map is positive, 0 where the ReLU clipped it.
  const auto write = [L](const std::vector<MapAcc>& raw, const std::vector<MapAcc>& d, T* out) {
    for (int64_t i = 0; i < L; ++i) out[i] = raw[i] > 0 ? static_cast<T>(d[i]) : T(0);
  };
  at::parallel_for(0, maps, 1, [&](int64_t begin, int64_t end) {
    MapPair pair(L);
    for (int64_t m = begin; m < end; ++m) {
      pair.load(r_s.const_data_ptr<T>() + m * L, r_t.const_data_ptr<T>() + m * L);
      pair.squared_distance(norm);
      pair.backward(norm, coef, g_s != nullptr, g_t != nullptr);
      if (g_s != nullptr) write(pair.s, pair.d_s, g_s->data_ptr<T>() + m * L);
      if (g_t != nullptr) write(pair.t, pair.d_t, g_t->data_ptr<T>() + m * L);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> class_attention_loss_cpu(
    const Tensor& student, const Tensor& teacher, const Tensor& student_weight,
    const Tensor& teacher_weight, const std::optional<Tensor>& student_bias,
    const std::optional<Tensor>& teacher_bias, c10::string_view norm) {
  check_class_loss_pair(student, teacher);
  const MapNorm map_norm_kind = map_norm(std::string_view(norm.data(), norm.size()));
  TORCH_CHECK_VALUE(teacher_weight.dim() == 2 && teacher_weight.size(0) == student_weight.size(0),
                    "teacher_weight must have the K rows of student_weight, got ",
                    teacher_weight.sizes());
  const Tensor r_s = class_attention_scores_cpu(student, student_weight, student_bias);
  const Tensor r_t = class_attention_scores_cpu(teacher, teacher_weight, teacher_bias);
  Tensor loss = at::empty({}, r_s.options());
  AT_DISPATCH_FLOATING_TYPES(r_s.scalar_type(), "class_attention_loss_cpu", [&] {
    class_loss_maps_forward<scalar_t>(r_s, r_t, map_norm_kind, loss);
  });
  return {loss, r_s, r_t};
}

std::vector<Tensor> class_attention_loss_backward_cpu(
    const Tensor& grad_loss, const Tensor& student, const Tensor& teacher,
    const Tensor& student_weight, const Tensor& teacher_weight, const Tensor& student_maps,
    const Tensor& teacher_maps, c10::string_view norm, at::IntArrayRef output_mask) {
  check_class_loss_pair(student, teacher);
  const MapNorm map_norm_kind = map_norm(std::string_view(norm.data(), norm.size()));
  TORCH_CHECK_VALUE(output_mask.size() == 6, "output_mask must hold 6 flags, got ",
                    output_mask.size());
  const int64_t K = student_weight.size(0);
  const auto shape = class_map_shape(student, K);
  TORCH_CHECK_VALUE(student_maps.sizes() == at::IntArrayRef(shape) &&
                        teacher_maps.sizes() == student_maps.sizes(),
                    "student_maps and teacher_maps must be the forward's ", at::IntArrayRef(shape),
                    " maps, got ", student_maps.sizes(), " and ", teacher_maps.sizes());
  TORCH_CHECK_TYPE(student_maps.scalar_type() == acc_dtype(student) &&
                       teacher_maps.scalar_type() == student_maps.scalar_type(),
                   "student_maps and teacher_maps must be ", acc_dtype(student));
  TORCH_CHECK_VALUE(grad_loss.numel() == 1, "grad_loss must hold one element, got shape ",
                    grad_loss.sizes());
  const bool want_s = output_mask[0] || output_mask[2] || output_mask[4];
  const bool want_t = output_mask[1] || output_mask[3] || output_mask[5];
  const Tensor r_s = student_maps.contiguous(), r_t = teacher_maps.contiguous();
  const int64_t N = student.size(0);
  std::optional<Tensor> g_s, g_t;
  if (want_s) g_s = at::empty({N, K, r_s.numel() / (N * K)}, r_s.options());
  if (want_t) g_t = at::empty({N, K, r_s.numel() / (N * K)}, r_s.options());
  const double grad = grad_loss.item<double>();
  AT_DISPATCH_FLOATING_TYPES(r_s.scalar_type(), "class_attention_loss_backward_cpu", [&] {
    class_loss_maps_backward<scalar_t>(r_s, r_t, map_norm_kind, grad, g_s ? &*g_s : nullptr,
                                       g_t ? &*g_t : nullptr);
  });
  std::vector<Tensor> out(6);
  for (auto& v : out) v = at::empty({0}, student.options());
  if (want_s) {
    auto [gx, gw, gb] = class_scores_grads(*g_s, student, student_weight, output_mask[0] != 0,
                                           output_mask[2] != 0, output_mask[4] != 0);
    if (output_mask[0]) out[0] = gx;
    if (output_mask[2]) out[2] = gw;
    if (output_mask[4]) out[4] = gb;
  }
  if (want_t) {
    auto [gx, gw, gb] = class_scores_grads(*g_t, teacher, teacher_weight, output_mask[1] != 0,
                                           output_mask[3] != 0, output_mask[5] != 0);
    if (output_mask[1]) out[1] = gx;
    if (output_mask[3]) out[3] = gw;
    if (output_mask[5]) out[5] = gb;
  }
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("attention_reduce", &kdops::cpu::attention_reduce_cpu);
  m.impl("attention_reduce_backward", &kdops::cpu::attention_reduce_backward_cpu);
  m.impl("attention_loss", &kdops::cpu::attention_loss_cpu);
  m.impl("attention_loss_backward", &kdops::cpu::attention_loss_backward_cpu);
  m.impl("class_attention_scores", &kdops::cpu::class_attention_scores_cpu);
  m.impl("class_attention_scores_backward", &kdops::cpu::class_attention_scores_backward_cpu);
  m.impl("class_attention_loss", &kdops::cpu::class_attention_loss_cpu);
  m.impl("class_attention_loss_backward", &kdops::cpu::class_attention_loss_backward_cpu);
}
