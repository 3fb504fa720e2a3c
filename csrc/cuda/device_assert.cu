// The kernel of csrc/cuda/device_assert.h. NDEBUG is undefined before <cassert> so that the
// assert survives a release build's flags (it is the check itself, not a debugging aid).
#undef NDEBUG
#include <cassert>

#include "cuda/device_assert.h"

namespace kdops {
namespace cuda {
namespace {

__global__ void assert_no_bad_label_kernel(const int32_t* bad_flag, LabelArgument argument) {
  if (*bad_flag == 0) return;
  // One literal per argument: the text of the failed assertion is what the user reads.
  if (argument == LabelArgument::kTarget) {
    assert(false && "target holds a label outside [0, num_classes) that is not ignore_index");
  } else {
    assert(false && "labels hold a label outside [0, num_classes) that is not ignore_index");
  }
}

}  // namespace

cudaError_t launch_assert_no_bad_label(const int32_t* bad_flag, LabelArgument argument,
                                       cudaStream_t stream) {
  assert_no_bad_label_kernel<<<1, 1, 0, stream>>>(bad_flag, argument);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace kdops
