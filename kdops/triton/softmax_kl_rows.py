"""The row statistics shared by the Triton softmax-KL kernels (``channel_kl``, ``pixel_kl`` and
the resized ``pixel_kl``): jit helpers only, no kernel.

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
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_LN2 = tl.constexpr(LN2)
_LOG2E = tl.constexpr(LOG2E)
# The lowest maximum a row's statistics take (the most negative float32): finite, so that a
# −inf logit never meets a −inf maximum (−inf − (−inf) is NaN).
_LOWEST = tl.constexpr(-3.4028234663852886e38)


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
def _empty_pixel_stats(BLOCK_P: tl.constexpr):
    """The statistics (m_s, sum_s, m_t, sum_t, cross) of BLOCK_P pixels before any channel."""
    lowest = tl.full([BLOCK_P], _LOWEST, tl.float32)
    zeros = tl.zeros([BLOCK_P], tl.float32)
    return lowest, zeros, lowest, zeros, zeros


@triton.jit
def _pixel_stats(
    s_ptr, t_ptr, s_pixels, t_pixels, s_stride_c, t_stride_c, C, pixel_mask, c,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per pixel of a tile: the merged statistics over all C channels, BLOCK_C at a time."""
    m_s, sum_s, m_t, sum_t, cross = _empty_pixel_stats(BLOCK_P)
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
def _store_kl_partials(kl_partials_ptr, count_partials_ptr, pid, valid, sum_s, sum_t, cross):
    """A pixel program's Σ KL over its valid pixels (natural units) and their count, at pid. An
    ignored pixel's KL (NaN included) is dropped by a select, never multiplied by 0."""
    _, _, kl2 = _kl_from_stats(sum_s, sum_t, cross)
    tl.store(kl_partials_ptr + pid, tl.sum(tl.where(valid, kl2, 0.0), 0) * _LN2)
    tl.store(count_partials_ptr + pid, tl.sum(valid.to(tl.int32), 0))


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
