// Vector loads and stores of the CPU kernels: elements of any input dtype read into, and
// written back from, at::vec::Vectorized of the accumulation type (float for 16- and 32-bit
// inputs, double for float64).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace kdops {
namespace cpu {

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

}  // namespace cpu
}  // namespace kdops
