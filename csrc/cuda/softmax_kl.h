// CUDA kernels of channel_kl and pixel_kl: launch parameters and launchers (torch-free; included
// by softmax_kl.cu and by softmax_kl_api.cpp, which fills them from tensors).
//
// Tensors are passed as data pointers with (N, C, L) element strides (spatial dims merged) so
// any layout whose spatial dims merge runs without a copy. Scalars the caller only has on the
// device (the incoming gradient, the count of valid pixels) are read by the kernels, never
// copied to the host. Results are summed in a fixed order: the same bits on every run.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/strides.h"

namespace kdops {
namespace cuda {

enum class DType : int32_t { kFloat32, kFloat16, kBFloat16 };

// What every softmax-KL kernel reads: the two inputs as (N, C, L) and the temperature.
struct KLInputs {
  const void* student;
  const void* teacher;
  Strides3 student_strides, teacher_strides;
  int64_t n, c, l;
  DType dtype;
  float inv_tau;  // 1/τ
  int num_sms;    // multiprocessors of the device (sizes the grid)
};

// pixel_kl's labels: pixels equal to ignore_index are not counted.
struct PixelTarget {
  const int64_t* target;  // null: every pixel is valid
  int64_t target_stride_n, target_stride_l;
  int64_t ignore_index;
};

// The gradients a backward kernel writes, each once.
struct KLGradients {
  void* grad_student;  // null: not requested
  void* grad_teacher;  // null: not requested
  Strides3 grad_student_strides, grad_teacher_strides;
};

struct ChannelKLForwardParams : KLInputs {
  float loss_scale;  // τ²/(N·C)
  float* loss;       // 0-dim
  float* row_stats;  // (N·C, 5): [max_s, log z_s, max_t, log z_t, KL] per row (maxima raw)
  void* workspace;   // channel_kl_forward_workspace_bytes(params) bytes
};

struct ChannelKLBackwardParams : KLInputs, KLGradients {
  float tau_over_rows;     // τ/(N·C)
  const float* grad_loss;  // 0-dim, on the device
  const float* row_stats;  // (N·C, 5) contiguous, from the forward
};

struct PixelKLForwardParams : KLInputs, PixelTarget {
  float tau_sq;        // τ²
  float* loss;         // 0-dim
  int64_t* num_valid;  // 0-dim
  void* workspace;     // pixel_kl_forward_workspace_bytes(params) bytes
};

struct PixelKLBackwardParams : KLInputs, PixelTarget, KLGradients {
  float tau;                 // τ
  const float* grad_loss;    // 0-dim, on the device
  const int64_t* num_valid;  // 0-dim, on the device, from the forward
};

size_t channel_kl_forward_workspace_bytes(const ChannelKLForwardParams& params);
size_t pixel_kl_forward_workspace_bytes(const PixelKLForwardParams& params);

// Each launcher enqueues its kernels on `stream` and returns cudaGetLastError().
cudaError_t launch_channel_kl_forward(const ChannelKLForwardParams& params, cudaStream_t stream);
cudaError_t launch_channel_kl_backward(const ChannelKLBackwardParams& params, cudaStream_t stream);
cudaError_t launch_pixel_kl_forward(const PixelKLForwardParams& params, cudaStream_t stream);
cudaError_t launch_pixel_kl_backward(const PixelKLBackwardParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace kdops
