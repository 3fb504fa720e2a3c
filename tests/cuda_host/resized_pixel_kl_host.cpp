// A host build of the per-thread code of the CUDA kernels of resized_pixel_kl
// (csrc/cuda/resized_pixel_kl_threads.h), for tests/ops/test_resized_pixel_kl_threads.py: each
// function below runs the kernels' work items on the CPU, in item order, in float32 — the grid,
// the block reductions and the 16-bit conversions are what only a GPU run checks.
//
// Built with: g++ -std=c++17 -O1 -ffp-contract=off -shared -fPIC -I csrc -I <cuda>/include
// (-ffp-contract=off: the device code rounds each step of the source positions; see bilinear.h).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cuda/resized_pixel_kl_threads.h"

namespace {

using kdops::bilinear_axis;
using kdops::cuda::DType;
using kdops::cuda::ResizedKLInputs;
using kdops::cuda::Strides4;

Strides4 strides4(const int64_t* s) { return Strides4{s[0], s[1], s[2], s[3]}; }

// sizes: N, C, h, w, H, W; target may be null (then target_strides is not read).
void fill_inputs(ResizedKLInputs& p, const float* student, const int64_t* student_strides,
                 const float* teacher, const int64_t* teacher_strides, const int64_t* sizes,
                 int align_corners, double tau, const int64_t* target,
                 const int64_t* target_strides, int64_t ignore_index) {
  p.student = student;
  p.teacher = teacher;
  p.student_strides = strides4(student_strides);
  p.teacher_strides = strides4(teacher_strides);
  p.n = sizes[0];
  p.c = sizes[1];
  p.rows = bilinear_axis(sizes[2], sizes[4], align_corners != 0);
  p.cols = bilinear_axis(sizes[3], sizes[5], align_corners != 0);
  p.dtype = DType::kFloat32;
  p.inv_tau = static_cast<float>(1.0 / tau);
  p.num_sms = 1;
  p.target = target;
  if (target != nullptr) {
    p.target_stride_n = target_strides[0];
    p.target_stride_h = target_strides[1];
    p.target_stride_w = target_strides[2];
  }
  p.ignore_index = ignore_index;
}

// The anchors kernel's items.
void run_anchors(const ResizedKLInputs& p) {
  const int64_t pixels = kdops::cuda::resized::input_pixels(p);
  for (int64_t item = 0; item < pixels; ++item) kdops::cuda::resized::input_anchors<float>(p, item);
}

}  // namespace

