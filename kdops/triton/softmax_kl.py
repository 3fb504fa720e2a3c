"""Triton kernels of the softmax-normalised KL losses: ``channel_kl`` (CWD) and ``pixel_kl`` (KD).

Math (specification: :mod:`kdops.reference.softmax_kl`). A *row* is the vector a softmax runs
over: the L positions of one (n, c) for ``channel_kl``, the C channels of one pixel for
``pixel_kl``. With raw logits s, t, maxima m_s, m_t (logits of the row), ds = (s − m_s)/τ,
dt = (t − m_t)/τ, q = softmax(s/τ), p = softmax(t/τ):

    KL(p‖q) = Σ p (dt − ds) − log z_t + log z_s = A / z_t + log(z_s / z_t),
    z_s = Σ exp(ds),  z_t = Σ exp(dt),  A = Σ exp(dt)(dt − ds),

so the running (m, z) of s and of t and the cross term A, all merged online, give the KL of a
row from ONE read of s and t. Backward, with the row's statistics [m_s, log z_s, m_t, log z_t,
KL]:

    ∂KL/∂(s/τ) = q − p,        ∂KL/∂(t/τ) = p (log p − log q − KL),
    log q = ds − log z_s,      log p = dt − log z_t.

Shift-safe: exponents are formed after the max shift, in raw units, then scaled (s − m_s)/τ,
never s/τ at the magnitude of the logits and then a subtraction; the maxima and the log-sums
are kept apart (their sum rounded to one float would lose those digits again). A teacher −inf
is a probability of exactly 0 (its terms are 0, never 0·inf); a student −inf where p > 0 gives
+inf. Kernels work in base 2 ((x − m)·log2(e)/τ, exp2, log2: the hardware's native exponent);
every statistic that leaves a kernel is in natural units (maxima in raw logit units).
Accumulation is float32 whatever the input dtype; offsets are int64 so tensors over 2^31
elements work.

File layout: jit helpers → kernels → launchers (launch heuristics, buffers) → the
``kdops_triton::`` ops (``custom_op``, fake kernels, autograd) → the backend entry points
:func:`channel_kl` and :func:`pixel_kl` that :mod:`kdops.backend` calls.

Why ``torch.library.custom_op`` and not ``triton_op``: under ``TRITON_INTERPRET=1``,
``wrap_triton`` hands back the interpreted kernel untouched, so ``triton_op``'s functional
decomposition (AOTAutograd: ``opcheck``'s aot_dispatch tests, ``torch.compile``) launches it on
fake tensors and fails; and ``triton_op`` infers its schema from annotations (``int`` becomes
``SymInt``, returns are unnamed) where these ops must share the C++ ops' schemas.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kdops.ops.softmax_kl import ROW_STATS, register_softmax_kl_ops
from kdops.triton import _launch
from kdops.triton._launch import (
    check_kernel_dtype, device_guard, flatten, grad_buffers, new_buffer, strides,
)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_LN2 = tl.constexpr(LN2)
_LOG2E = tl.constexpr(LOG2E)
# The lowest maximum a row's statistics take (the most negative float32): finite, so that a
# −inf logit never meets a −inf maximum (−inf − (−inf) is NaN).
_LOWEST = tl.constexpr(-3.4028234663852886e38)


# Test hooks. With kdops.triton._launch.POISON_OUTPUTS every buffer a launcher allocates
# starts as NaN (integers:
# their minimum), so a test proves that every element is written. _LAUNCH_OVERRIDES replaces
# launch heuristics (keys: "channel_block_r", "channel_block_l", "channel_splits",
# "pixel_block_p", "pixel_block_c") so small test inputs cross blocks, chunks and splits.
_LAUNCH_OVERRIDES: dict[str, int] = {}


# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------
#
# A row's statistics, per lane or per row: maxima m_s, m_t (raw logits, never below _LOWEST so
# that −inf logits never meet a −inf maximum), sum_s = Σ exp2(ds), sum_t = Σ exp2(dt) and the
# cross term cross = Σ exp2(dt)(dt − ds), where ds = (s − m_s)·c, dt = (t − m_t)·c, c = log2(e)/τ
# (base-2 units: exp2 is the hardware's exponent). Every exponent is formed after the shift, in
# raw units, then scaled: shift-safe for logits far from 0 (k·s rounded at |k·s| ~ 1e4 would cost
# ~1e-3 in every exponent). Since Σ exp2(ds) = Σ exp((s − m_s)/τ), the sums are the natural
# z_s, z_t of the row statistics.


@triton.jit
def _rebased(m_s, sum_s, m_t, sum_t, cross, new_m_s, new_m_t, c):
    """(sum_s, sum_t, cross) moved to the maxima new_m_s ≥ m_s, new_m_t ≥ m_t.

    Every dt falls by Δt = (new_m_t − m_t)·c, every ds by Δs: sums scale by exp2(−Δ), and
    cross' = exp2(−Δt)(cross + (Δs − Δt)·sum_t). A maximum raised from _LOWEST can make the
    shift infinite: it counts only where the teacher already has mass (then cross is +inf
    already: a student −inf where p > 0), and a cross of +inf stays +inf.
    """
    alpha_t = tl.exp2((m_t - new_m_t) * c)
    moved_sum_t = alpha_t * sum_t
    shift = ((new_m_s - m_s) - (new_m_t - m_t)) * c
    moved_cross = alpha_t * cross + tl.where(moved_sum_t > 0, moved_sum_t * shift, 0.0)
    moved_cross = tl.where(cross == float("inf"), cross, moved_cross)
    return tl.exp2((m_s - new_m_s) * c) * sum_s, moved_sum_t, moved_cross


@triton.jit
def _cross_term(e_t, dt, ds):
    """exp2(dt)(dt − ds) of one element; 0 where p = 0 (a teacher −inf), whatever s is."""
    return tl.where(e_t > 0, e_t * (dt - ds), 0.0)


@triton.jit
def _online_add(m_s, sum_s, m_t, sum_t, cross, s, t, mask, c):
    """Add raw logits (s, t) to per-lane statistics with one exp2 per logit.

    e = exp2(−|x − m|·c) is either the new term (x ≤ m) or the factor rescaling the old sum
    (x > m, then the new term is 1 and x the new maximum). Lanes where mask is false keep
    their state.
    """
    d_s = (s - m_s) * c
    d_t = (t - m_t) * c
    e_s = tl.exp2(-tl.abs(d_s))
    e_t = tl.exp2(-tl.abs(d_t))
    grow_s = mask & (d_s > 0)
    grow_t = mask & (d_t > 0)
    # The old terms move by the growth of each maximum; the new element's shifted logits are 0
    # for a logit that is the new maximum.
    shift = tl.where(grow_s, d_s, 0.0) - tl.where(grow_t, d_t, 0.0)
    alpha_t = tl.where(grow_t, e_t, 1.0)
    new_e_t = tl.where(grow_t, 1.0, e_t)
    term = _cross_term(new_e_t, tl.where(grow_t, 0.0, d_t), tl.where(grow_s, 0.0, d_s))
    moved = alpha_t * cross + tl.where(sum_t > 0, alpha_t * sum_t * shift, 0.0)
    moved = tl.where(cross == float("inf"), cross, moved)
    cross = tl.where(mask, moved + term, cross)
    sum_s = tl.where(grow_s, sum_s * e_s + 1.0, tl.where(mask, sum_s + e_s, sum_s))
    sum_t = tl.where(grow_t, sum_t * e_t + 1.0, tl.where(mask, sum_t + e_t, sum_t))
    m_s = tl.where(grow_s, s, m_s)
    m_t = tl.where(grow_t, t, m_t)
    return m_s, sum_s, m_t, sum_t, cross


@triton.jit
def _merge_lanes(m_s, sum_s, m_t, sum_t, cross, c, AXIS: tl.constexpr):
    """The statistics of lanes merged along AXIS: every lane moved to the maxima, summed."""
    row_m_s = tl.max(m_s, AXIS)
    row_m_t = tl.max(m_t, AXIS)
    moved_s, moved_t, moved_cross = _rebased(
        m_s, sum_s, m_t, sum_t, cross,
        tl.expand_dims(row_m_s, AXIS), tl.expand_dims(row_m_t, AXIS), c,
    )
    return (
        row_m_s, tl.sum(moved_s, AXIS), row_m_t, tl.sum(moved_t, AXIS), tl.sum(moved_cross, AXIS)
    )


@triton.jit
def _kl_from_stats(sum_s, sum_t, cross):
    """(log2 z_s, log2 z_t, KL in base 2) of rows from their merged statistics (KL = ln2·kl2).

    kl2 = cross/sum_t + log2(sum_s/sum_t): terms of the size of the difference between s and
    t, never of the logits' magnitude.
    """
    return tl.log2(sum_s), tl.log2(sum_t), cross / sum_t + tl.log2(sum_s / sum_t)


@triton.jit
def _kl_grads(s, t, m_s, log2_zs, m_t, log2_zt, kl, coef, c):
    """coef·∂KL/∂(s/τ) and coef·∂KL/∂(t/τ) from raw logits and the row statistics (maxima raw,
    log-sums in base 2, KL natural).

    ∂KL/∂s' = q − p,  ∂KL/∂t' = p (log p − log q − KL) (0 where p = 0), with
    log2 q = (s − m_s)·c − log2 z_s, log2 p = (t − m_t)·c − log2 z_t.
    A result the caller does not store is removed by the compiler.
    """
    log2_q = (s - m_s) * c - log2_zs
    log2_p = (t - m_t) * c - log2_zt
    q = tl.exp2(log2_q)
    p = tl.exp2(log2_p)
    grad_t = tl.where(p > 0, coef * p * ((log2_p - log2_q) * _LN2 - kl), 0.0)
    return coef * (q - p), grad_t


@triton.jit
def _load_pixel_chunk(
    s_ptr, t_ptr, s_pixels, t_pixels, s_stride_c, t_stride_c, c0, C, pixel_mask,
    BLOCK_C: tl.constexpr,
):
    """Channels [c0, c0 + BLOCK_C) of a tile of pixels as raw float32 logits [BLOCK_P, BLOCK_C]
    (0 outside the tensor); and those channels, their mask, and the mask of the elements."""
    channels = c0 + tl.arange(0, BLOCK_C)
    channel_mask = channels < C
    mask = pixel_mask[:, None] & channel_mask[None, :]
    channels = channels.to(tl.int64)
    s = tl.load(s_ptr + s_pixels[:, None] + channels[None, :] * s_stride_c, mask=mask, other=0.0)
    t = tl.load(t_ptr + t_pixels[:, None] + channels[None, :] * t_stride_c, mask=mask, other=0.0)
    return s.to(tl.float32), t.to(tl.float32), channels, channel_mask, mask


@triton.jit
def _pixel_chunk_stats(s, t, channel_mask, c):
    """Per pixel of a chunk of raw logits: (max, Σexp2) of s and of t, and the cross term.

    Channels past C hold 0 in s and t and count for nothing; every chunk has a channel below
    C, so every pixel's maxima are at least _LOWEST (pixels past L hold zeros and are dropped
    by the caller).
    """
    m_s = tl.maximum(tl.max(tl.where(channel_mask[None, :], s, float("-inf")), 1), _LOWEST)
    m_t = tl.maximum(tl.max(tl.where(channel_mask[None, :], t, float("-inf")), 1), _LOWEST)
    d_s = (s - m_s[:, None]) * c
    d_t = (t - m_t[:, None]) * c
    e_s = tl.exp2(tl.where(channel_mask[None, :], d_s, float("-inf")))
    e_t = tl.exp2(tl.where(channel_mask[None, :], d_t, float("-inf")))
    return m_s, tl.sum(e_s, 1), m_t, tl.sum(e_t, 1), tl.sum(_cross_term(e_t, d_t, d_s), 1)


@triton.jit
def _merged(m_s, sum_s, m_t, sum_t, cross, cm_s, csum_s, cm_t, csum_t, ccross, c):
    """Two sets of statistics of the same rows (running, and a new chunk's) merged: both moved
    to the larger maxima, then summed."""
    new_m_s = tl.maximum(m_s, cm_s)
    new_m_t = tl.maximum(m_t, cm_t)
    sum_s, sum_t, cross = _rebased(m_s, sum_s, m_t, sum_t, cross, new_m_s, new_m_t, c)
    csum_s, csum_t, ccross = _rebased(cm_s, csum_s, cm_t, csum_t, ccross, new_m_s, new_m_t, c)
    return new_m_s, sum_s + csum_s, new_m_t, sum_t + csum_t, cross + ccross


@triton.jit
def _pixel_stats(
    s_ptr, t_ptr, s_pixels, t_pixels, s_stride_c, t_stride_c, C, pixel_mask, c,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per pixel of a tile: the merged statistics over all C channels, BLOCK_C at a time."""
    m_s = tl.full([BLOCK_P], _LOWEST, tl.float32)
    m_t = tl.full([BLOCK_P], _LOWEST, tl.float32)
    sum_s = tl.zeros([BLOCK_P], tl.float32)
    sum_t = tl.zeros([BLOCK_P], tl.float32)
    cross = tl.zeros([BLOCK_P], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        s, t, _, channel_mask, _ = _load_pixel_chunk(
            s_ptr, t_ptr, s_pixels, t_pixels, s_stride_c, t_stride_c, c0, C, pixel_mask, BLOCK_C,
        )
        cm_s, csum_s, cm_t, csum_t, ccross = _pixel_chunk_stats(s, t, channel_mask, c)
        m_s, sum_s, m_t, sum_t, cross = _merged(
            m_s, sum_s, m_t, sum_t, cross, cm_s, csum_s, cm_t, csum_t, ccross, c
        )
    return m_s, sum_s, m_t, sum_t, cross


@triton.jit
def _valid_pixels(target_ptr, target_offsets, pixel_mask, ignore_index, HAS_TARGET: tl.constexpr):
    """Pixels of the tile that count: in range, and labelled ≠ ignore_index given a target."""
    if HAS_TARGET:
        labels = tl.load(target_ptr + target_offsets, mask=pixel_mask, other=0)
        return pixel_mask & (labels.to(tl.int64) != ignore_index)
    else:
        return pixel_mask


@triton.jit
def _store_pixel_grads(
    grad_s_ptr, grad_t_ptr, gs_pixels, gt_pixels, gs_stride_c, gt_stride_c, channels, mask, valid,
    s, t, m_s, log2_zs, m_t, log2_zt, kl, coef, c,
    STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
):
    """Per-pixel statistics, coef and valid [BLOCK_P]; a chunk's raw s, t and channels; mask:
    the elements to write. Pixels not valid get exact zeros, whatever their logits hold."""
    grad_s, grad_t = _kl_grads(
        s, t, m_s[:, None], log2_zs[:, None], m_t[:, None], log2_zt[:, None], kl[:, None],
        coef[:, None], c,
    )
    if STUDENT_GRAD:
        grad_s = tl.where(valid[:, None], grad_s, 0.0)
        offsets = gs_pixels[:, None] + channels[None, :] * gs_stride_c
        tl.store(grad_s_ptr + offsets, grad_s.to(grad_s_ptr.dtype.element_ty), mask=mask)
    if TEACHER_GRAD:
        grad_t = tl.where(valid[:, None], grad_t, 0.0)
        offsets = gt_pixels[:, None] + channels[None, :] * gt_stride_c
        tl.store(grad_t_ptr + offsets, grad_t.to(grad_t_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _channel_kl_partials_kernel(
    s_ptr, t_ptr, partials_ptr,
    C, L, num_rows, num_c_tiles, splits, blocks_per_split,
    s_stride_n, s_stride_c, s_stride_l, t_stride_n, t_stride_c, t_stride_l,
    log2e_over_tau,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
):
    """channel_kl forward, step 1: statistics of one split of BLOCK_R rows (channels of one image).

    Program pid = row_tile·splits + split reads positions [split·blocks_per_split·BLOCK_L, …)
    of its rows once, keeping per lane the running statistics, and writes per row the partial
    (m_s, sum_s, m_t, sum_t, cross) to partials (5, num_rows, splits).
    """
    pid = tl.program_id(0)
    split = pid % splits
    row_tile = pid // splits
    n = (row_tile // num_c_tiles).to(tl.int64)
    channels = (row_tile % num_c_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = channels < C
    channels = channels.to(tl.int64)
    s_rows = n * s_stride_n + channels * s_stride_c
    t_rows = n * t_stride_n + channels * t_stride_c

    m_s = tl.full([BLOCK_R, BLOCK_L], _LOWEST, tl.float32)
    m_t = tl.full([BLOCK_R, BLOCK_L], _LOWEST, tl.float32)
    sum_s = tl.zeros([BLOCK_R, BLOCK_L], tl.float32)
    sum_t = tl.zeros([BLOCK_R, BLOCK_L], tl.float32)
    cross = tl.zeros([BLOCK_R, BLOCK_L], tl.float32)
    first_block = split * blocks_per_split
    end_block = tl.minimum(first_block + blocks_per_split, tl.cdiv(L, BLOCK_L))
    for block in range(first_block, end_block):
        positions = block * BLOCK_L + tl.arange(0, BLOCK_L)
        mask = row_mask[:, None] & (positions < L)[None, :]
        positions = positions.to(tl.int64)
        s = tl.load(s_ptr + s_rows[:, None] + positions[None, :] * s_stride_l, mask=mask, other=0.)
        t = tl.load(t_ptr + t_rows[:, None] + positions[None, :] * t_stride_l, mask=mask, other=0.)
        m_s, sum_s, m_t, sum_t, cross = _online_add(
            m_s, sum_s, m_t, sum_t, cross, s.to(tl.float32), t.to(tl.float32), mask,
            log2e_over_tau,
        )

    row_m_s, row_sum_s, row_m_t, row_sum_t, row_cross = _merge_lanes(
        m_s, sum_s, m_t, sum_t, cross, log2e_over_tau, 1
    )
    rows = n * C + channels
    out = partials_ptr + rows * splits + split
    stat_stride = tl.cast(num_rows, tl.int64) * splits
    tl.store(out, row_m_s, mask=row_mask)
    tl.store(out + stat_stride, row_sum_s, mask=row_mask)
    tl.store(out + 2 * stat_stride, row_m_t, mask=row_mask)
    tl.store(out + 3 * stat_stride, row_sum_t, mask=row_mask)
    tl.store(out + 4 * stat_stride, row_cross, mask=row_mask)


@triton.jit
def _channel_kl_merge_kernel(
    partials_ptr, row_stats_ptr, num_rows, splits, log2e_over_tau,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """channel_kl forward, step 2: merge each row's split partials into row_stats (rows, 5) =
    [max_s, log z_s, max_t, log z_t, KL] (maxima raw, the rest natural units); BLOCK_M rows per
    program."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < num_rows
    # Rows past the end re-read the last row: finite, never stored.
    rows = tl.minimum(rows, num_rows - 1).to(tl.int64)
    cols = tl.arange(0, BLOCK_S)
    mask = tl.broadcast_to((cols < splits)[None, :], [BLOCK_M, BLOCK_S])
    offsets = rows[:, None] * splits + cols[None, :]
    stat_stride = tl.cast(num_rows, tl.int64) * splits
    # Columns past `splits` are empty states at the lowest maxima: they add nothing.
    m_s = tl.load(partials_ptr + offsets, mask=mask, other=_LOWEST)
    sum_s = tl.load(partials_ptr + stat_stride + offsets, mask=mask, other=0.0)
    m_t = tl.load(partials_ptr + 2 * stat_stride + offsets, mask=mask, other=_LOWEST)
    sum_t = tl.load(partials_ptr + 3 * stat_stride + offsets, mask=mask, other=0.0)
    cross = tl.load(partials_ptr + 4 * stat_stride + offsets, mask=mask, other=0.0)

    row_m_s, row_sum_s, row_m_t, row_sum_t, row_cross = _merge_lanes(
        m_s, sum_s, m_t, sum_t, cross, log2e_over_tau, 1
    )
    log2_zs, log2_zt, kl2 = _kl_from_stats(row_sum_s, row_sum_t, row_cross)

    out = row_stats_ptr + rows * 5
    tl.store(out, row_m_s, mask=row_mask)
    tl.store(out + 1, log2_zs * _LN2, mask=row_mask)
    tl.store(out + 2, row_m_t, mask=row_mask)
    tl.store(out + 3, log2_zt * _LN2, mask=row_mask)
    tl.store(out + 4, kl2 * _LN2, mask=row_mask)


@triton.jit
def _channel_kl_backward_kernel(
    grad_loss_ptr, s_ptr, t_ptr, row_stats_ptr, grad_s_ptr, grad_t_ptr,
    C, L, num_c_tiles, splits, blocks_per_split,
    s_stride_n, s_stride_c, s_stride_l, t_stride_n, t_stride_c, t_stride_l,
    gs_stride_n, gs_stride_c, gs_stride_l, gt_stride_n, gt_stride_c, gt_stride_l,
    log2e_over_tau, grad_scale,
    BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
    STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
):
    """channel_kl backward: with k = g·τ/(N·C), grad_s = k·(q − p) and
    grad_t = k·p(log p − log q − KL).

    Elementwise given row_stats: the forward's row tiles, each row cut into runs of a few tiles
    (one program per run), one more read of s and t, each requested gradient written once.
    """
    pid = tl.program_id(0)
    split = pid % splits
    row_tile = pid // splits
    n = (row_tile // num_c_tiles).to(tl.int64)
    channels = (row_tile % num_c_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = channels < C
    channels = channels.to(tl.int64)
    stats = row_stats_ptr + (n * C + channels) * 5
    m_s = tl.load(stats, mask=row_mask, other=0.0)[:, None]
    log2_zs = (tl.load(stats + 1, mask=row_mask, other=0.0) * _LOG2E)[:, None]
    m_t = tl.load(stats + 2, mask=row_mask, other=0.0)[:, None]
    log2_zt = (tl.load(stats + 3, mask=row_mask, other=0.0) * _LOG2E)[:, None]
    kl = tl.load(stats + 4, mask=row_mask, other=0.0)[:, None]
    coef = tl.load(grad_loss_ptr).to(tl.float32) * grad_scale
    s_rows = (n * s_stride_n + channels * s_stride_c)[:, None]
    t_rows = (n * t_stride_n + channels * t_stride_c)[:, None]
    gs_rows = (n * gs_stride_n + channels * gs_stride_c)[:, None]
    gt_rows = (n * gt_stride_n + channels * gt_stride_c)[:, None]

    first_block = split * blocks_per_split
    end_block = tl.minimum(first_block + blocks_per_split, tl.cdiv(L, BLOCK_L))
    for block in range(first_block, end_block):
        positions = block * BLOCK_L + tl.arange(0, BLOCK_L)
        mask = row_mask[:, None] & (positions < L)[None, :]
        positions = positions.to(tl.int64)[None, :]
        s = tl.load(s_ptr + s_rows + positions * s_stride_l, mask=mask, other=0.0)
        t = tl.load(t_ptr + t_rows + positions * t_stride_l, mask=mask, other=0.0)
        grad_s, grad_t = _kl_grads(
            s.to(tl.float32), t.to(tl.float32), m_s, log2_zs, m_t, log2_zt, kl, coef,
            log2e_over_tau,
        )
        if STUDENT_GRAD:
            tl.store(grad_s_ptr + gs_rows + positions * gs_stride_l,
                     grad_s.to(grad_s_ptr.dtype.element_ty), mask=mask)
        if TEACHER_GRAD:
            tl.store(grad_t_ptr + gt_rows + positions * gt_stride_l,
                     grad_t.to(grad_t_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pixel_kl_forward_kernel(
    s_ptr, t_ptr, target_ptr, kl_partials_ptr, count_partials_ptr,
    C, L, num_p_tiles,
    s_stride_n, s_stride_c, s_stride_l, t_stride_n, t_stride_c, t_stride_l,
    target_stride_n, target_stride_l, ignore_index, log2e_over_tau,
    HAS_TARGET: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """pixel_kl forward: program pid = n·num_p_tiles + tile takes BLOCK_P consecutive pixels of
    image n × all C channels and writes Σ KL (natural units) and the count over its valid
    pixels to kl_partials[pid] and count_partials[pid]. An ignored pixel's KL (whatever its
    logits hold, NaN included) is dropped by a select, never multiplied by 0."""
    pid = tl.program_id(0)
    n = (pid // num_p_tiles).to(tl.int64)
    positions = (pid % num_p_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_mask = positions < L
    positions = positions.to(tl.int64)
    valid = _valid_pixels(
        target_ptr, n * target_stride_n + positions * target_stride_l, pixel_mask, ignore_index,
        HAS_TARGET,
    )
    s_pixels = n * s_stride_n + positions * s_stride_l
    t_pixels = n * t_stride_n + positions * t_stride_l
    _, sum_s, _, sum_t, cross = _pixel_stats(
        s_ptr, t_ptr, s_pixels, t_pixels, s_stride_c, t_stride_c, C, pixel_mask, log2e_over_tau,
        BLOCK_P, BLOCK_C,
    )
    _, _, kl2 = _kl_from_stats(sum_s, sum_t, cross)
    tl.store(kl_partials_ptr + pid, tl.sum(tl.where(valid, kl2, 0.0), 0) * _LN2)
    tl.store(count_partials_ptr + pid, tl.sum(valid.to(tl.int32), 0))


@triton.jit
def _pixel_kl_backward_kernel(
    grad_loss_ptr, num_valid_ptr, s_ptr, t_ptr, target_ptr, grad_s_ptr, grad_t_ptr,
    C, L, num_p_tiles,
    s_stride_n, s_stride_c, s_stride_l, t_stride_n, t_stride_c, t_stride_l,
    target_stride_n, target_stride_l,
    gs_stride_n, gs_stride_c, gs_stride_l, gt_stride_n, gt_stride_c, gt_stride_l,
    ignore_index, log2e_over_tau, tau,
    HAS_TARGET: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, NUM_C_CHUNKS: tl.constexpr,
):
    """pixel_kl backward on the forward's tiles: recompute each pixel's softmaxes (rows are
    short), then with k = g·τ/max(V, 1): grad_s = k·(q − p), grad_t = k·p(log p − log q −
    KL) at valid pixels and exactly 0 elsewhere. When C fits one chunk the tile is read once."""
    pid = tl.program_id(0)
    n = (pid // num_p_tiles).to(tl.int64)
    positions = (pid % num_p_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_mask = positions < L
    positions = positions.to(tl.int64)
    valid = _valid_pixels(
        target_ptr, n * target_stride_n + positions * target_stride_l, pixel_mask, ignore_index,
        HAS_TARGET,
    )
    num_valid = tl.maximum(tl.load(num_valid_ptr), 1).to(tl.float32)
    coef = tl.zeros([BLOCK_P], tl.float32) + tl.load(grad_loss_ptr).to(tl.float32) * tau / num_valid
    s_pixels = n * s_stride_n + positions * s_stride_l
    t_pixels = n * t_stride_n + positions * t_stride_l
    gs_pixels = n * gs_stride_n + positions * gs_stride_l
    gt_pixels = n * gt_stride_n + positions * gt_stride_l
    if NUM_C_CHUNKS == 1:
        s, t, channels, channel_mask, mask = _load_pixel_chunk(
            s_ptr, t_ptr, s_pixels, t_pixels, s_stride_c, t_stride_c, 0, C, pixel_mask, BLOCK_C,
        )
        m_s, sum_s, m_t, sum_t, cross = _pixel_chunk_stats(s, t, channel_mask, log2e_over_tau)
        log2_zs, log2_zt, kl2 = _kl_from_stats(sum_s, sum_t, cross)
        _store_pixel_grads(
            grad_s_ptr, grad_t_ptr, gs_pixels, gt_pixels, gs_stride_c, gt_stride_c, channels, mask,
            valid, s, t, m_s, log2_zs, m_t, log2_zt, kl2 * _LN2, coef, log2e_over_tau,
            STUDENT_GRAD, TEACHER_GRAD,
        )
    else:
        m_s, sum_s, m_t, sum_t, cross = _pixel_stats(
            s_ptr, t_ptr, s_pixels, t_pixels, s_stride_c, t_stride_c, C, pixel_mask,
            log2e_over_tau, BLOCK_P, BLOCK_C,
        )
        log2_zs, log2_zt, kl2 = _kl_from_stats(sum_s, sum_t, cross)
        for c0 in range(0, C, BLOCK_C):
            s, t, channels, _, mask = _load_pixel_chunk(
                s_ptr, t_ptr, s_pixels, t_pixels, s_stride_c, t_stride_c, c0, C, pixel_mask,
                BLOCK_C,
            )
            _store_pixel_grads(
                grad_s_ptr, grad_t_ptr, gs_pixels, gt_pixels, gs_stride_c, gt_stride_c, channels,
                mask, valid, s, t, m_s, log2_zs, m_t, log2_zt, kl2 * _LN2, coef, log2e_over_tau,
                STUDENT_GRAD, TEACHER_GRAD,
            )


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

_TILE = 2048                 # elements of s (and of t) one channel_kl program holds per step
_MAX_BLOCK_R = 32            # channels_last: channels side by side in one channel_kl tile
_PROGRAMS_PER_SM = 16        # channel_kl forward splits rows until the grid is this deep
_MIN_BLOCKS_PER_SPLIT = 4    # … but never into splits shorter than this many tiles
_BACKWARD_BLOCKS_PER_PROGRAM = 4
_PIXEL_TILE = {4: 2048, 2: 1024}  # BLOCK_P·BLOCK_C of a pixel_kl program, by element size
_MAX_BLOCK_C = 256           # pixel_kl: more channels than this are looped over in chunks


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@dataclass(frozen=True)
class _RowTiling:
    """How channel_kl's rows (n, c) of length L are cut into programs: tiles of block_r rows
    (channels of one image) × block_l positions; each row tile's L in ``splits`` splits of
    ``blocks_per_split`` tiles; one program per (row tile, split)."""

    block_r: int
    block_l: int
    num_c_tiles: int
    splits: int
    blocks_per_split: int
    num_warps: int

    def grid(self, n: int) -> tuple[int]:
        return (n * self.num_c_tiles * self.splits,)


def _row_tiling(s: torch.Tensor, t: torch.Tensor, *, backward: bool) -> _RowTiling:
    """Heuristics for channel_kl's tiles and splits.

    Rows whose positions are contiguous get one row per tile (block_r = 1). When both inputs
    are channels-last (stride 1 over C), a tile spans up to 32 channels so that loads run along
    the contiguous channels. The forward splits rows until the grid holds about
    _PROGRAMS_PER_SM programs per SM (a few rows of a large L — CWD on (8, 19, 512, 1024) has
    152 rows for 132 SMs — would otherwise leave the GPU idle) and merges the split partials in
    a second kernel; the backward is elementwise and simply takes a few tiles per program.
    """
    n, c, length = s.shape
    channels_last = c > 1 and s.stride(1) == 1 and t.stride(1) == 1
    block_r = _LAUNCH_OVERRIDES.get(
        "channel_block_r", min(triton.next_power_of_2(c), _MAX_BLOCK_R) if channels_last else 1
    )
    block_l = _LAUNCH_OVERRIDES.get(
        "channel_block_l", min(max(_TILE // block_r, 16), triton.next_power_of_2(length))
    )
    num_c_tiles = triton.cdiv(c, block_r)
    num_blocks = triton.cdiv(length, block_l)
    if backward:
        blocks_per_split = min(_BACKWARD_BLOCKS_PER_PROGRAM, num_blocks)
    else:
        if "channel_splits" in _LAUNCH_OVERRIDES:
            splits = _LAUNCH_OVERRIDES["channel_splits"]
        elif s.is_cuda:
            row_tiles = n * num_c_tiles
            wanted = triton.cdiv(_PROGRAMS_PER_SM * _num_sms(s.device.index or 0), row_tiles)
            splits = min(wanted, triton.cdiv(num_blocks, _MIN_BLOCKS_PER_SPLIT))
        else:
            splits = 1
        blocks_per_split = triton.cdiv(num_blocks, max(1, min(splits, num_blocks)))
    # Recount so that no split is empty.
    splits = triton.cdiv(num_blocks, blocks_per_split)
    num_warps = 8 if block_r * block_l >= _TILE else 4
    return _RowTiling(block_r, block_l, num_c_tiles, splits, blocks_per_split, num_warps)


def _channel_kl_forward(
    student: torch.Tensor, teacher: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, row_stats): loss = τ²/(N·C) · Σ_rows KL, a float32 scalar; row_stats (N·C, 5)
    float32 = per row [max s, log z_s, max t, log z_t, KL] over the L positions (maxima raw,
    z = Σ exp((x − max)/τ))."""
    check_kernel_dtype("student", student)
    check_kernel_dtype("teacher", teacher)
    s, t = flatten(student), flatten(teacher)
    n, c, length = s.shape
    num_rows = n * c
    tiling = _row_tiling(s, t, backward=False)
    partials = new_buffer((5, num_rows, tiling.splits), torch.float32, s.device)
    row_stats = new_buffer((num_rows, ROW_STATS), torch.float32, s.device)
    block_s = triton.next_power_of_2(tiling.splits)
    block_m = min(max(1, 1024 // block_s), triton.next_power_of_2(num_rows))
    with device_guard(s):
        _channel_kl_partials_kernel[tiling.grid(n)](
            s, t, partials,
            c, length, num_rows, tiling.num_c_tiles, tiling.splits, tiling.blocks_per_split,
            *s.stride(), *t.stride(),
            LOG2E / tau,
            BLOCK_R=tiling.block_r, BLOCK_L=tiling.block_l, num_warps=tiling.num_warps,
        )
        _channel_kl_merge_kernel[(triton.cdiv(num_rows, block_m),)](
            partials, row_stats, num_rows, tiling.splits, LOG2E / tau,
            BLOCK_M=block_m, BLOCK_S=block_s, num_warps=4,
        )
    # A fixed-order reduction of the rows' KL: deterministic, unlike atomics.
    loss = row_stats[:, 4].sum() * (tau * tau / num_rows)
    return loss, row_stats


def _channel_kl_backward(
    grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, row_stats: torch.Tensor,
    tau: float, student_requires_grad: bool, teacher_requires_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_student, grad_teacher), each shaped like its input or empty when not requested."""
    s, t = flatten(student), flatten(teacher)
    n, c, length = s.shape
    grad_student, grad_s = grad_buffers(student, student_requires_grad)
    grad_teacher, grad_t = grad_buffers(teacher, teacher_requires_grad)
    if student_requires_grad or teacher_requires_grad:
        tiling = _row_tiling(s, t, backward=True)
        with device_guard(s):
            _channel_kl_backward_kernel[tiling.grid(n)](
                grad_loss, s, t, row_stats, grad_s, grad_t,
                c, length, tiling.num_c_tiles, tiling.splits, tiling.blocks_per_split,
                *s.stride(), *t.stride(), *strides(grad_s), *strides(grad_t),
                LOG2E / tau, tau / (n * c),
                BLOCK_R=tiling.block_r, BLOCK_L=tiling.block_l,
                STUDENT_GRAD=student_requires_grad, TEACHER_GRAD=teacher_requires_grad,
                num_warps=tiling.num_warps,
            )
    return grad_student, grad_teacher


@dataclass(frozen=True)
class _PixelTiling:
    """pixel_kl's tiles: block_p consecutive pixels of one image × all C channels, block_c at
    a time; one program per (image, pixel tile)."""

    block_p: int
    block_c: int
    num_c_chunks: int
    num_p_tiles: int
    num_warps: int

    def grid(self, n: int) -> tuple[int]:
        return (n * self.num_p_tiles,)


def _pixel_tiling(c: int, length: int, element_size: int) -> _PixelTiling:
    """Heuristics for pixel_kl: all channels of a pixel in one chunk up to 256 (logits have
    ≤ ~150 classes), and as many pixels as fill the tile, at least 8 so that an NCHW tile
    reads whole 32-byte sectors along pixels. The tile (2048 elements, 1024 for 16-bit
    inputs, whose wider vector loads cost registers) keeps ptxas at ≤ ~80 registers per
    thread for sm_90, so 3–4 programs of 8 warps stay resident per SM to hide latency."""
    tile = _PIXEL_TILE[element_size]
    block_c = _LAUNCH_OVERRIDES.get("pixel_block_c", min(triton.next_power_of_2(c), _MAX_BLOCK_C))
    block_p = _LAUNCH_OVERRIDES.get(
        "pixel_block_p", min(max(tile // block_c, 8), triton.next_power_of_2(length))
    )
    num_warps = 8 if block_p * block_c >= tile else 4
    return _PixelTiling(
        block_p, block_c, triton.cdiv(c, block_c), triton.cdiv(length, block_p), num_warps
    )


def _target_args(target: torch.Tensor | None, n: int) -> tuple:
    """(pointer, stride over n, stride over positions) of the (N, L) labels, or no target."""
    if target is None:
        return None, 0, 0
    flat = target.reshape(n, -1)
    return (flat, *flat.stride())


def _pixel_kl_forward(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None, ignore_index: int,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, num_valid): loss = τ²/max(V, 1) · Σ_valid KL, a float32 scalar; num_valid V, the
    int64 count of valid pixels (N·L without target)."""
    check_kernel_dtype("student", student)
    check_kernel_dtype("teacher", teacher)
    s, t = flatten(student), flatten(teacher)
    n, c, length = s.shape
    tiling = _pixel_tiling(c, length, s.element_size())
    grid = tiling.grid(n)
    kl_partials = new_buffer(grid, torch.float32, s.device)
    count_partials = new_buffer(grid, torch.int32, s.device)
    target_flat, target_stride_n, target_stride_l = _target_args(target, n)
    with device_guard(s):
        _pixel_kl_forward_kernel[grid](
            s, t, target_flat, kl_partials, count_partials,
            c, length, tiling.num_p_tiles, *s.stride(), *t.stride(),
            target_stride_n, target_stride_l, ignore_index, LOG2E / tau,
            HAS_TARGET=target is not None, BLOCK_P=tiling.block_p, BLOCK_C=tiling.block_c,
            num_warps=tiling.num_warps,
        )
    # Fixed-order reductions of the per-program partials: deterministic, unlike atomics.
    num_valid = count_partials.sum(dtype=torch.int64)
    loss = kl_partials.sum() * (tau * tau) / num_valid.clamp(min=1)
    return loss, num_valid


def _pixel_kl_backward(
    grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
    target: torch.Tensor | None, num_valid: torch.Tensor, ignore_index: int, tau: float,
    student_requires_grad: bool, teacher_requires_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_student, grad_teacher), each shaped like its input or empty when not requested."""
    s, t = flatten(student), flatten(teacher)
    n, c, length = s.shape
    grad_student, grad_s = grad_buffers(student, student_requires_grad)
    grad_teacher, grad_t = grad_buffers(teacher, teacher_requires_grad)
    if student_requires_grad or teacher_requires_grad:
        tiling = _pixel_tiling(c, length, s.element_size())
        target_flat, target_stride_n, target_stride_l = _target_args(target, n)
        with device_guard(s):
            _pixel_kl_backward_kernel[tiling.grid(n)](
                grad_loss, num_valid, s, t, target_flat, grad_s, grad_t,
                c, length, tiling.num_p_tiles, *s.stride(), *t.stride(),
                target_stride_n, target_stride_l, *strides(grad_s), *strides(grad_t),
                ignore_index, LOG2E / tau, tau,
                HAS_TARGET=target is not None, STUDENT_GRAD=student_requires_grad,
                TEACHER_GRAD=teacher_requires_grad, BLOCK_P=tiling.block_p,
                BLOCK_C=tiling.block_c, NUM_C_CHUNKS=tiling.num_c_chunks,
                num_warps=tiling.num_warps,
            )
    return grad_student, grad_teacher


# ---------------------------------------------------------------------------------------------
# ops: kdops_triton::{channel_kl, pixel_kl}{, _backward}; fake kernels and autograd are
# registered by kdops.ops.softmax_kl, the same way as for the C++ ops
# ---------------------------------------------------------------------------------------------

torch.library.custom_op(
    "kdops_triton::channel_kl",
    _channel_kl_forward,
    mutates_args=(),
    schema="(Tensor student, Tensor teacher, float tau) -> (Tensor loss, Tensor row_stats)",
)
torch.library.custom_op(
    "kdops_triton::channel_kl_backward",
    _channel_kl_backward,
    mutates_args=(),
    schema=(
        "(Tensor grad_loss, Tensor student, Tensor teacher, Tensor row_stats, float tau, "
        "bool student_requires_grad, bool teacher_requires_grad) "
        "-> (Tensor grad_student, Tensor grad_teacher)"
    ),
)
torch.library.custom_op(
    "kdops_triton::pixel_kl",
    _pixel_kl_forward,
    mutates_args=(),
    schema=(
        "(Tensor student, Tensor teacher, Tensor? target, int ignore_index, float tau) "
        "-> (Tensor loss, Tensor num_valid)"
    ),
)
torch.library.custom_op(
    "kdops_triton::pixel_kl_backward",
    _pixel_kl_backward,
    mutates_args=(),
    schema=(
        "(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? target, Tensor num_valid, "
        "int ignore_index, float tau, bool student_requires_grad, bool teacher_requires_grad) "
        "-> (Tensor grad_student, Tensor grad_teacher)"
    ),
)


register_softmax_kl_ops("kdops_triton")


# ---------------------------------------------------------------------------------------------
# backend entry points (kdops.backend.OPS): validated arguments, positional
# ---------------------------------------------------------------------------------------------


def channel_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """τ² · Σ_{n,c} KL(softmax_L(t/τ) ‖ softmax_L(s/τ)) / (N·C): a float32 scalar, with
    autograd."""
    return torch.ops.kdops_triton.channel_kl(student, teacher, tau)[0]


def pixel_kl(
    student: torch.Tensor, teacher: torch.Tensor, tau: float, target: torch.Tensor | None,
    ignore_index: int,
) -> torch.Tensor:
    """τ² · mean over valid pixels of KL(softmax_C(t/τ) ‖ softmax_C(s/τ)), a float32 scalar
    (0 when no pixel is valid), with autograd."""
    return torch.ops.kdops_triton.pixel_kl(student, teacher, target, ignore_index, tau)[0]
