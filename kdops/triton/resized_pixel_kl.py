"""Triton kernels of ``pixel_kl(size=...)``: the pixel-wise KL of both logits resized bilinearly
to (H, W), without storing the resized logits or their gradient.

Math (specification: :func:`kdops.reference.softmax_kl.pixel_kl` with ``size``). The logits
(N, C, h, w) are read at (H, W) output pixels: per axis, output i reads input i0 with weight
1 − λ and i1 with weight λ (:func:`kdops.reference.softmax_kl.bilinear_source`), and

    x_r[y, x] = (1 − λx)·a(x0) + λx·a(x1),   a(j) = (1 − λy)·x[y0, j] + λy·x[y1, j],

where a term of weight exactly 0 is neither read nor multiplied (a −inf logit reaches only the
pixels that interpolate it). Each output pixel then takes pixel_kl's per-pixel softmax KL (the
jit helpers of :mod:`kdops.triton.softmax_kl_rows`: online statistics, shift-safe, teacher −inf =
probability 0), counted where target (N, H, W) ≠ ignore_index.

Forward: a program takes BLOCK_P consecutive output pixels of one image × all C channels,
interpolates every logit it needs from the (small, cached) inputs and writes a partial Σ KL
and count, summed in a fixed order on the host side — as pixel_kl's forward, reading the
inputs through the interpolation.

Backward: per valid output pixel, g_s = k·(q − p) and g_t = k·p(log p − log q − KL) with
k = g·τ/max(V, 1) (pixel_kl's backward), transposed through the interpolation:

    grad[n, c, r, j] = Σ_y wy(y, r) Σ_x wx(x, j) g[n, c, y, x]

(columns first, then rows: the reference's autograd order). Deterministic without atomics: a
program OWNS the input pixels (n, r, j0 … j0 + BLOCK_J − 1) for one chunk of channels, walks in
order the output rows y that read row r and, in each, the output columns that read its inputs,
recomputes those output pixels' softmaxes and sums their weighted gradients into registers;
each input pixel's gradient is written once. An output row is read by two input rows (y0, y1),
so it is recomputed by both owners; an output column shared by two column blocks likewise.
Ignored pixels' gradients are replaced by zeros (a select, never a multiplication by 0) before
they are summed, so NaN in their logits reaches nothing.

Anchored (shift-safe): each output pixel interpolates its corners' x − a, a the anchor of its
corner (y0, x0) — that input pixel's largest finite logit over C (``_anchors``: an (N, h, w)
float32 tensor per input, 1/C of its size) — so the rounding happens at the magnitude of
x − a, not of x (logits with a common offset of 1e4 keep float32 accuracy); the softmax ignores
the shift. The reference (and the CPU kernels) subtract each corner's own anchor instead: the
two differ in rounding only. Four anchors per pixel here cost the backward up to 239 registers
(150 classes, sm_90); one keeps every kernel within 128.

Source positions: exact integer arithmetic, as the reference's bilinear_source (src = a/b,
i0 = a div b, λ = (a mod b)/b): λ is exactly 0 wherever a position hits an input sample, so
a weight-0 neighbour is never read, whatever the compiler fuses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kdops.ops.softmax_kl import (
    check_op_grad_loss, check_op_pair, check_op_size, check_op_target, check_op_tau,
    register_resized_pixel_kl_ops,
)
from kdops.triton._launch import check_kernel_dtype, device_guard, gradient_like, new_buffer
from kdops.triton.softmax_kl_rows import (
    LOG2E, _LN2, _empty_pixel_stats, _kl_from_stats, _kl_grads, _merged, _pixel_chunk_stats,
    _store_kl_partials, _valid_pixels,
)

# Test hook: replaces launch heuristics (keys "block_p", "block_c" of the forward tiles,
# "block_x" output columns per backward step, "block_j" input columns per backward program)
# so small test inputs cross tiles, chunks and blocks.
_LAUNCH_OVERRIDES: dict[str, int] = {}


# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _source(i, in_size, out_size, ALIGN_CORNERS: tl.constexpr, WIDE_POSITIONS: tl.constexpr):
    """(i0, i1, λ) of output positions i (int) along one axis, as the reference's
    bilinear_source: src = a/b exactly in integers (align_corners: a = i·(in − 1),
    b = max(out − 1, 1); else a = max((2i + 1)·in − out, 0), b = 2·out), i0 = a div b,
    i1 = min(i0 + 1, in − 1), λ = (a mod b)/b — exactly 0 where a sample is hit.
    int32 arithmetic (a 64-bit division costs registers) unless WIDE_POSITIONS: a ≥ 2^31."""
    position = i.to(tl.int64) if WIDE_POSITIONS else i.to(tl.int32)
    zero = position * 0  # sizes may arrive as Python ints (specialised): make them tensors
    if ALIGN_CORNERS:
        numerator = position * (in_size - 1)
        denominator = tl.maximum(zero + (out_size - 1), 1)
    else:
        numerator = tl.maximum((2 * position + 1) * in_size - out_size, 0)
        denominator = zero + 2 * out_size
    i0 = (numerator // denominator).to(tl.int32)
    i1 = tl.minimum(i0 + 1, in_size - 1)
    return i0, i1, (numerator % denominator).to(tl.float32) / denominator.to(tl.float32)


@triton.jit
def _reading_outputs(first, last, inv_scale, out_size, ALIGN_CORNERS: tl.constexpr):
    """[lo, hi]: output positions along one axis that may read inputs first … last (a superset
    by a position or two; callers check each position exactly with _source).

    An output reads input r iff its src lies in (r − 1, r + 1); solved for the output position
    with inv_scale = 1/scale (finite: the launcher passes out + 2 when scale is 0, when every
    output reads input 0).
    """
    if ALIGN_CORNERS:
        lo = tl.floor((first - 1).to(tl.float32) * inv_scale) - 1.0
        hi = tl.ceil((last + 1).to(tl.float32) * inv_scale) + 1.0
    else:
        lo = tl.floor((first.to(tl.float32) - 0.5) * inv_scale - 0.5) - 1.0
        hi = tl.ceil((last.to(tl.float32) + 1.5) * inv_scale - 0.5) + 1.0
    lo = tl.maximum(lo, 0.0).to(tl.int32)
    hi = tl.minimum(hi, out_size - 1.0).to(tl.int32)
    return lo, hi


@triton.jit
def _lerp(a, b, weight):
    """(1 − λ)·a + λ·b with b not used where λ = 0 (a −inf or NaN there stays out)."""
    return (1.0 - weight) * a + tl.where(weight > 0, weight * b, 0.0)


@triton.jit
def _resized_logits(ptr, row0, row1, col0, col1, weight_y, weight_x, anchor, channel_offsets, mask):
    """Float32 logits interpolated at a [pixels, channels] tile, less each pixel's anchor: rows
    first (a(j) along y at input columns x0 and x1), then columns, as the reference, on the
    corners' x − anchor (shift-safe). row*/col* are element offsets (image included), weights
    λy, λx and the anchor broadcastable to the tile. Corners of weight 0 are not loaded."""
    # Weights broadcast to the tile before they are compared (triton 3.9's interpreter mis-types
    # a 1-element boolean broadcast into a tile).
    read_y1 = tl.where(mask, weight_y, 0.0) > 0
    read_x1 = tl.where(mask, weight_x, 0.0) > 0
    v00 = tl.load(ptr + row0 + col0 + channel_offsets, mask=mask, other=0.0).to(tl.float32)
    v10 = tl.load(ptr + row1 + col0 + channel_offsets, mask=read_y1, other=0.0).to(tl.float32)
    v01 = tl.load(ptr + row0 + col1 + channel_offsets, mask=read_x1, other=0.0).to(tl.float32)
    v11 = tl.load(
        ptr + row1 + col1 + channel_offsets, mask=read_y1 & read_x1, other=0.0
    ).to(tl.float32)
    return _lerp(
        _lerp(v00 - anchor, v10 - anchor, weight_y), _lerp(v01 - anchor, v11 - anchor, weight_y),
        weight_x,
    )


@triton.jit
def _resized_chunk(
    s_ptr, t_ptr, s_rows0, s_rows1, s_cols0, s_cols1, t_rows0, t_rows1, t_cols0, t_cols1,
    weight_y, weight_x, s_anchor, t_anchor, s_stride_c, t_stride_c, c0, C, pixel_mask,
    BLOCK_C: tl.constexpr,
):
    """Channels [c0, c0 + BLOCK_C) of a tile of output pixels, interpolated (0 outside the
    tensor): (s, t, channels (int64), channel mask, element mask)."""
    channels = c0 + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    mask = pixel_mask[:, None] & channel_mask[None, :]
    channels = channels.to(tl.int64)
    s = _resized_logits(
        s_ptr, s_rows0, s_rows1, s_cols0, s_cols1, weight_y, weight_x, s_anchor,
        (channels * s_stride_c)[None, :], mask,
    )
    t = _resized_logits(
        t_ptr, t_rows0, t_rows1, t_cols0, t_cols1, weight_y, weight_x, t_anchor,
        (channels * t_stride_c)[None, :], mask,
    )
    return s, t, channels, channel_mask, mask


@triton.jit
def _resized_stats(
    s_ptr, t_ptr, s_rows0, s_rows1, s_cols0, s_cols1, t_rows0, t_rows1, t_cols0, t_cols1,
    weight_y, weight_x, s_anchor, t_anchor, s_stride_c, t_stride_c, C, pixel_mask, c,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per output pixel of a tile: the statistics (m_s, Σ_s, m_t, Σ_t, cross) of its
    interpolated logits over all C channels, BLOCK_C at a time."""
    m_s, sum_s, m_t, sum_t, cross = _empty_pixel_stats(BLOCK_P)
    for c0 in range(0, C, BLOCK_C):
        s, t, _, channel_mask, _ = _resized_chunk(
            s_ptr, t_ptr, s_rows0, s_rows1, s_cols0, s_cols1, t_rows0, t_rows1, t_cols0, t_cols1,
            weight_y, weight_x, s_anchor, t_anchor, s_stride_c, t_stride_c, c0, C, pixel_mask,
            BLOCK_C,
        )
        cm_s, csum_s, cm_t, csum_t, ccross = _pixel_chunk_stats(s, t, channel_mask, c)
        m_s, sum_s, m_t, sum_t, cross = _merged(
            m_s, sum_s, m_t, sum_t, cross, cm_s, csum_s, cm_t, csum_t, ccross, c
        )
    return m_s, sum_s, m_t, sum_t, cross