extern "C" {

// The forward: returns the loss (float32, as the loss kernel rounds it) and the count.
float resized_pixel_kl_host_forward(const float* student, const int64_t* student_strides,
                                    const float* teacher, const int64_t* teacher_strides,
                                    const int64_t* sizes, int align_corners, double tau,
                                    const int64_t* target, const int64_t* target_strides,
                                    int64_t ignore_index, int64_t* num_valid) {
  kdops::cuda::ResizedPixelKLForwardParams p{};
  fill_inputs(p, student, student_strides, teacher, teacher_strides, sizes, align_corners, tau,
              target, target_strides, ignore_index);
  std::vector<float> anchors(2 * kdops::cuda::resized::input_pixels(p));
  p.anchors = anchors.data();
  run_anchors(p);
  double kl = 0.0;
  unsigned long long valid = 0;
  const int64_t pixels = kdops::cuda::resized::output_pixels(p);
  for (int64_t pixel = 0; pixel < pixels; ++pixel) {
    kdops::cuda::resized::forward_pixel<float>(p, pixel, kl, valid);
  }
  *num_valid = static_cast<int64_t>(valid);
  const float tau_sq = static_cast<float>(tau * tau);
  return static_cast<float>(tau_sq * kl / static_cast<double>(valid > 0 ? valid : 1));
}

// The backward's kernels; grad_student / grad_teacher null when not requested; pixel_stats:
// N·H·W·5 floats of scratch. path: 0 as the launcher picks (the tiled gather where its tiles fit,
// with at most `threads` columns per tile), 1 the per-thread gather. Returns the path taken.
int resized_pixel_kl_host_backward(const float* student, const int64_t* student_strides,
                                    const float* teacher, const int64_t* teacher_strides,
                                    const int64_t* sizes, int align_corners, double tau,
                                    const int64_t* target, const int64_t* target_strides,
                                    int64_t ignore_index, float grad_loss, int64_t num_valid,
                                    float* grad_student, const int64_t* grad_student_strides,
                                    float* grad_teacher, const int64_t* grad_teacher_strides,
                                    float* pixel_stats, int path, int64_t threads) {
  kdops::cuda::ResizedPixelKLBackwardParams p{};
  fill_inputs(p, student, student_strides, teacher, teacher_strides, sizes, align_corners, tau,
              target, target_strides, ignore_index);
  p.grad_student = grad_student;
  p.grad_teacher = grad_teacher;
  if (grad_student != nullptr) p.grad_student_strides = strides4(grad_student_strides);
  if (grad_teacher != nullptr) p.grad_teacher_strides = strides4(grad_teacher_strides);
  p.tau = static_cast<float>(tau);
  p.pixel_stats = pixel_stats;
  std::vector<float> anchors(2 * kdops::cuda::resized::input_pixels(p));
  p.anchors = anchors.data();
  run_anchors(p);
  // As resized_pixel_kl_grads_kernel forms it from the device scalars.
  const float scale = p.tau * grad_loss / static_cast<float>(num_valid > 0 ? num_valid : 1);
  const int64_t pixels = kdops::cuda::resized::output_pixels(p);
  for (int64_t pixel = 0; pixel < pixels; ++pixel) {
    kdops::cuda::resized::backward_pixel_stats<float>(p, pixel);
  }
  namespace rz = kdops::cuda::resized;
  rz::GatherTiles tiles;
  if (path == 0 && rz::choose_gather_tiles(p, threads, tiles)) {
    // resized_pixel_kl_gather_kernel, its block's threads run one after the other between the
    // barriers: step 1 for every x of the span, then step 2 for every column of the tile.
    constexpr int K = rz::kChannelsPerItem;
    constexpr int R = rz::kRowsPerBlock;
    std::vector<float> shared_s(rz::kSpanPitch * K), shared_t(rz::kSpanPitch * K);
    using Acc = float[R][K];
    std::vector<Acc> acc_s(tiles.cols), acc_t(tiles.cols);
    const int64_t blocks = rz::gather_blocks(p, tiles);
    for (int64_t block = 0; block < blocks; ++block) {
      const rz::GatherBlock b = rz::gather_block(p, tiles, block);
      for (int64_t lane = 0; lane < tiles.cols; ++lane) {
        for (int rho = 0; rho < R; ++rho) {
          for (int k = 0; k < K; ++k) acc_s[lane][rho][k] = acc_t[lane][rho][k] = 0.f;
        }
      }
      // NaN in the shared buffers: a step 2 reading a slot step 1 did not write shows.
      std::fill(shared_s.begin(), shared_s.end(), std::nanf(""));
      std::fill(shared_t.begin(), shared_t.end(), std::nanf(""));
      for (int64_t y = b.y_begin; y < b.y_end; ++y) {
        const kdops::BilinearTap ty = kdops::bilinear_tap(p.rows, y);
        if (!rz::gather_row_read(b, ty)) continue;
        for (int64_t x = b.x_begin; x < b.x_end; ++x) {
          rz::gather_output_grads<float>(p, b, y, ty, x, scale, shared_s.data(), shared_t.data());
        }
        for (int64_t j = b.j0; j < b.j_end; ++j) {
          rz::gather_add_row(p, b, ty, j, shared_s.data(), shared_t.data(), acc_s[j - b.j0],
                             acc_t[j - b.j0]);
        }
      }
      for (int64_t j = b.j0; j < b.j_end; ++j) {
        rz::gather_write<float>(p, b, j, acc_s[j - b.j0], acc_t[j - b.j0]);
      }
    }
    return 0;
  }
  const int64_t items = rz::backward_items(p);
  for (int64_t item = 0; item < items; ++item) rz::backward_input_grads<float>(p, item, scale);
  return 1;
}

}  // extern "C"

extern "C" {

// Each output's (i0, i1, λ) along one axis (out entries each).
void resized_pixel_kl_host_taps(int64_t in, int64_t out, int align_corners, int64_t* i0,
                                int64_t* i1, float* lambda) {
  const kdops::BilinearAxis axis = bilinear_axis(in, out, align_corners != 0);
  for (int64_t i = 0; i < out; ++i) {
    const kdops::BilinearTap tap = kdops::bilinear_tap(axis, i);
    i0[i] = tap.i0;
    i1[i] = tap.i1;
    lambda[i] = tap.lambda;
  }
}

// Each input's candidate readers [begin, end) and each (output, input) weight (out × in, row-major).
void resized_pixel_kl_host_readers(int64_t in, int64_t out, int align_corners, int64_t* begin,
                                   int64_t* end, float* weights) {
  const kdops::BilinearAxis axis = bilinear_axis(in, out, align_corners != 0);
  for (int64_t r = 0; r < in; ++r) {
    const kdops::BilinearRange range = kdops::bilinear_readers(axis, r);
    begin[r] = range.begin;
    end[r] = range.end;
  }
  for (int64_t i = 0; i < out; ++i) {
    const kdops::BilinearTap tap = kdops::bilinear_tap(axis, i);
    for (int64_t r = 0; r < in; ++r) weights[i * in + r] = kdops::bilinear_weight(tap, r);
  }
}

}  // extern "C"
