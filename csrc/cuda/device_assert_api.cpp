// The torch side of csrc/cuda/device_assert.cu: kdops::assert_no_bad_label for CUDA tensors.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/device_assert.h"

namespace kdops {
namespace cuda {
namespace {

void assert_no_bad_label_cuda(const at::Tensor& bad, c10::string_view argument) {
  TORCH_CHECK_VALUE(bad.numel() == 1, "bad must hold one element, got shape ", bad.sizes());
  TORCH_CHECK_VALUE(bad.is_cuda(), "bad must be a CUDA tensor, got ", bad.device());
  LabelArgument which = LabelArgument::kLabels;
  if (argument == "target") {
    which = LabelArgument::kTarget;
  } else {
    TORCH_CHECK_VALUE(argument == "labels", "argument must be \"labels\" or \"target\", got \"",
                      std::string(argument.data(), argument.size()), "\"");
  }
  const c10::cuda::CUDAGuard device_guard(bad.device());
  const at::Tensor flag = bad.to(at::kInt).contiguous();  // the kernel reads an int32
  C10_CUDA_CHECK(launch_assert_no_bad_label(flag.const_data_ptr<int32_t>(), which,
                                            c10::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace cuda
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CUDA, m) {
  m.impl("assert_no_bad_label", &kdops::cuda::assert_no_bad_label_cuda);
}