@triton.jit
def _column_sums(g, x0, x1, weight_x, j):
    """Σ_x wx(x, j)·g[x, :] over a tile's output columns: (1 − λx) where x0 = j, λx where
    x1 = j and λx > 0 (both at the clamped last column). Selected, never multiplied by 0."""
    left = tl.where((x0 == j)[:, None], (1.0 - weight_x)[:, None] * g, 0.0)
    right = tl.where(((x1 == j) & (weight_x > 0))[:, None], weight_x[:, None] * g, 0.0)
    return tl.sum(left + right, 0)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _resized_pixel_kl_forward_kernel(
    s_ptr, t_ptr, target_ptr, s_anchor_ptr, t_anchor_ptr, kl_partials_ptr, count_partials_ptr,
    C, in_h, in_w, out_h, out_w, num_p_tiles,
    s_stride_n, s_stride_c, s_stride_h, s_stride_w, t_stride_n, t_stride_c, t_stride_h, t_stride_w,
    target_stride_n, target_stride_h, target_stride_w, ignore_index, log2e_over_tau,
    ALIGN_CORNERS: tl.constexpr, WIDE_POSITIONS: tl.constexpr, HAS_TARGET: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program pid = n·num_p_tiles + tile: BLOCK_P consecutive output pixels (row-major over
    H×W) of image n × all C channels; writes Σ KL (natural units) and the count over its valid
    pixels to kl_partials[pid], count_partials[pid]. An ignored pixel's KL is dropped by a
    select."""
    pid = tl.program_id(0)
    n = (pid // num_p_tiles).to(tl.int64)
    positions = (pid % num_p_tiles).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_mask = positions < tl.cast(out_h, tl.int64) * out_w
    y = positions // out_w
    x = positions - y * out_w
    y0, y1, weight_y = _source(y, in_h, out_h, ALIGN_CORNERS, WIDE_POSITIONS)
    x0, x1, weight_x = _source(x, in_w, out_w, ALIGN_CORNERS, WIDE_POSITIONS)
    y0, y1, x0, x1 = y0.to(tl.int64), y1.to(tl.int64), x0.to(tl.int64), x1.to(tl.int64)
    valid = _valid_pixels(
        target_ptr, n * target_stride_n + y * target_stride_h + x * target_stride_w, pixel_mask,
        ignore_index, HAS_TARGET,
    )
    anchor_offsets = (n * in_h + y0) * in_w + x0
    s_anchor = tl.load(s_anchor_ptr + anchor_offsets, mask=pixel_mask, other=0.0)[:, None]
    t_anchor = tl.load(t_anchor_ptr + anchor_offsets, mask=pixel_mask, other=0.0)[:, None]
    _, sum_s, _, sum_t, cross = _resized_stats(
        s_ptr, t_ptr,
        (n * s_stride_n + y0 * s_stride_h)[:, None], (n * s_stride_n + y1 * s_stride_h)[:, None],
        (x0 * s_stride_w)[:, None], (x1 * s_stride_w)[:, None],
        (n * t_stride_n + y0 * t_stride_h)[:, None], (n * t_stride_n + y1 * t_stride_h)[:, None],
        (x0 * t_stride_w)[:, None], (x1 * t_stride_w)[:, None],
        weight_y[:, None], weight_x[:, None], s_anchor, t_anchor, s_stride_c, t_stride_c, C,
        pixel_mask, log2e_over_tau, BLOCK_P, BLOCK_C,
    )
    _store_kl_partials(kl_partials_ptr, count_partials_ptr, pid, valid, sum_s, sum_t, cross)


@triton.jit
def _resized_pixel_kl_backward_kernel(
    grad_loss_ptr, num_valid_ptr, s_ptr, t_ptr, target_ptr, s_anchor_ptr, t_anchor_ptr,
    grad_s_ptr, grad_t_ptr,
    C, in_h, in_w, out_h, out_w, num_j_blocks,
    s_stride_n, s_stride_c, s_stride_h, s_stride_w, t_stride_n, t_stride_c, t_stride_h, t_stride_w,
    target_stride_n, target_stride_h, target_stride_w,
    gs_stride_n, gs_stride_c, gs_stride_h, gs_stride_w,
    gt_stride_n, gt_stride_c, gt_stride_h, gt_stride_w,
    ignore_index, log2e_over_tau, tau, inv_scale_h, inv_scale_w,
    ALIGN_CORNERS: tl.constexpr, WIDE_POSITIONS: tl.constexpr, HAS_TARGET: tl.constexpr,
    STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr, NUM_C_CHUNKS: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_J_LANES: tl.constexpr,
):
    """Program pid = ((n·h + r)·num_j_blocks + block)·NUM_C_CHUNKS + chunk owns the gradients
    of input pixels (n, r, j0 … j0 + BLOCK_J − 1), j0 = block·BLOCK_J, at channels
    [chunk·BLOCK_C, …). It walks the output rows y that may read row r in order, skipping
    those that do not; in each it takes the output columns that may read its inputs BLOCK_X
    at a time, recomputes their softmaxes over all C channels (one read of the tile when C fits
    one chunk), and sums k·(q − p) and k·p(log p − log q − KL) (zero at ignored pixels) into
    its columns (row_*), then its row with the output row's weight (acc_*)."""
    pid = tl.program_id(0)
    chunk = pid % NUM_C_CHUNKS
    rest = pid // NUM_C_CHUNKS
    j0 = (rest % num_j_blocks) * BLOCK_J
    rest = rest // num_j_blocks
    r = rest % in_h
    n = (rest // in_h).to(tl.int64)

    lanes_j = tl.arange(0, BLOCK_J_LANES)
    cols_j = j0 + lanes_j
    j_mask = (lanes_j < BLOCK_J) & (cols_j < in_w)
    own_c0 = chunk * BLOCK_C
    own_channels = (own_c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
    own_channel_mask = own_channels < C
    num_valid = tl.maximum(tl.load(num_valid_ptr), 1).to(tl.float32)
    coef = tl.load(grad_loss_ptr).to(tl.float32) * tau / num_valid

    y_lo, y_hi = _reading_outputs(r, r, inv_scale_h, out_h, ALIGN_CORNERS)
    x_lo, x_hi = _reading_outputs(
        j0, tl.minimum(j0 + BLOCK_J, in_w) - 1, inv_scale_w, out_w, ALIGN_CORNERS
    )
    acc_s = tl.zeros([BLOCK_J_LANES, BLOCK_C], tl.float32)
    acc_t = tl.zeros([BLOCK_J_LANES, BLOCK_C], tl.float32)
    for step in range(0, y_hi - y_lo + 1):
        y = y_lo + step  # a tensor (a bare loop index is a Python int when interpreted)
        y0, y1, weight_y = _source(y, in_h, out_h, ALIGN_CORNERS, WIDE_POSITIONS)
        reads_as_y0 = y0 == r
        reads_as_y1 = (y1 == r) & (weight_y > 0)
        if reads_as_y0 | reads_as_y1:
            s_row0 = n * s_stride_n + y0.to(tl.int64) * s_stride_h
            s_row1 = n * s_stride_n + y1.to(tl.int64) * s_stride_h
            t_row0 = n * t_stride_n + y0.to(tl.int64) * t_stride_h
            t_row1 = n * t_stride_n + y1.to(tl.int64) * t_stride_h
            target_row = n * target_stride_n + y.to(tl.int64) * target_stride_h
            row_s = tl.zeros([BLOCK_J_LANES, BLOCK_C], tl.float32)
            row_t = tl.zeros([BLOCK_J_LANES, BLOCK_C], tl.float32)
            for x_start in range(x_lo, x_hi + 1, BLOCK_X):
                xs = x_start + tl.arange(0, BLOCK_X)
                lane_mask = xs <= x_hi
                x0, x1, weight_x = _source(xs, in_w, out_w, ALIGN_CORNERS, WIDE_POSITIONS)
                valid = _valid_pixels(
                    target_ptr, target_row + xs.to(tl.int64) * target_stride_w, lane_mask,
                    ignore_index, HAS_TARGET,
                )
                anchor_offsets = (n * in_h + y0) * in_w + x0
                s_anchor = tl.load(s_anchor_ptr + anchor_offsets, mask=lane_mask, other=0.0)[:, None]
                t_anchor = tl.load(t_anchor_ptr + anchor_offsets, mask=lane_mask, other=0.0)[:, None]
                s_cols0 = (x0.to(tl.int64) * s_stride_w)[:, None]
                s_cols1 = (x1.to(tl.int64) * s_stride_w)[:, None]
                t_cols0 = (x0.to(tl.int64) * t_stride_w)[:, None]
                t_cols1 = (x1.to(tl.int64) * t_stride_w)[:, None]
                if NUM_C_CHUNKS == 1:
                    s, t, _, channel_mask, _ = _resized_chunk(
                        s_ptr, t_ptr, s_row0, s_row1, s_cols0, s_cols1,
                        t_row0, t_row1, t_cols0, t_cols1, weight_y, weight_x[:, None], s_anchor, t_anchor,
                        s_stride_c, t_stride_c, 0, C, lane_mask, BLOCK_C,
                    )
                    m_s, sum_s, m_t, sum_t, cross = _pixel_chunk_stats(
                        s, t, channel_mask, log2e_over_tau
                    )
                else:
                    m_s, sum_s, m_t, sum_t, cross = _resized_stats(
                        s_ptr, t_ptr, s_row0, s_row1, s_cols0, s_cols1,
                        t_row0, t_row1, t_cols0, t_cols1, weight_y, weight_x[:, None], s_anchor, t_anchor,
                        s_stride_c, t_stride_c, C, lane_mask, log2e_over_tau, BLOCK_X, BLOCK_C,
                    )
                    s, t, _, _, _ = _resized_chunk(
                        s_ptr, t_ptr, s_row0, s_row1, s_cols0, s_cols1,
                        t_row0, t_row1, t_cols0, t_cols1, weight_y, weight_x[:, None], s_anchor, t_anchor,
                        s_stride_c, t_stride_c, own_c0, C, lane_mask, BLOCK_C,
                    )
                log2_zs, log2_zt, kl2 = _kl_from_stats(sum_s, sum_t, cross)
                grad_s, grad_t = _kl_grads(
                    s, t, m_s[:, None], log2_zs[:, None], m_t[:, None], log2_zt[:, None],
                    (kl2 * _LN2)[:, None], coef, log2e_over_tau,
                )
                grad_s = tl.where(valid[:, None], grad_s, 0.0)
                grad_t = tl.where(valid[:, None], grad_t, 0.0)
                for k in tl.static_range(BLOCK_J):
                    into_k = (lanes_j == k)[:, None]
                    if STUDENT_GRAD:
                        column = _column_sums(grad_s, x0, x1, weight_x, j0 + k)
                        row_s += tl.where(into_k, column[None, :], 0.0)
                    if TEACHER_GRAD:
                        column = _column_sums(grad_t, x0, x1, weight_x, j0 + k)
                        row_t += tl.where(into_k, column[None, :], 0.0)
            if reads_as_y0:
                acc_s += (1.0 - weight_y) * row_s
                acc_t += (1.0 - weight_y) * row_t
            if reads_as_y1:
                acc_s += weight_y * row_s
                acc_t += weight_y * row_t

    mask = j_mask[:, None] & own_channel_mask[None, :]
    cols = cols_j.to(tl.int64)[:, None]
    if STUDENT_GRAD:
        offsets = (n * gs_stride_n + r.to(tl.int64) * gs_stride_h + cols * gs_stride_w
                   + own_channels[None, :] * gs_stride_c)
        tl.store(grad_s_ptr + offsets, acc_s.to(grad_s_ptr.dtype.element_ty), mask=mask)
    if TEACHER_GRAD:
        offsets = (n * gt_stride_n + r.to(tl.int64) * gt_stride_h + cols * gt_stride_w
                   + own_channels[None, :] * gt_stride_c)
        tl.store(grad_t_ptr + offsets, acc_t.to(grad_t_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

# Interpolated elements of s (and of t) a program holds per step, and the most channels of one
# chunk. Each element costs ~40 registers (four corners of s and of t, their 64-bit addresses):
# at 2 elements per thread (512 over 8 warps) ptxas stays ≤ 128 registers for sm_90.
_TILE = 512
_MAX_BLOCK_C = 128
_MIN_BLOCK_PIXELS = 4        # pixels (forward) or output columns (backward) per step, at least
# The backward's tile of output columns × channels for up to 32 channels: twice the forward's,
# so that at 8× upsampling a program owns two input columns instead of one (each output column
# is then recomputed 1.5×, not 2×). Measured for sm_90: 99 registers at 32 channels × 32
# columns; wider chunks (128 channels × 8 columns) need 255, so they keep _TILE.
_BACKWARD_TILE = 1024
_BACKWARD_TILE_MAX_BLOCK_C = 32
_MAX_BLOCK_J = 8             # input columns a backward program owns, at most
_READ_MARGIN = 3             # output columns _reading_outputs adds to a block's exact span


@dataclass(frozen=True)
class _Axis:
    """One resized axis: sizes, the scale src/i (float) and its inverse, for the ranges of
    outputs that may read an input (a superset: _source decides exactly)."""

    in_size: int
    out_size: int
    scale: float
    inv_scale: float

    @property
    def outputs_per_input(self) -> float:
        return self.inv_scale if self.scale > 0 else float(self.out_size)


def _wide_positions(*axes: _Axis) -> bool:
    """Whether a source position's numerator, ≤ (2·out + 1)·in, can reach 2^31 (int64 then)."""
    return any((2 * axis.out_size + 1) * axis.in_size >= 2**31 for axis in axes)


def _axis(in_size: int, out_size: int, align_corners: bool) -> _Axis:
    """The scale of F.interpolate's source positions: (in − 1)/(out − 1) (align_corners), in/out
    otherwise (float32, as the ranges of _reading_outputs are computed)."""
    if align_corners:
        scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        scale = float(torch.tensor(scale, dtype=torch.float32))
    else:
        scale = float(torch.tensor(in_size, dtype=torch.float32) / out_size)
    # Scale 0 (align_corners with in or out = 1): every output reads input 0; any inverse ≥ out
    # makes _reading_outputs return all outputs.
    inv_scale = 1.0 / scale if scale > 0 else float(out_size + 2)
    return _Axis(in_size, out_size, scale, inv_scale)


def _block_c(c: int) -> int:
    return _LAUNCH_OVERRIDES.get("block_c", min(triton.next_power_of_2(c), _MAX_BLOCK_C))


def _target_args(target: torch.Tensor | None) -> tuple:
    """(pointer, strides over n, y, x) of the (N, H, W) labels, or no target."""
    if target is None:
        return None, 0, 0, 0
    return (target, *target.stride())


def _check_args(student, teacher, target, tau, size) -> None:
    """The C++ op's checks, with its messages (the op can be called directly)."""
    check_op_pair(student, teacher, four_dims=True)
    check_kernel_dtype("student", student)
    check_op_tau(tau)
    check_op_size(size)
    check_op_target(target, student, size)


def _forward(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None, ignore_index: int,
    tau: float, size: list[int], align_corners: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, num_valid): loss = τ²/max(V, 1) · Σ_valid KL over the (H, W) output pixels, a
    float32 scalar; num_valid V, the int64 count of valid output pixels (N·H·W without
    target)."""
    _check_args(student, teacher, target, tau, size)
    n, c, in_h, in_w = student.shape
    out_h, out_w = size
    rows, cols = _axis(in_h, out_h, align_corners), _axis(in_w, out_w, align_corners)
    block_c = _block_c(c)
    block_p = _LAUNCH_OVERRIDES.get(
        "block_p",
        min(max(_TILE // block_c, _MIN_BLOCK_PIXELS), triton.next_power_of_2(out_h * out_w)),
    )
    num_p_tiles = triton.cdiv(out_h * out_w, block_p)
    grid = (n * num_p_tiles,)
    kl_partials = new_buffer(grid, torch.float32, student.device)
    count_partials = new_buffer(grid, torch.int32, student.device)
    with device_guard(student):
        _resized_pixel_kl_forward_kernel[grid](
            student, teacher, target, _anchors(student), _anchors(teacher), kl_partials, count_partials,
            c, in_h, in_w, out_h, out_w, num_p_tiles, *student.stride(), *teacher.stride(),
            *_target_args(target)[1:], ignore_index, LOG2E / tau,
            ALIGN_CORNERS=align_corners, WIDE_POSITIONS=_wide_positions(rows, cols),
            HAS_TARGET=target is not None,
            BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4 if block_p * block_c < _TILE else 8,
        )
    # Fixed-order reductions of the per-program partials: deterministic, unlike atomics.
    num_valid = count_partials.sum(dtype=torch.int64)
    loss = kl_partials.sum() * (tau * tau) / num_valid.clamp(min=1)
    return loss, num_valid


def _anchors(x: torch.Tensor) -> torch.Tensor:
    """(N, h, w) float32: each input pixel's largest finite logit over C, 0 when none is (the
    anchor of the output pixels whose corner (y0, x0) it is; reference: pixel_anchors). 1/C of
    the input's size."""
    finite = torch.where(torch.isfinite(x), x, torch.full((), -math.inf, dtype=x.dtype, device=x.device))
    peak = finite.amax(dim=1).float()
    return torch.where(torch.isfinite(peak), peak, torch.zeros((), device=x.device)).contiguous()


def _backward_blocks(c: int, cols: _Axis) -> tuple[int, int, int]:
    """(block_x, block_j, block_c): output columns per step, input columns per program, channels
    per chunk. A program's columns are as many as keep the output columns that read them
    (≈ (block_j + 1)·outputs-per-input + the margin) within one step of block_x."""
    block_c = _block_c(c)
    tile = _BACKWARD_TILE if block_c <= _BACKWARD_TILE_MAX_BLOCK_C else _TILE
    block_x = _LAUNCH_OVERRIDES.get(
        "block_x",
        min(
            max(tile // block_c, _MIN_BLOCK_PIXELS),
            triton.next_power_of_2(cols.out_size + 2),
        ),
    )
    fitting = math.floor((block_x - 2 * _READ_MARGIN) / cols.outputs_per_input) - 1
    block_j = _LAUNCH_OVERRIDES.get("block_j", max(1, min(fitting, _MAX_BLOCK_J, cols.in_size)))
    return block_x, block_j, block_c


def _backward(
    grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
    target: torch.Tensor | None, num_valid: torch.Tensor, ignore_index: int, tau: float,
    size: list[int], align_corners: bool, student_requires_grad: bool,
    teacher_requires_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_student, grad_teacher), each shaped like its input (N, C, h, w), or empty when not
    requested."""
    check_op_grad_loss(grad_loss)
    _check_args(student, teacher, target, tau, size)
    # The kernels write any (N, C, h, w) strides: the gradients as the fake kernels promise them.
    grad_student = gradient_like(student, student_requires_grad)
    grad_teacher = gradient_like(teacher, teacher_requires_grad)
    if not (student_requires_grad or teacher_requires_grad):
        return grad_student, grad_teacher
    n, c, in_h, in_w = student.shape
    out_h, out_w = size
    rows, cols = _axis(in_h, out_h, align_corners), _axis(in_w, out_w, align_corners)
    block_x, block_j, block_c = _backward_blocks(c, cols)
    num_c_chunks = triton.cdiv(c, block_c)
    num_j_blocks = triton.cdiv(in_w, block_j)
    grid = (n * in_h * num_j_blocks * num_c_chunks,)
    unused = (0, 0, 0, 0)
    with device_guard(student):
        _resized_pixel_kl_backward_kernel[grid](
            grad_loss, num_valid, student, teacher, target, _anchors(student), _anchors(teacher),
            grad_student, grad_teacher,
            c, in_h, in_w, out_h, out_w, num_j_blocks, *student.stride(), *teacher.stride(),
            *_target_args(target)[1:],
            *(grad_student.stride() if student_requires_grad else unused),
            *(grad_teacher.stride() if teacher_requires_grad else unused),
            ignore_index, LOG2E / tau, tau, rows.inv_scale, cols.inv_scale,
            ALIGN_CORNERS=align_corners, WIDE_POSITIONS=_wide_positions(rows, cols),
            HAS_TARGET=target is not None,
            STUDENT_GRAD=student_requires_grad, TEACHER_GRAD=teacher_requires_grad,
            BLOCK_X=block_x, BLOCK_C=block_c, NUM_C_CHUNKS=num_c_chunks, BLOCK_J=block_j,
            BLOCK_J_LANES=triton.next_power_of_2(block_j),
            num_warps=4 if block_x * block_c < _TILE else 8,
        )
    return grad_student, grad_teacher


# ---------------------------------------------------------------------------------------------
# ops: kdops_triton::resized_pixel_kl{, _backward}, the schemas of csrc/kdops.cpp; fake kernels
# and autograd from kdops.ops.softmax_kl
# ---------------------------------------------------------------------------------------------

torch.library.custom_op(
    "kdops_triton::resized_pixel_kl",
    _forward,
    mutates_args=(),
    schema=(
        "(Tensor student, Tensor teacher, Tensor? target, int ignore_index, float tau, "
        "int[2] size, bool align_corners) -> (Tensor loss, Tensor num_valid)"
    ),
)
torch.library.custom_op(
    "kdops_triton::resized_pixel_kl_backward",
    _backward,
    mutates_args=(),
    schema=(
        "(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? target, Tensor num_valid, "
        "int ignore_index, float tau, int[2] size, bool align_corners, "
        "bool student_requires_grad, bool teacher_requires_grad) "
        "-> (Tensor grad_student, Tensor grad_teacher)"
    ),
)

register_resized_pixel_kl_ops("kdops_triton")
