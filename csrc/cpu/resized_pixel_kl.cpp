// CPU kernels of kdops::resized_pixel_kl (forward and backward ops): pixel_kl of two (N, C, h, w)
// logits resized bilinearly to (H, W), the resized logits never stored. Math:
// csrc/common/softmax_kl.h; specification: kdops/reference/softmax_kl.py (bilinear_resize,
// pixel_kl with size).
//
// Interpolation is separable, rows first: an output row y reads input rows y0, y1 with weights
// (1 − λy, λy); its "row" R[c][j] = (1 − λy)·x[c, y0, j] + λy·x[c, y1, j] (C × w values, vector
// loads along j), then output column x reads R at x0, x1 with (1 − λx, λx) (a vector gather per
// channel and tile of output columns). A weight of exactly 0 never multiplies its value (a
// blend), so a −inf logit stays a probability of 0 at the pixels that do not interpolate it.
//
// Anchored (shift-safe), as the reference: every input pixel's logits are read less its anchor
// a (the largest finite logit over C). An output pixel then comes out shifted by Σ w·a, the same
// for all its channels, which the softmaxes ignore; the rounding happens at the magnitude of
// x − a, not of x (logits at 1e4 keep float32 accuracy).
//
// Forward: one work item per output row (n, y): its tiles of kWidth output pixels go through
// the pixel_kl tile state (one pass over C); per-item KL sums and counts are combined in a
// fixed order.
//
// Backward: the transpose of the interpolation, in gather form so that no two threads add into
// one input element. A work item owns a block of input rows of one image and walks, in
// increasing y, every output row that reads one of them: it recomputes that row's softmaxes,
// forms the per-pixel gradients (exact zeros at ignored pixels), folds them horizontally into a
// C × w row (running sums in output-column order) and adds that row, weighted, into the owned
// input rows it touches. Each input row therefore sums its output rows in increasing y, whatever
// the blocks are: the result is bitwise the same for any thread count. An output row read by
// two blocks is recomputed by both (one row in kBlockRows·H/h extra).
#include "cpu/softmax_kl_common.h"

#include <limits>

namespace kdops {
namespace cpu {
namespace {

using at::Tensor;

constexpr int64_t kBlockRows = 4;  // input rows per backward work item

// Where each output position reads along one axis (kdops/reference/softmax_kl.py
// bilinear_source): src = a/b exactly in integers, i0 = a div b, λ = (a mod b)/b.
template <typename acc>
struct AxisTaps {
  std::vector<int64_t> i0, i1;
  std::vector<acc> weight;  // λ: the weight of i1; i0 has 1 − λ

