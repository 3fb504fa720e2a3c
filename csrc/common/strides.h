// Element strides of a tensor read as (N, C, L): torch-free, shared by the CPU kernels, the CUDA
// kernels' params structs and the torch-side helpers of csrc/common/tensor_layout.h.
#pragma once

#include <cstdint>

namespace kdops {

struct Strides3 {
  int64_t n, c, l;
};

}  // namespace kdops
