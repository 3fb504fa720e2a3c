// CUDA kernels of the prototype family (kdops::prototype_pool, kdops::prototype_kl,
// kdops::class_variation_loss and their backward ops): launch parameters and launchers
// (torch-free; included by prototypes_{pool,kl,variation}.cu and by prototypes_api.cpp, which
// fills them from tensors). Math: kdops/reference/prototypes.py (DESIGN.md "Prototypes"); index
// arithmetic of the labels: csrc/common/prototypes.h.
//
// Features are passed as data pointers with (N, C, L) element strides (spatial dims merged).
// Labels (N, H_l, W_l) are read in their own dtype through their own strides at the feature
// resolution (H, W) by nearest neighbour: no resized or converted label map exists. Every sum runs
// in a fixed order (per-thread loops, fixed shuffle trees, per-unit partial sums added by a second
// kernel in unit order): the same bits on every run. Accumulation: float32 for float32 / float16 /
// bfloat16 features, float64 for float64 features; class sums (and the partial sums of prototype
// gradients) in float64, as the CPU kernels do.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/strides.h"

namespace kdops {
namespace cuda {

enum class ProtoDType : int32_t { kFloat32, kFloat16, kBFloat16, kFloat64 };
enum class ProtoLabelDType : int32_t { kInt64, kInt32, kInt16, kInt8, kUInt8 };

// The labels, read at the feature resolution: pixel (h, w) of image n reads
// labels[n, nearest(h), nearest(w)]. A value equal to ignore_index is ignored; a value outside
// [0, num_classes) that is not ignore_index is treated as ignored and sets *bad_label (the
// caller turns it into a device-side assert).
struct ProtoLabels {
  const void* data;
  ProtoLabelDType dtype;
  int64_t stride_n, stride_h, stride_w;
  int64_t in_h, in_w;      // the label map's size
  int64_t height, width;   // the features' size (L = height · width)
  float scale_h, scale_w;  // nearest_scale(in, out) of each dim, computed on the host
  int64_t num_classes, ignore_index;
  int32_t* bad_label;      // 0-dim, set to 1 by a kernel that reads a bad label
};

// One feature tensor read as (N, C, L).
struct ProtoFeatures {
  const void* data;
  Strides3 strides;
  int64_t c;
};

// ---------------------------------------------------------------------------------------------
// Class sums: sums[n, u, k, c] = Σ_{i in unit u of image n, y_i = k} w_i x[n, c, i] (float64),
// for units of consecutive pixels (class_sum_units per image), and unit_counts[n, u, k] (int32)
// the number of such pixels. w = 1, or weights[n, i] (acc type: float32, float64 for float64 features).
// Only the (u, k) with unit_counts > 0 are written in `sums`; unit_counts is written in full.
struct ClassSumsParams {
  ProtoFeatures x;
  ProtoLabels labels;
  int64_t n;
  ProtoDType dtype;
  const void* weights;  // (N, L) acc type with row stride weights_stride_n, or null
  int64_t weights_stride_n;
  double* sums;         // (N, units, K, C)
  int32_t* unit_counts; // (N, units, K)
};
int64_t class_sum_units(int64_t l, int64_t num_classes);  // units per image

// protos[g, k, c] = Σ sums / max(count, 1) over the units of the images of group g (image g per
// image, every image per batch) in unit order; counts[g, k] = Σ unit_counts (int64).
struct ClassMeansParams {
  const double* sums;
  const int32_t* unit_counts;
  int64_t n, units, k, c;
  bool per_image;
  ProtoDType dtype;  // acc type of protos: float32, or float64 for float64 features
  void* protos;      // (G, K, C) contiguous
  int64_t* counts;   // (G, K) contiguous
};

// inv_norms[n, l] = 1 / max(‖x[n, :, l]‖, eps) in the acc type (the weights of a normalised
// pooling).
struct PixelInverseNormsParams {
  ProtoFeatures x;
  int64_t n, l;
  ProtoDType dtype;
  void* inv_norms;  // (N, L) acc type
};

// prototype_pool backward: grad_x[n, c, i] = r = grad_protos[g, y_i, c] / max(counts[g, y_i], 1)
// (g = n per image, 0 per batch); normalised: (r − x̂ (x̂·r)) / ‖x‖ (r / eps when ‖x‖ ≤ eps).
// 0 at ignored pixels.
struct PoolBackwardParams {
  ProtoFeatures x;
  ProtoLabels labels;
  int64_t n, l;
  ProtoDType dtype;
  const void* grad_protos;  // (G, K, C) acc type contiguous
  const int64_t* counts;    // (G, K) contiguous
  bool per_image, normalize;
  void* grad;               // x's dtype
  Strides3 grad_strides;
};

// ---------------------------------------------------------------------------------------------
// Normalised prototypes (G, K, C) acc type: hat = P / max(‖P‖, eps), norm = ‖P‖ (G, K),
// inv = 1/max(‖P‖, eps) (G, K).
struct NormaliseProtosParams {
  const void* protos;  // (G, K, C) acc type contiguous
  int64_t rows, c;     // G·K, C
  ProtoDType dtype;    // acc type
  void* hat;           // (G, K, C)
  void* norm;          // (G, K)
  void* inv;           // (G, K)
};

// The present classes (count > 0) of each group: present[g, j] for j < num_present[g], and
// slot[g, k] = j, or −1 for an absent class.
struct PresentClassesParams {
  const int64_t* counts;  // (G, K) contiguous
  int64_t groups, k;
  int32_t* present;       // (G, K)
  int32_t* num_present;   // (G)
  int32_t* slot;          // (G, K)
};

// prototype_kl. A block per chunk of tiles_per_chunk tiles of 32 pixels of one image.
// Forward: chunk_kl[chunk] = Σ_{pixels} KL(p‖q) (float64). Backward: the gradients of the
// features requested, and per-chunk partial ∂P̂ of each side requested,
// partials[chunk, j, c] = Σ_{pixels of the chunk} ∂loss/∂cos_j · x̂ (float64, j the present index).
struct PrototypeKLParams {
  ProtoFeatures student, teacher;
  int64_t n, l, cs, ct, k;
  int64_t groups;  // N (per image) or 1 (per batch)
  ProtoDType dtype;
  const void* hat_s;  // (G, K, Cs) acc type
  const void* hat_t;  // (G, K, Ct) acc type
  const int32_t* present;
  const int32_t* num_present;
  double inv_tau;
  int64_t tiles_per_chunk, chunks_per_image;
  // forward
  double* chunk_kl;  // (N · chunks_per_image)
  // backward
  const void* grad_loss;  // 0-dim acc type, on the device
  double grad_scale;      // 1/(N·L·τ): ∂loss/∂cos = grad_loss · grad_scale · ∂KL/∂o
  void* grad_s;           // null: not requested
  void* grad_t;
  Strides3 grad_s_strides, grad_t_strides;
  double* partials_s;     // (N · chunks, K, Cs), or null
  double* partials_t;
};
int64_t prototype_kl_tiles_per_chunk(int64_t num_classes, bool backward);
size_t prototype_kl_shared_bytes(int64_t num_classes, ProtoDType dtype);
size_t prototype_kl_max_shared_bytes();  // what the kernels may use on sm_80 / sm_90

// The gradient of each prototype row from partial sums of ∂P̂ over units:
//   grad_hat[g, k] = Σ partials[u, row(k)] over the units u of group g, in unit order
//   (row(k) = slot[g, k] when slot is given: absent classes get 0; else k, and units whose
//   unit_counts[u, k] is 0 are skipped);
//   out[g, k] = (grad_hat − P̂ (P̂·grad_hat)) · inv when ‖P‖ > eps, else grad_hat · inv;
//   divided by counts[g, k] when counts is given (0 where the count is 0).
struct ProtosGradParams {
  const double* partials;     // (units total, K, C)
  const int32_t* unit_counts; // (units total, K), or null
  const int32_t* slot;        // (G, K), or null
  int64_t groups, units_per_group, k, c;
  ProtoDType dtype;           // acc type
  const void* hat;            // (G, K, C)
  const void* norm;           // (G, K)
  const void* inv;            // (G, K)
  const int64_t* counts;      // (G, K), or null
  void* out;                  // (G, K, C) acc type
};

// class_variation_loss, per pixel. Forward: tile_sums[n, tile] = Σ_{pixels} (m_s − m_t)²
// (float64), m = x̂·P̂_y (1 at ignored pixels). Backward pass A (stats != null): per pixel
// e = 2 (m_s − m_t) · grad_loss / (N·L) at labelled pixels (0 elsewhere), and
// stats[n, 0..5, l] = (e/‖x_s‖', −e/‖x_t‖', m_s, m_t, ‖x_s‖, ‖x_t‖) (acc type; ‖x‖' = max(‖x‖, eps)).
struct VariationParams {
  ProtoFeatures student, teacher;
  ProtoLabels labels;
  int64_t n, l, cs, ct, k;
  ProtoDType dtype;
  const void* hat_s;  // (N, K, Cs) acc type
  const void* hat_t;  // (N, K, Ct)
  double* tile_sums;  // forward: (N · ceil(L/32))
  const void* grad_loss;  // backward: 0-dim acc type on the device
  double grad_scale;      // 2/(N·L)
  void* stats;            // backward: (N, 6, L) acc type
};

// class_variation_loss backward pass B for one side: at a labelled pixel i of class k,
//   grad[c] = d_i P̂_k[c] − d_i m_i x[c] / ‖x_i‖' [‖x_i‖ > eps] + pooled[n, k, c],
// d_i = ±e_i/‖x_i‖' (stats row `side`); 0 at ignored pixels.
struct VariationGradParams {
  ProtoFeatures x;
  ProtoLabels labels;
  int64_t n, l, k;
  ProtoDType dtype;
  const void* hat;     // (N, K, C)
  const void* pooled;  // (N, K, C): the gradient through the prototypes, per pixel of class k
  const void* stats;   // (N, 6, L)
  int side;            // 0 student, 1 teacher
  void* grad;
  Strides3 grad_strides;
};

// loss = Σ values (fixed order) · scale, written as the acc type (0-dim).
struct SumParams {
  const double* values;
  int64_t count;
  double scale;
  ProtoDType dtype;
  void* loss;
};

// Each launcher enqueues its kernels on `stream` and returns cudaGetLastError().
cudaError_t launch_class_sums(const ClassSumsParams& params, cudaStream_t stream);
cudaError_t launch_class_means(const ClassMeansParams& params, cudaStream_t stream);
cudaError_t launch_pixel_inverse_norms(const PixelInverseNormsParams& params, cudaStream_t stream);
cudaError_t launch_pool_backward(const PoolBackwardParams& params, cudaStream_t stream);
cudaError_t launch_normalise_protos(const NormaliseProtosParams& params, cudaStream_t stream);
cudaError_t launch_present_classes(const PresentClassesParams& params, cudaStream_t stream);
cudaError_t launch_prototype_kl_forward(const PrototypeKLParams& params, cudaStream_t stream);
cudaError_t launch_prototype_kl_backward(const PrototypeKLParams& params, cudaStream_t stream);
cudaError_t launch_protos_grad(const ProtosGradParams& params, cudaStream_t stream);
cudaError_t launch_variation_forward(const VariationParams& params, cudaStream_t stream);
cudaError_t launch_variation_backward_stats(const VariationParams& params, cudaStream_t stream);
cudaError_t launch_variation_grad(const VariationGradParams& params, cudaStream_t stream);
cudaError_t launch_sum(const SumParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace kdops
