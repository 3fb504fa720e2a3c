// A device-side assert that names the argument at fault (torch-free; launched by
// csrc/cuda/prototypes_api.cpp and csrc/cuda/device_assert_api.cpp).
//
// Why not at::_assert_async(cond, msg): on CUDA tensors ATen drops the message and asserts
// `input[0] != 0`, so the user learns that *something* was out of range. A label check must
// not synchronise the host, so its error can only be a device-side assert; this one's text
// (compiled into the kernel: a device assert prints a string literal) says which argument.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace kdops {
namespace cuda {

// The argument a bad label came from: the label map's name in the public API.
enum class LabelArgument : int32_t { kLabels, kTarget };

// Enqueues on `stream` a one-thread kernel that reads *bad_flag (device memory) and, when it is
// not 0, fails a device assert with "<argument> hold(s) a label outside [0, num_classes) that
// is not ignore_index". Returns cudaGetLastError().
cudaError_t launch_assert_no_bad_label(const int32_t* bad_flag, LabelArgument argument,
                                       cudaStream_t stream);

}  // namespace cuda
}  // namespace kdops
