// CUDA kernels of resized_pixel_kl (pixel_kl of logits resized bilinearly to (H, W), the resized
// logits never stored): launch parameters and launchers (torch-free; included by
// resized_pixel_kl.cu, by the host build of the per-thread code in tests/, and by
// softmax_kl_api.cpp, which fills them from tensors).
//
// Inputs (N, C, h, w) are read through their four element strides, so every layout runs without
// a copy; target (N, H, W) is int64 at the output size. Scalars the caller only has on the device
// (the incoming gradient, the count of valid pixels) are read by the kernels, never copied to
// the host. Every sum runs in a fixed order: the same bits on every run.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/bilinear.h"
#include "cuda/softmax_kl.h"

namespace kdops {
namespace cuda {

// Element strides of an (N, C, h, w) tensor.
struct Strides4 {
  int64_t n, c, h, w;
};

// What every resized_pixel_kl kernel reads: the two inputs (N, C, h, w), the resize, the labels.
struct ResizedKLInputs {
  const void* student;
  const void* teacher;
  Strides4 student_strides, teacher_strides;
  int64_t n, c;
  BilinearAxis rows, cols;  // rows: h → H, cols: w → W (bilinear_axis)
  DType dtype;
  float inv_tau;  // 1/τ
  int num_sms;    // multiprocessors of the device (sizes the grid)
  // Labels (N, H, W); pixels equal to ignore_index are not counted. Null: every pixel is valid.
  const int64_t* target;
  int64_t target_stride_n, target_stride_h, target_stride_w;
  int64_t ignore_index;
  // (N·h·w, 2) floats: each input pixel's largest student and teacher logit (0 if not finite),
  // the anchors of the interpolation (resized_pixel_kl_threads.h). Set by the launchers in their
  // workspace; the callers leave it null.
  float* anchors;
};

struct ResizedPixelKLForwardParams : ResizedKLInputs {
  float tau_sq;        // τ²
  float* loss;         // 0-dim
  int64_t* num_valid;  // 0-dim
  void* workspace;     // resized_pixel_kl_forward_workspace_bytes(params) bytes, 16-byte aligned
};

struct ResizedPixelKLBackwardParams : ResizedKLInputs {
  void* grad_student;  // null: not requested
  void* grad_teacher;  // null: not requested
  Strides4 grad_student_strides, grad_teacher_strides;
  float tau;                 // τ
  const float* grad_loss;    // 0-dim, on the device
  const int64_t* num_valid;  // 0-dim, on the device, from the forward
  void* workspace;  // resized_pixel_kl_backward_workspace_bytes(params) bytes, 16-byte aligned
  // (N·H·W, kKLRowStats) floats: each valid output pixel's [max_s, log z_s, max_t, log z_t, KL],
  // written by the first backward kernel, read by the second: O(output pixels), not
  // O(pixels·C). Set by the launcher in the workspace; the callers leave it null.
  float* pixel_stats;
};

size_t resized_pixel_kl_forward_workspace_bytes(const ResizedPixelKLForwardParams& params);
size_t resized_pixel_kl_backward_workspace_bytes(const ResizedPixelKLBackwardParams& params);

// Each launcher enqueues its kernels on `stream` and returns cudaGetLastError().
cudaError_t launch_resized_pixel_kl_forward(const ResizedPixelKLForwardParams& params,
                                            cudaStream_t stream);
cudaError_t launch_resized_pixel_kl_backward(const ResizedPixelKLBackwardParams& params,
                                             cudaStream_t stream);

}  // namespace cuda
}  // namespace kdops