  AxisTaps(int64_t in, int64_t out, bool align_corners) : i0(out), i1(out), weight(out) {
    const int64_t denominator = align_corners ? std::max<int64_t>(out - 1, 1) : 2 * out;
    for (int64_t i = 0; i < out; ++i) {
      const int64_t numerator = align_corners ? i * (in - 1)
                                              : std::max<int64_t>((2 * i + 1) * in - out, 0);
      i0[i] = numerator / denominator;
      i1[i] = std::min<int64_t>(i0[i] + 1, in - 1);
      weight[i] = static_cast<acc>(numerator % denominator) / static_cast<acc>(denominator);
    }
  }
};

// The logits of one image as (C, h, w) with element strides.
struct ImageStrides {
  int64_t n, c, h, w;
};

ImageStrides strides4(const Tensor& x) {
  return {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
}

// The anchors of one input row r of one image: a[j] = the largest finite logit over C at
// (r, j), 0 when there is none.
template <typename scalar_t>
void row_anchors(const scalar_t* x, const ImageStrides& st, int64_t channels, int64_t width,
                 int64_t r, acc_t<scalar_t>* anchors) {
  using acc = acc_t<scalar_t>;
  const acc lowest = -std::numeric_limits<acc>::infinity();
  std::fill(anchors, anchors + width, lowest);
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t* row = x + c * st.c + r * st.h;
    for (int64_t j = 0; j < width; ++j) {
      const acc value = static_cast<acc>(row[j * st.w]);
      if (std::isfinite(value) && value > anchors[j]) anchors[j] = value;
    }
  }
  for (int64_t j = 0; j < width; ++j) {
    if (anchors[j] == lowest) anchors[j] = acc(0);
  }
}

// R[c][j] = (1 − λ)·(x[c, r0, j] − a0[j]) + λ·(x[c, r1, j] − a1[j]) for one image (λ = 0: the r1
// term not read).
template <typename scalar_t>
void interpolate_rows(const scalar_t* x, const ImageStrides& st, int64_t channels, int64_t width,
                      int64_t r0, int64_t r1, acc_t<scalar_t> weight, const acc_t<scalar_t>* a0,
                      const acc_t<scalar_t>* a1, acc_t<scalar_t>* out) {
  using IO = VecIO<scalar_t>;
  using acc = acc_t<scalar_t>;
  using V = typename IO::V;
  constexpr int64_t W = IO::kWidth;
  const bool second = weight > acc(0);
  const V w0(acc(1) - weight), w1(weight);
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t* a = x + c * st.c + r0 * st.h;
    const scalar_t* b = x + c * st.c + r1 * st.h;
    acc* row = out + c * width;
    if (st.w == 1) {
      for (int64_t j = 0; j < width; j += W) {
        const int64_t count = std::min(W, width - j);
        V value = IO::load(a + j, count) - V::loadu(a0 + j, count);
        if (second) value = w0 * value + w1 * (IO::load(b + j, count) - V::loadu(a1 + j, count));
        value.store(row + j, count);
      }
    } else {
      for (int64_t j = 0; j < width; ++j) {
        const acc top = static_cast<acc>(a[j * st.w]) - a0[j];
        row[j] = second ? (acc(1) - weight) * top + weight * (static_cast<acc>(b[j * st.w]) - a1[j]) : top;
      }
    }
  }
}

// Channel c of a tile of output pixels [x_begin, x_begin + W) of one output row, interpolated
// from the row R (C × w): (1 − λx)·R[c][x0] + λx·R[c][x1], λx = 0 not read. Lanes beyond the
// row repeat its last pixel (valid logits; the tile's lane mask drops them).
template <typename scalar_t>
struct ColumnTaps {
  using acc = acc_t<scalar_t>;
  using V = at::vec::Vectorized<acc>;
  using Index = at::vec::Vectorized<at::vec::int_same_size_t<acc>>;
  static constexpr int64_t W = V::size();

  Index x0, x1;
  V w0, w1, reads_x1;

  ColumnTaps(const AxisTaps<acc>& taps, int64_t x_begin, int64_t width_out) {
    at::vec::int_same_size_t<acc> i0[W], i1[W];
    acc l0[W], l1[W], mask[W];
    for (int64_t j = 0; j < W; ++j) {
      const int64_t x = std::min(x_begin + j, width_out - 1);
      i0[j] = static_cast<at::vec::int_same_size_t<acc>>(taps.i0[x]);
      i1[j] = static_cast<at::vec::int_same_size_t<acc>>(taps.i1[x]);
      l1[j] = taps.weight[x];
      l0[j] = acc(1) - taps.weight[x];
      mask[j] = taps.weight[x] > acc(0) ? acc(1) : acc(0);
    }
    x0 = Index::loadu(i0);
    x1 = Index::loadu(i1);
    w0 = V::loadu(l0);
    w1 = V::loadu(l1);
    reads_x1 = V::loadu(mask) != V(acc(0));
  }

  V operator()(const acc* row) const {
    const V a = at::vec::gather<sizeof(acc)>(row, x0);
    const V b = at::vec::gather<sizeof(acc)>(row, x1);
    return V::blendv(w0 * a, w0 * a + w1 * b, reads_x1);
  }
};

// A tile whose channels were interpolated into a [C][W] buffer, read as tile_state reads tiles.
template <typename scalar_t>
struct BufferedTile {
  using acc = acc_t<scalar_t>;
  using V = at::vec::Vectorized<acc>;
  static constexpr int64_t W = V::size();
  const acc* buffer;
  V operator()(int64_t c) const { return V::loadu(buffer + c * W); }
};

// The inputs as the kernels read them.
struct ResizedView {
  Tensor s, t, labels;
  ImageStrides ss, ts;
  int64_t n, c, h, w, out_h, out_w;
  bool align_corners;
  const int64_t* target = nullptr;  // (N, H, W) labels as int64, or null: every pixel counts
  int64_t target_n = 0, target_h = 0, target_w = 0, ignore_index = 0;

