"""Triton kernels of the class-prototype ops: ``prototype_pool``, ``prototype_kl`` (APD) and
``class_variation_loss`` (IFVD).

Math (specification: :mod:`kdops.reference.prototypes`; DESIGN.md "Prototypes"). Programs take
tiles of BLOCK_P consecutive pixels of one image and loop over the channels in BLOCK_C chunks;
accumulation is float32 whatever the input dtype, offsets int64.

* Labels (N, H_l, W_l) are read at the feature resolution through the source row and column
  ``F.interpolate(mode="nearest")`` picks, floor(dst · in/out) in float32, computed in the
  kernels: no resized label map exists. A label outside [0, K) that is not ``ignore_index``
  raises a flag; the launcher turns the flags into a device-side assert (no host sync).
* Class sums (pooling, and the weighted sums of the backward passes) are a one-hot × features
  product (``tl.dot``, float32 accumulation, IEEE for float32 inputs) per program over a fixed
  split of the image's pixel tiles, written as partial sums that are added in a fixed order
  afterwards: deterministic, no atomics.
* prototype_kl keeps a tile's (K × BLOCK_P) cosines in registers (K ≤ 256): the observations
  never reach memory; its backward recomputes them and writes the prototype gradients as
  per-tile partial sums.

Small (K, C) algebra (prototype normalisation and its gradient, means from sums) runs in torch:
it is O(K·C), not O(pixels).

The ops are ``kdops_triton::<op>{, _backward}`` (``torch.library.custom_op``, the schemas of
csrc/kdops.cpp); fake kernels and autograd come from :func:`kdops.ops.prototypes.register_prototype_ops`.
See :mod:`kdops.triton` for why ``custom_op`` rather than ``triton_op``.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from kdops.ops.prototypes import register_prototype_ops
from kdops.triton import _launch
from kdops.triton._launch import (
    GradBuffer, check_kernel_dtype, device_guard, flatten, new_buffer, strides,
)

_NORM_EPS = 1e-12  # F.normalize's floor on a norm

# Test hooks (as in kdops.triton.channel_kl): kdops.triton._launch.POISON_OUTPUTS fills every
# buffer a launcher allocates with NaN (integers: their minimum) so tests prove each element is written;
# _LAUNCH_OVERRIDES replaces launch sizes ("block_p", "block_c", "block_k", "splits").
_LAUNCH_OVERRIDES: dict[str, int] = {}

_MAX_CLASSES = 256  # prototype_kl holds a tile's cosines to every class in registers


# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _pixel_classes(
    labels_ptr, n, positions, pixel_mask, W,
    lab_stride_n, lab_stride_h, lab_stride_w, in_h, in_w, scale_h, scale_w,
    num_classes, ignore_index,
):
    """(class of each pixel as int64, -1 where ignored or past L; out-of-range flag per pixel).
    The label is read at the nearest-neighbour source of pixel (h, w): floor(h·in_h/H)."""
    h = positions // W
    w = positions - h * W
    src_h = tl.minimum((h.to(tl.float32) * scale_h).to(tl.int64), in_h - 1)
    src_w = tl.minimum((w.to(tl.float32) * scale_w).to(tl.int64), in_w - 1)
    value = tl.load(
        labels_ptr + n * lab_stride_n + src_h * lab_stride_h + src_w * lab_stride_w,
        mask=pixel_mask, other=0,
    ).to(tl.int64)
    ignored = value == ignore_index
    bad = pixel_mask & (ignored == 0) & ((value < 0) | (value >= num_classes))
    labelled = pixel_mask & (ignored == 0) & (bad == 0)
    return tl.where(labelled, value, -1), bad


@triton.jit
def _load_tile(x_ptr, n, channels, positions, channel_mask, pixel_mask, stride_n, stride_c, stride_l):
    """(BLOCK_C, BLOCK_P) float32 tile of x[n], zero outside the masks."""
    offsets = n * stride_n + channels[:, None] * stride_c + positions[None, :] * stride_l
    mask = channel_mask[:, None] & pixel_mask[None, :]
    return tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _class_sums_kernel(
    x_ptr, weight_ptr, labels_ptr, sums_ptr, counts_ptr, flags_ptr,
    C, L, W, K, num_tiles, tiles_per_split, num_splits,
    x_stride_n, x_stride_c, x_stride_l,
    lab_stride_n, lab_stride_h, lab_stride_w, in_h, in_w, scale_h, scale_w, ignore_index,
    HAS_WEIGHT: tl.constexpr, NATIVE_16BIT_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Partial class sums of one (image n, split of pixel tiles, channel block, class block):
    sums[n, split, k, c] = Σ_{pixels i of the split, y_i = k} w_i · x[n, c, i] (w = 1 without
    weights); counts[n, split, k] the pixel counts (written by channel block 0); flags[n, split]
    whether a label was out of range (channel and class block 0)."""
    pid_ns = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_k = tl.program_id(2)
    n = (pid_ns // num_splits).to(tl.int64)
    split = pid_ns % num_splits
    classes = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    channels = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    channels = channels.to(tl.int64)
    acc = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
    counts = tl.zeros((BLOCK_K,), dtype=tl.int32)
    bad_any = tl.zeros((BLOCK_P,), dtype=tl.int32)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    for tile in range(first, last):
        positions = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        pixel_mask = positions < L
        positions = positions.to(tl.int64)
        cls, bad = _pixel_classes(
            labels_ptr, n, positions, pixel_mask, W, lab_stride_n, lab_stride_h, lab_stride_w,
            in_h, in_w, scale_h, scale_w, K, ignore_index,
        )
        bad_any = tl.maximum(bad_any, bad.to(tl.int32))
        labelled = cls >= 0
        one_hot = cls[None, :] == classes[:, None]  # (BLOCK_K, BLOCK_P)
        counts += tl.sum(one_hot.to(tl.int32), 1)
        offsets = n * x_stride_n + channels[:, None] * x_stride_c + positions[None, :] * x_stride_l
        x = tl.load(x_ptr + offsets, mask=channel_mask[:, None] & labelled[None, :], other=0.0)
        # An ignored pixel's features may be NaN or inf: 0 × NaN in the product would leak it.
        x = tl.where(labelled[None, :], x, 0.0)
        if HAS_WEIGHT:
            weight = tl.load(weight_ptr + n * L + positions, mask=labelled, other=0.0)
            selector = tl.where(one_hot, weight[None, :], 0.0)
            acc += tl.dot(selector, tl.trans(x.to(tl.float32)), input_precision=DOT_PRECISION)
        elif NATIVE_16BIT_DOT and x.dtype != tl.float32:
            # 16-bit features: tensor cores, exact products (the one-hot is 0/1), float32 sums.
            acc += tl.dot(one_hot.to(x.dtype), tl.trans(x))
        else:
            acc += tl.dot(one_hot.to(tl.float32), tl.trans(x.to(tl.float32)), input_precision=DOT_PRECISION)
    class_mask = classes < K
    out = (pid_ns.to(tl.int64) * K + classes[:, None]) * C + channels[None, :]
    tl.store(sums_ptr + out, acc, mask=class_mask[:, None] & channel_mask[None, :])
    if pid_c == 0:
        tl.store(counts_ptr + pid_ns.to(tl.int64) * K + classes, counts, mask=class_mask)
        if pid_k == 0:
            tl.store(flags_ptr + pid_ns, tl.max(bad_any, 0))


@triton.jit
def _gather_class_rows_kernel(
    rows_ptr, labels_ptr, out_ptr,
    C, L, W, K, num_tiles, group_stride,
    out_stride_n, out_stride_c, out_stride_l,
    lab_stride_n, lab_stride_h, lab_stride_w, in_h, in_w, scale_h, scale_w, ignore_index,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """prototype_pool backward: out[n, c, i] = rows[g, y_i, c] (rows = ∂protos / counts, float32
    (G, K, C); g = n per image, 0 per batch: group_stride K·C or 0); 0 at ignored pixels."""
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = (pid // num_tiles).to(tl.int64)
    positions = (pid % num_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_mask = positions < L
    positions = positions.to(tl.int64)
    channels = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    channel_mask = channels < C
    cls, _ = _pixel_classes(
        labels_ptr, n, positions, pixel_mask, W, lab_stride_n, lab_stride_h, lab_stride_w,
        in_h, in_w, scale_h, scale_w, K, ignore_index,
    )
    labelled = cls >= 0
    row = n * group_stride + tl.maximum(cls, 0) * C
    values = tl.load(rows_ptr + row[None, :] + channels[:, None],
                     mask=channel_mask[:, None] & labelled[None, :], other=0.0)
    offsets = n * out_stride_n + channels[:, None] * out_stride_c + positions[None, :] * out_stride_l
    tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty),
             mask=channel_mask[:, None] & pixel_mask[None, :])


@triton.jit
def _gather_normalized_rows_kernel(
    rows_ptr, labels_ptr, x_ptr, out_ptr,
    C, L, W, K, num_tiles, group_stride,
    x_stride_n, x_stride_c, x_stride_l, out_stride_n, out_stride_c, out_stride_l,
    lab_stride_n, lab_stride_h, lab_stride_w, in_h, in_w, scale_h, scale_w, ignore_index,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """prototype_pool backward of normalised features: with r = rows[g, y_i] (∂protos / counts),
    out[n, :, i] = (r − x̂ (x̂·r)) / ‖x‖ (r / eps when ‖x‖ ≤ eps); 0 at ignored pixels. Two
    passes over the tile's channels: x·r and ‖x‖², then the gradient."""
    pid = tl.program_id(0)
    n = (pid // num_tiles).to(tl.int64)
    positions = (pid % num_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_mask = positions < L
    positions = positions.to(tl.int64)
    cls, _ = _pixel_classes(
        labels_ptr, n, positions, pixel_mask, W, lab_stride_n, lab_stride_h, lab_stride_w,
        in_h, in_w, scale_h, scale_w, K, ignore_index,
    )
    labelled = cls >= 0
    row = n * group_stride + tl.maximum(cls, 0) * C
    dot = tl.zeros((BLOCK_P,), dtype=tl.float32)
    sq = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        channels = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        channel_mask = channels < C
        x = _load_tile(x_ptr, n, channels, positions, channel_mask, labelled, x_stride_n, x_stride_c, x_stride_l)
        r = tl.load(rows_ptr + row[None, :] + channels[:, None],
                    mask=channel_mask[:, None] & labelled[None, :], other=0.0)
        dot += tl.sum(x * r, 0)
        sq += tl.sum(x * x, 0)
    norm = tl.sqrt(sq)
    inv = 1.0 / tl.maximum(norm, 1e-12)
    projection = tl.where(norm > 1e-12, dot * inv * inv, 0.0)  # (x·r)/‖x‖²
    for c0 in range(0, C, BLOCK_C):
        channels = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        channel_mask = channels < C
        mask = channel_mask[:, None] & labelled[None, :]
        x = _load_tile(x_ptr, n, channels, positions, channel_mask, labelled, x_stride_n, x_stride_c, x_stride_l)
        r = tl.load(rows_ptr + row[None, :] + channels[:, None], mask=mask, other=0.0)
        grad = tl.where(mask, (r - x * projection[None, :]) * inv[None, :], 0.0)
        offsets = n * out_stride_n + channels[:, None] * out_stride_c + positions[None, :] * out_stride_l
        tl.store(out_ptr + offsets, grad.to(out_ptr.dtype.element_ty),
                 mask=channel_mask[:, None] & pixel_mask[None, :])


@triton.jit
def _class_cosines(x_ptr, hat_ptr, n, cls, positions, pixel_mask, C, K,
                   stride_n, stride_c, stride_l, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """(x̂·P̂[n, y] per pixel, ‖x‖ per pixel) for pixels of class cls ≥ 0 (P̂ float32 (N, K, C))."""
    labelled = cls >= 0
    dot = tl.zeros((BLOCK_P,), dtype=tl.float32)
    sq = tl.zeros((BLOCK_P,), dtype=tl.float32)
    row = (n * K + tl.maximum(cls, 0)) * C
    for c0 in range(0, C, BLOCK_C):
        channels = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        channel_mask = channels < C
        x = _load_tile(x_ptr, n, channels, positions, channel_mask, pixel_mask, stride_n, stride_c, stride_l)
        hat = tl.load(hat_ptr + row[None, :] + channels[:, None],
                      mask=channel_mask[:, None] & labelled[None, :], other=0.0)
        dot += tl.sum(x * hat, 0)
        sq += tl.sum(x * x, 0)
    norm = tl.sqrt(sq)
    return dot / tl.maximum(norm, 1e-12), norm


@triton.jit
def _class_variation_kernel(
    s_ptr, t_ptr, s_hat_ptr, t_hat_ptr, labels_ptr, grad_loss_ptr,
    partials_ptr, e_ptr, ms_ptr, mt_ptr, ns_ptr, nt_ptr, flags_ptr,
    Cs, Ct, L, W, K, num_tiles, inv_pixels,
    s_stride_n, s_stride_c, s_stride_l, t_stride_n, t_stride_c, t_stride_l,
    lab_stride_n, lab_stride_h, lab_stride_w, in_h, in_w, scale_h, scale_w, ignore_index,
    BACKWARD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """class_variation_loss per tile: m = x̂·P̂[y] of both sides (1 at ignored pixels).
    Forward: partials[pid] = Σ (m_s − m_t)² over the tile. Backward (pass A): per pixel
    e = 2 g (m_s − m_t)/(N·L) at labelled pixels (0 elsewhere), m_s, m_t, ‖s‖, ‖t‖."""
    pid = tl.program_id(0)
    n = (pid // num_tiles).to(tl.int64)
    positions = (pid % num_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_mask = positions < L
    positions = positions.to(tl.int64)
    cls, bad = _pixel_classes(
        labels_ptr, n, positions, pixel_mask, W, lab_stride_n, lab_stride_h, lab_stride_w,
        in_h, in_w, scale_h, scale_w, K, ignore_index,
    )
    labelled = cls >= 0
    m_s, norm_s = _class_cosines(s_ptr, s_hat_ptr, n, cls, positions, pixel_mask, Cs, K,
                                 s_stride_n, s_stride_c, s_stride_l, BLOCK_C, BLOCK_P)
    m_t, norm_t = _class_cosines(t_ptr, t_hat_ptr, n, cls, positions, pixel_mask, Ct, K,
                                 t_stride_n, t_stride_c, t_stride_l, BLOCK_C, BLOCK_P)
    # Selects, not products: an ignored pixel's features may be NaN.
    m_s = tl.where(labelled, m_s, 1.0)
    m_t = tl.where(labelled, m_t, 1.0)
    if BACKWARD:
        scale = 2.0 * tl.load(grad_loss_ptr).to(tl.float32) * inv_pixels
        e = tl.where(labelled, scale * (m_s - m_t), 0.0)
        flat = n * L + positions
        tl.store(e_ptr + flat, e, mask=pixel_mask)
        tl.store(ms_ptr + flat, m_s, mask=pixel_mask)
        tl.store(mt_ptr + flat, m_t, mask=pixel_mask)
        tl.store(ns_ptr + flat, tl.where(labelled, norm_s, 1.0), mask=pixel_mask)
        tl.store(nt_ptr + flat, tl.where(labelled, norm_t, 1.0), mask=pixel_mask)
    else:
        diff = m_s - m_t
        tl.store(partials_ptr + pid, tl.sum(tl.where(pixel_mask, diff * diff, 0.0), 0))
        tl.store(flags_ptr + pid, tl.max(bad.to(tl.int32), 0))


@triton.jit
def _class_variation_grad_kernel(
    x_ptr, hat_ptr, pooled_ptr, labels_ptr, e_ptr, m_ptr, norm_ptr, grad_ptr,
    C, L, W, K, num_tiles, sign,
    x_stride_n, x_stride_c, x_stride_l, g_stride_n, g_stride_c, g_stride_l,
    lab_stride_n, lab_stride_h, lab_stride_w, in_h, in_w, scale_h, scale_w, ignore_index,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """class_variation_loss backward (pass B), one side: at labelled pixels
    ∂x = ±e (P̂_y − x̂ m)/‖x‖ (±e P̂_y/eps when ‖x‖ ≤ eps) + pooled[n, y] (the prototype path,
    ∂P_y / count_y); 0 elsewhere."""
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = (pid // num_tiles).to(tl.int64)
    positions = (pid % num_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_mask = positions < L
    positions = positions.to(tl.int64)
    channels = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    channel_mask = channels < C
    cls, _ = _pixel_classes(
        labels_ptr, n, positions, pixel_mask, W, lab_stride_n, lab_stride_h, lab_stride_w,
        in_h, in_w, scale_h, scale_w, K, ignore_index,
    )
    labelled = cls >= 0
    flat = n * L + positions
    e = tl.load(e_ptr + flat, mask=labelled, other=0.0)
    m = tl.load(m_ptr + flat, mask=labelled, other=0.0)
    norm = tl.load(norm_ptr + flat, mask=labelled, other=1.0)
    inv = 1.0 / tl.maximum(norm, 1e-12)
    direct = sign * e * inv
    project = tl.where(norm > 1e-12, direct * m * inv, 0.0)
    mask = channel_mask[:, None] & labelled[None, :]
    x = _load_tile(x_ptr, n, channels, positions, channel_mask, labelled, x_stride_n, x_stride_c, x_stride_l)
    row = (n * K + tl.maximum(cls, 0)) * C
    hat = tl.load(hat_ptr + row[None, :] + channels[:, None], mask=mask, other=0.0)
    pooled = tl.load(pooled_ptr + row[None, :] + channels[:, None], mask=mask, other=0.0)
    grad = direct[None, :] * hat - project[None, :] * x + pooled
    grad = tl.where(mask, grad, 0.0)
    offsets = n * g_stride_n + channels[:, None] * g_stride_c + positions[None, :] * g_stride_l
    tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty),
             mask=channel_mask[:, None] & pixel_mask[None, :])


@triton.jit
def _tile_cosines(x_ptr, hat_ptr, n, positions, pixel_mask, classes, K, C, hat_row0,
                  stride_n, stride_c, stride_l, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """(cos (BLOCK_K, BLOCK_P) = P̂ x̂ for the tile, ‖x‖ per pixel): P̂ float32 rows from hat_row0."""
    cos = tl.zeros((BLOCK_K, BLOCK_P), dtype=tl.float32)
    sq = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        channels = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        channel_mask = channels < C
        x = _load_tile(x_ptr, n, channels, positions, channel_mask, pixel_mask, stride_n, stride_c, stride_l)
        hat = tl.load(hat_ptr + (hat_row0 + classes[:, None]) * C + channels[None, :],
                      mask=(classes[:, None] < K) & channel_mask[None, :], other=0.0)
        cos += tl.dot(hat, x, input_precision=DOT_PRECISION)
        sq += tl.sum(x * x, 0)
    norm = tl.sqrt(sq)
    return cos / tl.maximum(norm, 1e-12)[None, :], norm


@triton.jit
def _masked_log_softmax(cos, present, inv_tau):
    """log-softmax over the present classes (dim 0) of cos/τ; 0 at absent classes."""
    o = tl.where(present[:, None], cos * inv_tau, float("-inf"))
    top = tl.max(o, 0)
    top = tl.where(top == float("-inf"), 0.0, top)  # nothing present: all terms are masked
    shifted = o - top[None, :]
    lse = tl.log(tl.sum(tl.where(present[:, None], tl.exp(shifted), 0.0), 0))
    return tl.where(present[:, None], shifted - lse[None, :], 0.0)


@triton.jit
def _prototype_kl_kernel(
    s_ptr, t_ptr, s_hat_ptr, t_hat_ptr, present_ptr, grad_loss_ptr,
    partials_ptr, grad_s_ptr, grad_t_ptr, s_protos_partials_ptr, t_protos_partials_ptr,
    Cs, Ct, L, K, num_tiles, group_rows, inv_tau, coef_scale,
    s_stride_n, s_stride_c, s_stride_l, t_stride_n, t_stride_c, t_stride_l,
    gs_stride_n, gs_stride_c, gs_stride_l, gt_stride_n, gt_stride_c, gt_stride_l,
    BACKWARD: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    STUDENT_PROTOS_GRAD: tl.constexpr, TEACHER_PROTOS_GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """prototype_kl on one tile (image n, BLOCK_P pixels), every class at once.
    Forward: partials[pid] = Σ_pixels KL(p‖q). Backward, with d = ∂loss/∂cos
    (coef = g/(N·L·τ): d_s = coef (q − p), d_t = coef p (log p − log q − KL)): the features'
    gradients (∂x̂ = P̂ᵀ d, ∂x = (∂x̂ − x̂ Σ_k d_k cos_k)/‖x‖) and per-tile partial ∂P̂ = d x̂ᵀ."""
    pid = tl.program_id(0)
    n = (pid // num_tiles).to(tl.int64)
    positions = (pid % num_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_mask = positions < L
    positions = positions.to(tl.int64)
    classes = tl.arange(0, BLOCK_K)
    hat_row0 = n * group_rows  # first prototype row of this image's group (0 per batch)
    present = tl.load(present_ptr + hat_row0 + classes, mask=classes < K, other=0) != 0
    cos_s, norm_s = _tile_cosines(s_ptr, s_hat_ptr, n, positions, pixel_mask, classes, K, Cs, hat_row0,
                                  s_stride_n, s_stride_c, s_stride_l, DOT_PRECISION, BLOCK_K, BLOCK_C, BLOCK_P)
    cos_t, norm_t = _tile_cosines(t_ptr, t_hat_ptr, n, positions, pixel_mask, classes, K, Ct, hat_row0,
                                  t_stride_n, t_stride_c, t_stride_l, DOT_PRECISION, BLOCK_K, BLOCK_C, BLOCK_P)
    log_q = _masked_log_softmax(cos_s, present, inv_tau)
    log_p = _masked_log_softmax(cos_t, present, inv_tau)
    prob_t = tl.where(present[:, None], tl.exp(log_p), 0.0)
    kl = tl.sum(prob_t * (log_p - log_q), 0)
    if not BACKWARD:
        tl.store(partials_ptr + pid, tl.sum(tl.where(pixel_mask, kl, 0.0), 0))
    else:
        coef = tl.load(grad_loss_ptr).to(tl.float32) * coef_scale
        valid = present[:, None] & pixel_mask[None, :]
        d_s = tl.where(valid, coef * (tl.exp(log_q) - prob_t), 0.0)
        d_t = tl.where(valid, coef * prob_t * (log_p - log_q - kl[None, :]), 0.0)
        if STUDENT_GRAD or STUDENT_PROTOS_GRAD:
            _prototype_kl_side_grads(
                s_ptr, s_hat_ptr, grad_s_ptr, s_protos_partials_ptr, pid, n, positions, pixel_mask,
                classes, K, Cs, hat_row0, d_s, cos_s, norm_s,
                s_stride_n, s_stride_c, s_stride_l, gs_stride_n, gs_stride_c, gs_stride_l,
                STUDENT_GRAD, STUDENT_PROTOS_GRAD, DOT_PRECISION, BLOCK_K, BLOCK_C, BLOCK_P,
            )
        if TEACHER_GRAD or TEACHER_PROTOS_GRAD:
            _prototype_kl_side_grads(
                t_ptr, t_hat_ptr, grad_t_ptr, t_protos_partials_ptr, pid, n, positions, pixel_mask,
                classes, K, Ct, hat_row0, d_t, cos_t, norm_t,
                t_stride_n, t_stride_c, t_stride_l, gt_stride_n, gt_stride_c, gt_stride_l,
                TEACHER_GRAD, TEACHER_PROTOS_GRAD, DOT_PRECISION, BLOCK_K, BLOCK_C, BLOCK_P,
            )


@triton.jit
def _prototype_kl_side_grads(
    x_ptr, hat_ptr, grad_ptr, protos_partials_ptr, pid, n, positions, pixel_mask, classes, K, C,
    hat_row0, d, cos, norm,
    x_stride_n, x_stride_c, x_stride_l, g_stride_n, g_stride_c, g_stride_l,
    FEATURE_GRAD: tl.constexpr, PROTOS_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    inv = 1.0 / tl.maximum(norm, 1e-12)
    dot = tl.sum(d * cos, 0)  # Σ_k d_k cos_k: the x̂ component of ∂x̂
    projects = norm > 1e-12
    for c0 in range(0, C, BLOCK_C):
        channels = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        channel_mask = channels < C
        x = _load_tile(x_ptr, n, channels, positions, channel_mask, pixel_mask, x_stride_n, x_stride_c, x_stride_l)
        x_hat = x * inv[None, :]
        if FEATURE_GRAD:
            hat = tl.load(hat_ptr + (hat_row0 + classes[:, None]) * C + channels[None, :],
                          mask=(classes[:, None] < K) & channel_mask[None, :], other=0.0)
            d_hat = tl.dot(tl.trans(hat), d, input_precision=DOT_PRECISION)  # (BLOCK_C, BLOCK_P)
            grad = tl.where(projects[None, :], d_hat - x_hat * dot[None, :], d_hat) * inv[None, :]
            offsets = n * g_stride_n + channels[:, None] * g_stride_c + positions[None, :] * g_stride_l
            tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty),
                     mask=channel_mask[:, None] & pixel_mask[None, :])
        if PROTOS_GRAD:
            partial = tl.dot(d, tl.trans(x_hat), input_precision=DOT_PRECISION)  # (BLOCK_K, BLOCK_C)
            out = (pid.to(tl.int64) * K + classes[:, None]) * C + channels[None, :]
            tl.store(protos_partials_ptr + out, partial, mask=(classes[:, None] < K) & channel_mask[None, :])


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

_BLOCK_P = 64        # pixels per tile
_BLOCK_C = 32        # channels per chunk
_BLOCK_K = 32        # classes per class-sum program
_SPLITS = 8          # class-sum programs (pixel splits) per image


def _dot_precision(x: torch.Tensor) -> str:
    """float32-accurate products: 3×TF32 on a GPU (DESIGN "Numerics"), IEEE in the interpreter."""
    return "tf32x3" if x.is_cuda else "ieee"


def _launch(name: str, default: int) -> int:
    return _LAUNCH_OVERRIDES.get(name, default)


class _Labels:
    """The kernel arguments that read labels (N, H_l, W_l) at the feature size (H, W)."""

    def __init__(self, labels: torch.Tensor, height: int, width: int, num_classes: int, ignore_index: int):
        if labels.dtype == torch.uint8 or labels.dtype == torch.int8 or labels.dtype == torch.int16:
            labels = labels.to(torch.int32)
        self.tensor = labels
        in_h, in_w = labels.shape[1:]
        # F.interpolate(mode="nearest")'s scale in float32: in/out rounded once.
        scale_h = float(np.float32(in_h) / np.float32(height))
        scale_w = float(np.float32(in_w) / np.float32(width))
        self.args = (*labels.stride(), in_h, in_w, scale_h, scale_w, ignore_index)
        self.width = width
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def assert_in_range(self, flags: torch.Tensor) -> None:
        """A device-side assert on the kernels' out-of-range flags (no host sync on a GPU)."""
        torch._assert_async(
            flags.max() == 0,
            f"labels hold a value outside [0, num_classes={self.num_classes}) and not "
            f"ignore_index={self.ignore_index}",
        )


def _class_sums(x_flat: torch.Tensor, labels: _Labels, weight: torch.Tensor | None = None):
    """(sums (N, K, C) float32, counts (N, K) int64, flags): Σ over each image's pixels of class
    k of (weight ·) x, from per-split partials added in a fixed order."""
    n, c, length = x_flat.shape
    k = labels.num_classes
    block_p, block_c = _launch("block_p", _BLOCK_P), _launch("block_c", _BLOCK_C)
    block_k = _launch("block_k", _BLOCK_K)
    num_tiles = triton.cdiv(length, block_p)
    splits = min(_launch("splits", _SPLITS), num_tiles)
    tiles_per_split = triton.cdiv(num_tiles, splits)
    splits = triton.cdiv(num_tiles, tiles_per_split)
    sums = new_buffer((n, splits, k, c), torch.float32, x_flat.device)
    counts = new_buffer((n, splits, k), torch.int32, x_flat.device)
    flags = new_buffer((n * splits,), torch.int32, x_flat.device)
    grid = (n * splits, triton.cdiv(c, block_c), triton.cdiv(k, block_k))
    with device_guard(x_flat):
        _class_sums_kernel[grid](
            x_flat, weight, labels.tensor, sums, counts, flags,
            c, length, labels.width, k, num_tiles, tiles_per_split, splits,
            *x_flat.stride(), *labels.args,
            HAS_WEIGHT=weight is not None, NATIVE_16BIT_DOT=x_flat.is_cuda,
            DOT_PRECISION=_dot_precision(x_flat), BLOCK_K=block_k, BLOCK_C=block_c, BLOCK_P=block_p,
        )
    return sums.sum(1), counts.sum(1, dtype=torch.int64), flags


def _means(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return sums / counts.clamp(min=1).unsqueeze(-1).to(sums.dtype)


def _normalized(protos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P̂ = P / max(‖P‖, eps), ‖P‖) of float32 prototypes (…, K, C)."""
    norm = protos.norm(dim=-1, keepdim=True)
    return protos / norm.clamp(min=_NORM_EPS), norm


def _protos_grad_from_hat(grad_hat: torch.Tensor, hat: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """∂P from ∂P̂: (∂P̂ − P̂ (P̂·∂P̂))/‖P‖ where ‖P‖ > eps, else ∂P̂/eps."""
    projected = grad_hat - hat * (hat * grad_hat).sum(-1, keepdim=True)
    return torch.where(norm > _NORM_EPS, projected, grad_hat) / norm.clamp(min=_NORM_EPS)


# -- prototype_pool ------------------------------------------------------------------------


def _prototype_pool_forward(x, labels, num_classes, ignore_index, per_image, normalize_features):
    check_kernel_dtype("x", x)
    flat = flatten(x)
    label_args = _Labels(labels, x.shape[2], x.shape[3], num_classes, ignore_index)
    weight = None
    if normalize_features:
        # Each pixel weighted by 1/max(‖x‖, eps): the class sums of the unit features.
        norms = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float32)
        weight = (1.0 / norms.clamp(min=_NORM_EPS)).contiguous()
    sums, counts, flags = _class_sums(flat, label_args, weight)
    label_args.assert_in_range(flags)
    if not per_image:
        sums, counts = sums.sum(0), counts.sum(0)
    return _means(sums, counts), counts


def _prototype_pool_backward(grad_protos, x, labels, counts, ignore_index, normalize_features):
    num_classes = grad_protos.shape[-2]
    flat = flatten(x)
    n, c, length = flat.shape
    rows = (grad_protos.float() / counts.clamp(min=1).unsqueeze(-1)).contiguous()
    grad = GradBuffer(x)
    label_args = _Labels(labels, x.shape[2], x.shape[3], num_classes, ignore_index)
    block_p, block_c = _launch("block_p", _BLOCK_P), _launch("block_c", _BLOCK_C)
    num_tiles = triton.cdiv(length, block_p)
    group_stride = num_classes * c if grad_protos.dim() == 3 else 0
    with device_guard(x):
        if normalize_features:
            _gather_normalized_rows_kernel[(n * num_tiles,)](
                rows, label_args.tensor, flat, grad.flat, c, length, label_args.width, num_classes,
                num_tiles, group_stride, *flat.stride(), *grad.flat.stride(), *label_args.args,
                BLOCK_C=block_c, BLOCK_P=block_p,
            )
        else:
            _gather_class_rows_kernel[(n * num_tiles, triton.cdiv(c, block_c))](
                rows, label_args.tensor, grad.flat, c, length, label_args.width, num_classes,
                num_tiles, group_stride, *grad.flat.stride(), *label_args.args,
                BLOCK_C=block_c, BLOCK_P=block_p,
            )
    return grad.finish()


# -- prototype_kl --------------------------------------------------------------------------


def _kl_launch(student, teacher, student_protos, teacher_protos, counts, tau, *, backward,
               grad_loss=None, needs=(False, False, False, False)):
    check_kernel_dtype("student", student)
    check_kernel_dtype("teacher", teacher)
    num_classes = student_protos.shape[-2]
    if num_classes > _MAX_CLASSES:
        raise ValueError(f"student_protos: the Triton prototype_kl takes at most {_MAX_CLASSES} classes, "
                         f"got {num_classes}")
    s, t = flatten(student), flatten(teacher)
    n, cs, length = s.shape
    ct = t.shape[1]
    s_hat, s_norm = _normalized(student_protos.float())
    t_hat, t_norm = _normalized(teacher_protos.float())
    s_hat, t_hat = s_hat.contiguous(), t_hat.contiguous()
    present = (counts > 0).to(torch.int32).contiguous()
    group_rows = num_classes if student_protos.dim() == 3 else 0
    block_k = max(16, triton.next_power_of_2(num_classes))
    # A tile's (BLOCK_K × BLOCK_P) cosines of both sides live in registers: fewer pixels per
    # tile for many classes (K = 150: 16 pixels).
    block_p = _launch("block_p", max(16, min(_BLOCK_P, 4096 // block_k)))
    block_c = _launch("block_c", _BLOCK_C)
    num_tiles = triton.cdiv(length, block_p)
    grid = (n * num_tiles,)
    partials = new_buffer(grid if not backward else (0,), torch.float32, s.device)
    grad_student, grad_teacher = GradBuffer(student, needs[0]), GradBuffer(teacher, needs[1])
    grad_s, grad_t = grad_student.flat, grad_teacher.flat
    s_partials = new_buffer((n * num_tiles, num_classes, cs) if needs[2] else (0,), torch.float32, s.device)
    t_partials = new_buffer((n * num_tiles, num_classes, ct) if needs[3] else (0,), torch.float32, s.device)
    with device_guard(s):
        _prototype_kl_kernel[grid](
            s, t, s_hat, t_hat, present, grad_loss if grad_loss is not None else partials,
            partials, grad_s, grad_t, s_partials, t_partials,
            cs, ct, length, num_classes, num_tiles, group_rows, 1.0 / tau,
            1.0 / (n * length * tau),
            *s.stride(), *t.stride(), *strides(grad_s), *strides(grad_t),
            BACKWARD=backward, STUDENT_GRAD=needs[0], TEACHER_GRAD=needs[1],
            STUDENT_PROTOS_GRAD=needs[2], TEACHER_PROTOS_GRAD=needs[3],
            DOT_PRECISION=_dot_precision(s), BLOCK_K=block_k, BLOCK_C=block_c, BLOCK_P=block_p,
        )
    if not backward:
        return partials.sum() / (n * length)

    def protos_grad(partial, hat, norm, protos, wanted):
        if not wanted:
            return protos.new_empty((0,))
        grad_hat = partial.view(n, num_tiles, num_classes, -1).sum(1)
        if protos.dim() == 2:
            grad_hat = grad_hat.sum(0)
        return _protos_grad_from_hat(grad_hat, hat, norm).to(protos.dtype)

    return (
        grad_student.finish(), grad_teacher.finish(),
        protos_grad(s_partials, s_hat, s_norm, student_protos, needs[2]),
        protos_grad(t_partials, t_hat, t_norm, teacher_protos, needs[3]),
    )


def _prototype_kl_forward(student, teacher, student_protos, teacher_protos, counts, tau):
    return _kl_launch(student, teacher, student_protos, teacher_protos, counts, tau, backward=False)


def _prototype_kl_backward(grad_loss, student, teacher, student_protos, teacher_protos, counts, tau,
                           student_requires_grad, teacher_requires_grad, student_protos_requires_grad,
                           teacher_protos_requires_grad):
    needs = (student_requires_grad, teacher_requires_grad, student_protos_requires_grad,
             teacher_protos_requires_grad)
    return _kl_launch(student, teacher, student_protos, teacher_protos, counts, tau, backward=True,
                      grad_loss=grad_loss, needs=needs)


# -- class_variation_loss -----------------------------------------------------------------


def _variation_pass(student, teacher, label_args, s_hat, t_hat, *, backward, grad_loss=None):
    s, t = flatten(student), flatten(teacher)
    n, cs, length = s.shape
    block_p, block_c = _launch("block_p", _BLOCK_P), _launch("block_c", _BLOCK_C)
    num_tiles = triton.cdiv(length, block_p)
    grid = (n * num_tiles,)
    partials = new_buffer(grid, torch.float32, s.device)
    flags = new_buffer(grid, torch.int32, s.device)
    pixel_shape = (n, length) if backward else (0,)
    e, m_s, m_t, norm_s, norm_t = (new_buffer(pixel_shape, torch.float32, s.device) for _ in range(5))
    with device_guard(s):
        _class_variation_kernel[grid](
            s, t, s_hat, t_hat, label_args.tensor, grad_loss if grad_loss is not None else partials,
            partials, e, m_s, m_t, norm_s, norm_t, flags,
            cs, t.shape[1], length, label_args.width, label_args.num_classes, num_tiles,
            1.0 / (n * length), *s.stride(), *t.stride(), *label_args.args,
            BACKWARD=backward, BLOCK_C=block_c, BLOCK_P=block_p,
        )
    if backward:
        return e, m_s, m_t, norm_s, norm_t
    label_args.assert_in_range(flags)
    return partials.sum() / (n * length)


def _class_variation_loss_forward(student, teacher, labels, num_classes, ignore_index):
    check_kernel_dtype("student", student)
    check_kernel_dtype("teacher", teacher)
    label_args = _Labels(labels, student.shape[2], student.shape[3], num_classes, ignore_index)
    sums_s, counts, flags = _class_sums(flatten(student), label_args)
    sums_t, _, _ = _class_sums(flatten(teacher), label_args)
    label_args.assert_in_range(flags)
    s_protos, t_protos = _means(sums_s, counts), _means(sums_t, counts)
    s_hat, _ = _normalized(s_protos)
    t_hat, _ = _normalized(t_protos)
    loss = _variation_pass(student, teacher, label_args, s_hat.contiguous(), t_hat.contiguous(), backward=False)
    return loss, s_protos, t_protos, counts


def _class_variation_loss_backward(grad_loss, student, teacher, labels, student_protos, teacher_protos,
                                   counts, ignore_index, student_requires_grad, teacher_requires_grad):
    num_classes = student_protos.shape[1]
    label_args = _Labels(labels, student.shape[2], student.shape[3], num_classes, ignore_index)
    s_hat, s_norm = _normalized(student_protos.float())
    t_hat, t_norm = _normalized(teacher_protos.float())
    s_hat, t_hat = s_hat.contiguous(), t_hat.contiguous()
    grad_student = GradBuffer(student, student_requires_grad)
    grad_teacher = GradBuffer(teacher, teacher_requires_grad)
    grad_s, grad_t = grad_student.flat, grad_teacher.flat
    if not (student_requires_grad or teacher_requires_grad):
        return grad_student.finish(), grad_teacher.finish()
    e, m_s, m_t, norm_s, norm_t = _variation_pass(student, teacher, label_args, s_hat, t_hat, backward=True,
                                                  grad_loss=grad_loss)
    block_p, block_c = _launch("block_p", _BLOCK_P), _launch("block_c", _BLOCK_C)
    n, _, length = grad_s.shape if student_requires_grad else grad_t.shape

    def side(x, grad_flat, hat, protos_norm, m, norm, sign):
        flat = flatten(x)
        # The prototype path: ∂P̂_k = Σ_{y_i = k} ±e_i x̂_i, through the normalisation, / count.
        weight = (sign * e / norm.clamp(min=_NORM_EPS)).contiguous()
        grad_hat, _, _ = _class_sums(flat, label_args, weight)
        pooled = _protos_grad_from_hat(grad_hat, hat, protos_norm)
        pooled = (pooled / counts.clamp(min=1).unsqueeze(-1)).contiguous()
        num_tiles = triton.cdiv(length, block_p)
        with device_guard(x):
            _class_variation_grad_kernel[(n * num_tiles, triton.cdiv(flat.shape[1], block_c))](
                flat, hat, pooled, label_args.tensor, e, m, norm, grad_flat,
                flat.shape[1], length, label_args.width, num_classes, num_tiles, sign,
                *flat.stride(), *grad_flat.stride(), *label_args.args,
                BLOCK_C=block_c, BLOCK_P=block_p,
            )

    if student_requires_grad:
        side(student, grad_s, s_hat, s_norm, m_s, norm_s, 1.0)
    if teacher_requires_grad:
        side(teacher, grad_t, t_hat, t_norm, m_t, norm_t, -1.0)
    return grad_student.finish(), grad_teacher.finish()


# ---------------------------------------------------------------------------------------------
# ops: kdops_triton::{prototype_pool, prototype_kl, class_variation_loss}{, _backward}
# ---------------------------------------------------------------------------------------------

_SCHEMAS = {
    "prototype_pool": (
        _prototype_pool_forward,
        "(Tensor x, Tensor labels, int num_classes, int ignore_index, bool per_image, "
        "bool normalize_features) -> (Tensor protos, Tensor counts)",
    ),
    "prototype_pool_backward": (
        _prototype_pool_backward,
        "(Tensor grad_protos, Tensor x, Tensor labels, Tensor counts, int ignore_index, "
        "bool normalize_features) -> Tensor grad_x",
    ),
    "prototype_kl": (
        _prototype_kl_forward,
        "(Tensor student, Tensor teacher, Tensor student_protos, Tensor teacher_protos, "
        "Tensor counts, float tau) -> Tensor loss",
    ),
    "prototype_kl_backward": (
        _prototype_kl_backward,
        "(Tensor grad_loss, Tensor student, Tensor teacher, Tensor student_protos, "
        "Tensor teacher_protos, Tensor counts, float tau, bool student_requires_grad, "
        "bool teacher_requires_grad, bool student_protos_requires_grad, "
        "bool teacher_protos_requires_grad) -> (Tensor grad_student, Tensor grad_teacher, "
        "Tensor grad_student_protos, Tensor grad_teacher_protos)",
    ),
    "class_variation_loss": (
        _class_variation_loss_forward,
        "(Tensor student, Tensor teacher, Tensor labels, int num_classes, int ignore_index) "
        "-> (Tensor loss, Tensor student_protos, Tensor teacher_protos, Tensor counts)",
    ),
    "class_variation_loss_backward": (
        _class_variation_loss_backward,
        "(Tensor grad_loss, Tensor student, Tensor teacher, Tensor labels, Tensor student_protos, "
        "Tensor teacher_protos, Tensor counts, int ignore_index, bool student_requires_grad, "
        "bool teacher_requires_grad) -> (Tensor grad_student, Tensor grad_teacher)",
    ),
}

for _name, (_fn, _schema) in _SCHEMAS.items():
    torch.library.custom_op(f"kdops_triton::{_name}", _fn, mutates_args=(), schema=_schema)

register_prototype_ops("kdops_triton")


# ---------------------------------------------------------------------------------------------
# backend entry points (kdops.backend.OPS): validated arguments, positional
# ---------------------------------------------------------------------------------------------


def prototype_pool(x, labels, num_classes, ignore_index, per_image, normalize_features):
    """(protos, counts) of :func:`kdops.prototype_pool`, with autograd."""
    return tuple(torch.ops.kdops_triton.prototype_pool(x, labels, num_classes, ignore_index, per_image,
                                                       normalize_features))


def prototype_kl(student, teacher, student_protos, teacher_protos, counts, tau):
    """:func:`kdops.prototype_kl`: a float32 scalar, with autograd to all four float inputs."""
    return torch.ops.kdops_triton.prototype_kl(student, teacher, student_protos, teacher_protos, counts, tau)


def class_variation_loss(student, teacher, labels, num_classes, ignore_index):
    """:func:`kdops.class_variation_loss`: a float32 scalar, with autograd."""
    return torch.ops.kdops_triton.class_variation_loss(student, teacher, labels, num_classes, ignore_index)[0]