  // 1 where output pixel (y, x_begin + j) of image n counts, else 0 (0 for j ≥ count).
  template <typename acc, int64_t W>
  int64_t valid_lanes(int64_t n, int64_t y, int64_t x_begin, int64_t count, acc (&valid)[W]) const {
    int64_t how_many = 0;
    for (int64_t j = 0; j < W; ++j) {
      const bool counts =
          j < count && (target == nullptr ||
                        target[n * target_n + y * target_h + (x_begin + j) * target_w] != ignore_index);
      valid[j] = counts ? acc(1) : acc(0);
      how_many += counts;
    }
    return how_many;
  }
};

ResizedView resized_view(const Tensor& student, const Tensor& teacher,
                         const std::optional<Tensor>& target, int64_t ignore_index,
                         at::IntArrayRef size, bool align_corners) {
  ResizedView v;
  v.s = student;
  v.t = teacher;
  v.ss = strides4(student);
  v.ts = strides4(teacher);
  v.n = student.size(0);
  v.c = student.size(1);
  v.h = student.size(2);
  v.w = student.size(3);
  v.out_h = size[0];
  v.out_w = size[1];
  v.align_corners = align_corners;
  v.ignore_index = ignore_index;
  if (target.has_value()) {
    v.labels = target->to(at::kLong);  // O(output pixels), C times smaller than the logits
    v.target = v.labels.const_data_ptr<int64_t>();
    v.target_n = v.labels.stride(0);
    v.target_h = v.labels.stride(1);
    v.target_w = v.labels.stride(2);
  }
  return v;
}

// The interpolated student and teacher of output pixels [x_begin, x_begin + W) of one output row
// (rows R_s, R_t: C × w each) into [C][W] tile buffers.
template <typename scalar_t>
void interpolate_tile(const ColumnTaps<scalar_t>& taps, const acc_t<scalar_t>* row_s,
                      const acc_t<scalar_t>* row_t, int64_t channels, int64_t width,
                      acc_t<scalar_t>* tile_s, acc_t<scalar_t>* tile_t) {
  constexpr int64_t W = ColumnTaps<scalar_t>::W;
  for (int64_t c = 0; c < channels; ++c) {
    taps(row_s + c * width).store(tile_s + c * W);
    taps(row_t + c * width).store(tile_t + c * W);
  }
}

// The anchored rows R of output row y of image n, student and teacher (anchors: 2·w scratch).
template <typename scalar_t>
void output_rows(const ResizedView& v, const AxisTaps<acc_t<scalar_t>>& rows, int64_t n, int64_t y,
                 acc_t<scalar_t>* anchors, acc_t<scalar_t>* row_s, acc_t<scalar_t>* row_t) {
  const int64_t r0 = rows.i0[y], r1 = rows.i1[y];
  const auto one_side = [&](const scalar_t* x, const ImageStrides& st, acc_t<scalar_t>* row) {
    row_anchors(x, st, v.c, v.w, r0, anchors);
    if (r1 != r0) row_anchors(x, st, v.c, v.w, r1, anchors + v.w);
    interpolate_rows(x, st, v.c, v.w, r0, r1, rows.weight[y], anchors, r1 != r0 ? anchors + v.w : anchors, row);
  };
  one_side(v.s.const_data_ptr<scalar_t>() + n * v.ss.n, v.ss, row_s);
  one_side(v.t.const_data_ptr<scalar_t>() + n * v.ts.n, v.ts, row_t);
}

template <typename scalar_t>
void resized_pixel_kl_forward_kernel(const ResizedView& v, double tau, Tensor& loss,
                                     Tensor& num_valid) {
  using acc = acc_t<scalar_t>;
  using V = at::vec::Vectorized<acc>;
  constexpr int64_t W = V::size();
  const AxisTaps<acc> rows(v.h, v.out_h, v.align_corners), cols(v.w, v.out_w, v.align_corners);
  const acc inv_tau = static_cast<acc>(1.0 / tau);
  const int64_t items = v.n * v.out_h;

  std::vector<acc> row_kl(items);
  std::vector<int64_t> row_valid(items);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc> buf(2 * v.c * v.w + 2 * v.c * W + 2 * v.w);
    acc* row_s = buf.data();
    acc* row_t = row_s + v.c * v.w;
    acc* tile_s = row_t + v.c * v.w;
    acc* tile_t = tile_s + v.c * W;
    acc* anchors = tile_t + v.c * W;
    acc valid[W];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / v.out_h, y = item % v.out_h;
      output_rows<scalar_t>(v, rows, n, y, anchors, row_s, row_t);
      double kl_sum = 0.0;
      int64_t counted = 0;
      for (int64_t x = 0; x < v.out_w; x += W) {
        const int64_t count = std::min(W, v.out_w - x);
        const int64_t lanes = v.valid_lanes(n, y, x, count, valid);
        if (lanes == 0) continue;
        interpolate_tile(ColumnTaps<scalar_t>(cols, x, v.out_w), row_s, row_t, v.c, v.w, tile_s, tile_t);
        const V kl = kl_of(tile_state(BufferedTile<scalar_t>{tile_s}, BufferedTile<scalar_t>{tile_t},
                                      v.c, V(inv_tau), nullptr, nullptr));
        // Blend, not multiply: an ignored pixel's KL may be anything, even inf or NaN.
        const V kept = V::blendv(V(acc(0)), kl, V::loadu(valid) != V(acc(0)));
        kl_sum += at::vec::vec_reduce_all<acc>([](const V& a, const V& b) { return a + b; }, kept);
        counted += lanes;
      }
      row_kl[item] = static_cast<acc>(kl_sum);
      row_valid[item] = counted;
    }
  });
  double total = 0.0;
  int64_t count = 0;
  for (int64_t item = 0; item < items; ++item) {
    total += row_kl[item];
    count += row_valid[item];
  }
  *loss.data_ptr<acc>() =
      static_cast<acc>(total * tau * tau / static_cast<double>(std::max<int64_t>(count, 1)));
  *num_valid.data_ptr<int64_t>() = count;
}

// G[c][j] += Σ_x (weights of output column x on input column j)·g[c][x] for one output row
// g (C × W_out): running sums in output-column order (the columns a run of output pixels reads
// advance monotonically), flushed when the pair of input columns moves on.
template <typename acc>
void fold_columns(const acc* g, const AxisTaps<acc>& cols, int64_t channels, int64_t width_out,
                  int64_t width_in, acc* folded) {
  std::fill(folded, folded + channels * width_in, acc(0));
  for (int64_t c = 0; c < channels; ++c) {
    const acc* gc = g + c * width_out;
    acc* out = folded + c * width_in;
    int64_t at0 = cols.i0[0], at1 = cols.i1[0];
    acc sum0 = acc(0), sum1 = acc(0);
    for (int64_t x = 0; x < width_out; ++x) {
      if (cols.i0[x] != at0) {
        out[at0] += sum0;
        out[at1] += sum1;
        at0 = cols.i0[x];
        at1 = cols.i1[x];
        sum0 = sum1 = acc(0);
      }
      const acc weight = cols.weight[x];
      sum0 += (acc(1) - weight) * gc[x];
      if (weight > acc(0)) sum1 += weight * gc[x];
    }
    out[at0] += sum0;
    out[at1] += sum1;
  }
}

// scale = τ · grad_loss / max(num_valid, 1) (pixel_kl's factor of ∂KL/∂(x/τ) in ∂loss/∂logits).
template <typename scalar_t>
void resized_pixel_kl_backward_kernel(const ResizedView& v, double tau, double scale,
                                      LayoutGradOut* grad_s, LayoutGradOut* grad_t) {
  using IO = VecIO<scalar_t>;
  using acc = acc_t<scalar_t>;
  using V = at::vec::Vectorized<acc>;
  constexpr int64_t W = V::size();
  const AxisTaps<acc> rows(v.h, v.out_h, v.align_corners), cols(v.w, v.out_w, v.align_corners);
  scalar_t* gs = grad_s != nullptr ? grad_s->written.data_ptr<scalar_t>() : nullptr;
  scalar_t* gt = grad_t != nullptr ? grad_t->written.data_ptr<scalar_t>() : nullptr;
  const ImageStrides gss = gs != nullptr ? strides4(grad_s->written) : ImageStrides{0, 0, 0, 0};
  const ImageStrides gts = gt != nullptr ? strides4(grad_t->written) : ImageStrides{0, 0, 0, 0};
  const acc inv_tau = static_cast<acc>(1.0 / tau);
  const V inv_tau_v(inv_tau), scale_v(static_cast<acc>(scale)), zero(acc(0));
  const int64_t blocks = (v.h + kBlockRows - 1) / kBlockRows;
  const int64_t cw = v.c * v.w, c_out = v.c * v.out_w;

  at::parallel_for(0, v.n * blocks, 1, [&](int64_t begin, int64_t end) {
    // rows of the inputs, the output row's gradients (C × W_out), their horizontal fold (C × w),
    // the owned input rows' gradient sums (C × kBlockRows × w), and the tile buffers.
    std::vector<acc> buf(2 * cw + 2 * c_out + 2 * cw + 2 * v.c * kBlockRows * v.w + 4 * v.c * W + 2 * v.w);
    acc* row_s = buf.data();
    acc* row_t = row_s + cw;
    acc* out_gs = row_t + cw;
    acc* out_gt = out_gs + c_out;
    acc* fold_s = out_gt + c_out;
    acc* fold_t = fold_s + cw;
    acc* sum_s = fold_t + cw;
    acc* sum_t = sum_s + v.c * kBlockRows * v.w;
    acc* es = sum_t + v.c * kBlockRows * v.w;
    acc* et = es + v.c * W;
    acc* tile_s = et + v.c * W;
    acc* tile_t = tile_s + v.c * W;
    acc* anchors = tile_t + v.c * W;
    acc valid[W];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / blocks, r_begin = (item % blocks) * kBlockRows;
      const int64_t r_end = std::min(v.h, r_begin + kBlockRows);
      std::fill(sum_s, sum_s + v.c * kBlockRows * v.w, acc(0));
      std::fill(sum_t, sum_t + v.c * kBlockRows * v.w, acc(0));
      for (int64_t y = 0; y < v.out_h; ++y) {
        const int64_t y0 = rows.i0[y], y1 = rows.i1[y];
        const acc wy = rows.weight[y];
        const bool reads0 = y0 >= r_begin && y0 < r_end;
        const bool reads1 = wy > acc(0) && y1 >= r_begin && y1 < r_end;
        if (!reads0 && !reads1) continue;
        output_rows<scalar_t>(v, rows, n, y, anchors, row_s, row_t);
        for (int64_t x = 0; x < v.out_w; x += W) {
          const int64_t count = std::min(W, v.out_w - x);
          if (v.valid_lanes(n, y, x, count, valid) == 0) {
            for (int64_t c = 0; c < v.c; ++c) {
              zero.store(out_gs + c * v.out_w + x, count);
              zero.store(out_gt + c * v.out_w + x, count);
            }
            continue;
          }
          interpolate_tile(ColumnTaps<scalar_t>(cols, x, v.out_w), row_s, row_t, v.c, v.w, tile_s, tile_t);
          const BufferedTile<scalar_t> xs{tile_s}, xt{tile_t};
          const KLState<V> state = tile_state(xs, xt, v.c, inv_tau_v, es, et);
          const KLRowStats<V> r = kl_finalize(state);
          const V inv_zs = V(acc(1)) / state.zs, inv_zt = V(acc(1)) / state.zt;
          // Ignored pixels get exact zeros, whatever their logits (blend, not multiply by 0).
          const V counted = V::loadu(valid) != zero;
          for (int64_t c = 0; c < v.c; ++c) {
            const V q = V::loadu(es + c * W) * inv_zs;
            const V p = V::loadu(et + c * W) * inv_zt;
            if (gs != nullptr) {
              V::blendv(zero, kl_grad_student_at(q, p, scale_v), counted).store(out_gs + c * v.out_w + x, count);
            }
            if (gt != nullptr) {
              const V grad = kl_grad_teacher_at(p, kl_log_p(xt(c), r, inv_tau_v),
                                                kl_log_q(xs(c), r, inv_tau_v), r.kl, scale_v);
              V::blendv(zero, grad, counted).store(out_gt + c * v.out_w + x, count);
            }
          }
        }
        // Fold the output row horizontally, then add it into the owned rows it reads.
        const auto add_rows = [&](const acc* out_g, acc* fold, acc* sum) {
          fold_columns(out_g, cols, v.c, v.out_w, v.w, fold);
          for (int64_t c = 0; c < v.c; ++c) {
            const acc* f = fold + c * v.w;
            if (reads0) {
              acc* dst = sum + (c * kBlockRows + (y0 - r_begin)) * v.w;
              const V weight0(acc(1) - wy);
              for (int64_t j = 0; j < v.w; j += W) {
                const int64_t k = std::min(W, v.w - j);
                (V::loadu(dst + j, k) + weight0 * V::loadu(f + j, k)).store(dst + j, k);
              }
            }
            if (reads1) {
              acc* dst = sum + (c * kBlockRows + (y1 - r_begin)) * v.w;
              const V weight1(wy);
              for (int64_t j = 0; j < v.w; j += W) {
                const int64_t k = std::min(W, v.w - j);
                (V::loadu(dst + j, k) + weight1 * V::loadu(f + j, k)).store(dst + j, k);
              }
            }
          }
        };
        if (gs != nullptr) add_rows(out_gs, fold_s, sum_s);
        if (gt != nullptr) add_rows(out_gt, fold_t, sum_t);
      }
      // Write the owned rows out (each input element exactly once).
      const auto write_rows = [&](const acc* sum, scalar_t* g, const ImageStrides& st) {
        for (int64_t c = 0; c < v.c; ++c) {
          for (int64_t r = r_begin; r < r_end; ++r) {
            const acc* src = sum + (c * kBlockRows + (r - r_begin)) * v.w;
            scalar_t* dst = g + n * st.n + c * st.c + r * st.h;
            if (st.w == 1) {
              for (int64_t j = 0; j < v.w; j += W) {
                const int64_t k = std::min(W, v.w - j);
                IO::store(dst + j, V::loadu(src + j, k), k);
              }
            } else {
              for (int64_t j = 0; j < v.w; ++j) dst[j * st.w] = static_cast<scalar_t>(src[j]);
            }
          }
        }
      };
      if (gs != nullptr) write_rows(sum_s, gs, gss);
      if (gt != nullptr) write_rows(sum_t, gt, gts);
    }
  });
}

void check_resize(const Tensor& student, at::IntArrayRef size,
                  const std::optional<Tensor>& target) {
  TORCH_CHECK_VALUE(student.dim() == 4, "student must have shape (N, C, h, w), got ",
                    student.sizes());
  TORCH_CHECK_VALUE(size.size() == 2 && size[0] >= 1 && size[1] >= 1,
                    "size must be (H, W) with H, W >= 1, got ", size);
  check_target(target, student, size);
}

std::tuple<Tensor, Tensor> resized_pixel_kl_cpu(const Tensor& student, const Tensor& teacher,
                                                const std::optional<Tensor>& target,
                                                int64_t ignore_index, double tau,
                                                at::IntArrayRef size, bool align_corners) {
  check_pair(student, teacher);
  check_tau(tau);
  check_resize(student, size, target);
  const ResizedView v = resized_view(student, teacher, target, ignore_index, size, align_corners);
  Tensor loss = at::empty({}, student.options().dtype(acc_dtype(student)));
  Tensor num_valid = at::empty({}, student.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(),
                                  "resized_pixel_kl_cpu", [&] {
                                    resized_pixel_kl_forward_kernel<scalar_t>(v, tau, loss, num_valid);
                                  });
  return {loss, num_valid};
}

std::tuple<Tensor, Tensor> resized_pixel_kl_backward_cpu(
    const Tensor& grad_loss, const Tensor& student, const Tensor& teacher,
    const std::optional<Tensor>& target, const Tensor& num_valid, int64_t ignore_index, double tau,
    at::IntArrayRef size, bool align_corners, bool student_requires_grad,
    bool teacher_requires_grad) {
  check_pair(student, teacher);
  check_tau(tau);
  check_resize(student, size, target);
  const double g = scalar_of("grad_loss", grad_loss);
  const double valid = scalar_of("num_valid", num_valid);
  const Tensor none = at::empty({0}, student.options());
  if (!student_requires_grad && !teacher_requires_grad) return {none, none};

  const ResizedView v = resized_view(student, teacher, target, ignore_index, size, align_corners);
  // Written through 4-D strides, every element once (LayoutGradOut: directly into empty_like's
  // layout where it merges H, W, else through a buffer).
  PairGradOut grads(student, teacher, student_requires_grad, teacher_requires_grad, Layout::kAny);
  const double scale = tau * g / std::max(valid, 1.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, student.scalar_type(), "resized_pixel_kl_backward_cpu", [&] {
        resized_pixel_kl_backward_kernel<scalar_t>(v, tau, scale, grads.student(),
                                                   grads.teacher());
      });
  return grads.finish(none);
}

}  // namespace
}  // namespace cpu
}  // namespace kdops

TORCH_LIBRARY_IMPL(kdops, CPU, m) {
  m.impl("resized_pixel_kl", &kdops::cpu::resized_pixel_kl_cpu);
  m.impl("resized_pixel_kl_backward", &kdops::cpu::resized_pixel_kl_backward_cpu);
}
