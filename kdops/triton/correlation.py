"""Triton kernels of the channel-correlation family: ``channel_correlation``,
``channel_correlation_loss`` (ICKD) and ``pairwise_affinity_loss`` (SKD).

Math (specification: :mod:`kdops.reference.correlation`; the cancellation-free forms and their
derivation: ``csrc/common/correlation_ops.h``). X is an input as (N, C, L).

* ``channel_correlation_loss``: G_s = X_sX_sᵀ and, with equal L, M = (X_s + X_t)(X_s − X_t)ᵀ whose
  symmetric part is G_s − G_t without cancellation (other L: G_t itself). A row kernel forms the
  row of R_s − R_t in float64 (R the normalised Gram) and the loss / the rows of ∂loss/∂G; the
  input gradient is (H + Hᵀ) X, a GEMM whose A operand is symmetrised as it is loaded.
* ``pairwise_affinity_loss``: with x̂ = x / ‖x‖ per pixel (norms in float64), D̂ = X̂_s − X̂_t and
  Σ̂ = X̂_s + X̂_t, formed in the GEMMs' prologue from raw input tiles and the norms (no normalised
  copy of the features); the narrower input reads as zero beyond its channels.
  Σ (A_s − A_t)² = ½(⟨K, E⟩ + ⟨Q, Qᵀ⟩), K = Σ̂Σ̂ᵀ, E = D̂D̂ᵀ, Q = D̂Σ̂ᵀ: the loss kernel runs the
  upper-triangular C × C tiles only (both terms are symmetric in the tile pair) and reduces each
  tile to one float64 partial, never storing the matrices. Backward: K, E, Q stored, then
  ∂/∂X̂_s = (K + Q)D̂ + (Qᵀ + E)Σ̂ and ∂/∂X̂_t = −(K − Q)D̂ − (Qᵀ − E)Σ̂ in one GEMM kernel, then the
  per-pixel chain rule (÷ r, projected unless ``detach_norm``).

Products: ``tl.dot`` on float32 tiles with ``input_precision="tf32x3"`` on GPU (three TF32
products, float32-accurate; "ieee" under the interpreter), accumulation in float32; 16-bit inputs
are read as float32 (the operands D̂, Σ̂ and X_s ± X_t are derived values that 16-bit would round
to 1e-3, the size of the student–teacher differences these losses measure). Reductions end in
per-tile / per-row partials in fixed slots summed in a fixed order: deterministic.

Saved for backward: inputs, per-pixel norms (pairwise) and the output and row norms
(channel_correlation); the backward ops recompute the Grams.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdops.backend import triton_interpreting
from kdops.ops.correlation import register_correlation_ops
from kdops.triton._launch import GradBuffer, check_kernel_dtype, device_guard, flatten, new_buffer

_NORM_EPS = tl.constexpr(1e-12)
_NORM_CODES = {"row": 0, "l": 1, "none": 2}

# Test hooks. With kdops.triton._launch.POISON_OUTPUTS every buffer a launcher allocates
# starts as NaN, so a test
# proves that every element is written. _LAUNCH_OVERRIDES replaces the tile sizes ("block",
# "block_l", "block_rows") so small test inputs cross several tiles.
_LAUNCH_OVERRIDES: dict[str, int] = {}


# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptr, n, rows, cols, num_rows, num_cols, stride_n, stride_r, stride_c):
    """A (rows × cols) tile of an (N, R, K) tensor as float32, zero outside."""
    mask = (rows[:, None] < num_rows) & (cols[None, :] < num_cols)
    offsets = n.to(tl.int64) * stride_n + rows[:, None].to(tl.int64) * stride_r + cols[None, :].to(tl.int64) * stride_c
    return tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _inverse_norms(norms_ptr, n, cols, L):
    """1 / max(r, eps) of pixels `cols` (float64), from a contiguous (N, L) float64 norms view."""
    r = tl.load(norms_ptr + n.to(tl.int64) * 2 * L + cols, mask=cols < L, other=1.0)
    return 1.0 / tl.maximum(r, _NORM_EPS)


@triton.jit
def _pairwise_operands(s_ptr, t_ptr, norms_ptr, n, rows, cols, Cs, Ct, L,
                       s_sn, s_sc, s_sl, t_sn, t_sc, t_sl):
    """(D̂, Σ̂) tiles (rows × cols) from raw student/teacher tiles and the float64 norms."""
    col_mask = cols < L
    offs_s = n.to(tl.int64) * s_sn + rows[:, None].to(tl.int64) * s_sc + cols[None, :].to(tl.int64) * s_sl
    offs_t = n.to(tl.int64) * t_sn + rows[:, None].to(tl.int64) * t_sc + cols[None, :].to(tl.int64) * t_sl
    xs = tl.load(s_ptr + offs_s, mask=(rows[:, None] < Cs) & col_mask[None, :], other=0.0).to(tl.float64)
    xt = tl.load(t_ptr + offs_t, mask=(rows[:, None] < Ct) & col_mask[None, :], other=0.0).to(tl.float64)
    hs = xs * _inverse_norms(norms_ptr, n, cols, L)[None, :]
    ht = xt * _inverse_norms(norms_ptr + L, n, cols, L)[None, :]
    return (hs - ht).to(tl.float32), (hs + ht).to(tl.float32)


# ---------------------------------------------------------------------------------------------
# pairwise_affinity_loss kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _pixel_norms_kernel(x_ptr, out_ptr, C, L, sx_n, sx_c, sx_l,
                        BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """out[n, l] = ‖x[n, :, l]‖₂ in float64; out is a (N, L) view with row stride 2L."""
    n = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    acc = tl.zeros((BLOCK_L,), dtype=tl.float64)
    for c0 in range(0, C, BLOCK_C):
        rows = c0 + tl.arange(0, BLOCK_C)
        x = _load_tile(x_ptr, n, rows, cols, C, L, sx_n, sx_c, sx_l).to(tl.float64)
        acc += tl.sum(x * x, axis=0)
    tl.store(out_ptr + n.to(tl.int64) * 2 * L + cols, tl.sqrt(acc), mask=cols < L)


@triton.jit
def _pairwise_loss_kernel(s_ptr, t_ptr, norms_ptr, partial_ptr, Cs, Ct, L, num_tiles,
                          s_sn, s_sc, s_sl, t_sn, t_sc, t_sl,
                          BLOCK: tl.constexpr, BLOCK_L: tl.constexpr, PRECISION: tl.constexpr):
    """partial[n, i, j] = w · Σ_tile (K ⊙ E + Q ⊙ (Qᵀ)) for tile pairs j ≥ i (w = 2 off the
    diagonal, 1 on it), 0 for j < i."""
    n = tl.program_id(0)
    ti = tl.program_id(1)
    tj = tl.program_id(2)
    partial = tl.zeros((), dtype=tl.float64)
    if tj >= ti:
        rows_i = ti * BLOCK + tl.arange(0, BLOCK)
        rows_j = tj * BLOCK + tl.arange(0, BLOCK)
        acc_k = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        acc_e = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        acc_q = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)   # Q[i, j] = D̂_i·Σ̂_j
        acc_qt = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)  # Q[j, i] = Σ̂_i·D̂_j
        for l0 in range(0, L, BLOCK_L):
            cols = l0 + tl.arange(0, BLOCK_L)
            d_i, s_i = _pairwise_operands(s_ptr, t_ptr, norms_ptr, n, rows_i, cols, Cs, Ct, L,
                                          s_sn, s_sc, s_sl, t_sn, t_sc, t_sl)
            d_j, s_j = _pairwise_operands(s_ptr, t_ptr, norms_ptr, n, rows_j, cols, Cs, Ct, L,
                                          s_sn, s_sc, s_sl, t_sn, t_sc, t_sl)
            acc_k = tl.dot(s_i, tl.trans(s_j), acc_k, input_precision=PRECISION)
            acc_e = tl.dot(d_i, tl.trans(d_j), acc_e, input_precision=PRECISION)
            acc_q = tl.dot(d_i, tl.trans(s_j), acc_q, input_precision=PRECISION)
            acc_qt = tl.dot(s_i, tl.trans(d_j), acc_qt, input_precision=PRECISION)
        terms = acc_k.to(tl.float64) * acc_e.to(tl.float64) + acc_q.to(tl.float64) * acc_qt.to(tl.float64)
        weight = tl.where(tj > ti, 2.0, 1.0)
        partial = weight * tl.sum(tl.sum(terms, axis=1), axis=0)
    tl.store(partial_ptr + (n.to(tl.int64) * num_tiles + ti) * num_tiles + tj, partial)


@triton.jit
def _pairwise_pixel_loss_kernel(s_ptr, t_ptr, norms_ptr, partial_ptr, Cs, Ct, C, L, num_tiles,
                                s_sn, s_sc, s_sl, t_sn, t_sc, t_sl,
                                BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr):
    """The L ≤ C form: partial[n, a, b] = w · Σ_tile Δ² with Δ = sym(Σ̂ᵀD̂) on pixel tiles b ≥ a.

    Used when L ≤ C: then the C × C terms ⟨K, E⟩ and ⟨Q, Qᵀ⟩ are sums of C² products that cancel
    down to L² squares (at L = 1 to exactly 0), while Δ has L² entries of the result's size."""
    n = tl.program_id(0)
    ta = tl.program_id(1)
    tb = tl.program_id(2)
    partial = tl.zeros((), dtype=tl.float64)
    if tb >= ta:
        cols_a = ta * BLOCK + tl.arange(0, BLOCK)
        cols_b = tb * BLOCK + tl.arange(0, BLOCK)
        acc_sd = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)  # Σ̂_aᵀ D̂_b
        acc_ds = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)  # D̂_aᵀ Σ̂_b
        for c0 in range(0, C, BLOCK_C):
            rows = c0 + tl.arange(0, BLOCK_C)
            d_a, s_a = _pairwise_operands(s_ptr, t_ptr, norms_ptr, n, rows, cols_a, Cs, Ct, L,
                                          s_sn, s_sc, s_sl, t_sn, t_sc, t_sl)
            d_b, s_b = _pairwise_operands(s_ptr, t_ptr, norms_ptr, n, rows, cols_b, Cs, Ct, L,
                                          s_sn, s_sc, s_sl, t_sn, t_sc, t_sl)
            acc_sd = tl.dot(tl.trans(s_a), d_b, acc_sd, input_precision=PRECISION)
            acc_ds = tl.dot(tl.trans(d_a), s_b, acc_ds, input_precision=PRECISION)
        delta = 0.5 * (acc_sd.to(tl.float64) + acc_ds.to(tl.float64))
        weight = tl.where(tb > ta, 2.0, 1.0)
        partial = weight * tl.sum(tl.sum(delta * delta, axis=1), axis=0)
    tl.store(partial_ptr + (n.to(tl.int64) * num_tiles + ta) * num_tiles + tb, partial)


@triton.jit
def _pairwise_matrices_kernel(s_ptr, t_ptr, norms_ptr, k_ptr, e_ptr, q_ptr, Cs, Ct, C, L,
                              s_sn, s_sc, s_sl, t_sn, t_sc, t_sl,
                              BLOCK: tl.constexpr, BLOCK_L: tl.constexpr, PRECISION: tl.constexpr):
    """K = Σ̂Σ̂ᵀ, E = D̂D̂ᵀ, Q = D̂Σ̂ᵀ, each (N, C, C) float32 contiguous."""
    n = tl.program_id(0)
    rows_i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    rows_j = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    acc_k = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    acc_e = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    acc_q = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        d_i, s_i = _pairwise_operands(s_ptr, t_ptr, norms_ptr, n, rows_i, cols, Cs, Ct, L,
                                      s_sn, s_sc, s_sl, t_sn, t_sc, t_sl)
        d_j, s_j = _pairwise_operands(s_ptr, t_ptr, norms_ptr, n, rows_j, cols, Cs, Ct, L,
                                      s_sn, s_sc, s_sl, t_sn, t_sc, t_sl)
        acc_k = tl.dot(s_i, tl.trans(s_j), acc_k, input_precision=PRECISION)
        acc_e = tl.dot(d_i, tl.trans(d_j), acc_e, input_precision=PRECISION)
        acc_q = tl.dot(d_i, tl.trans(s_j), acc_q, input_precision=PRECISION)
    mask = (rows_i[:, None] < C) & (rows_j[None, :] < C)
    offsets = (n.to(tl.int64) * C + rows_i[:, None]) * C + rows_j[None, :]
    tl.store(k_ptr + offsets, acc_k, mask=mask)
    tl.store(e_ptr + offsets, acc_e, mask=mask)
    tl.store(q_ptr + offsets, acc_q, mask=mask)


@triton.jit
def _pairwise_grad_hat_kernel(s_ptr, t_ptr, norms_ptr, k_ptr, e_ptr, q_ptr, out_ptr, grad_loss_ptr,
                              Cs, Ct, C, L, C_in, sign, factor,
                              s_sn, s_sc, s_sl, t_sn, t_sc, t_sl, o_sn, o_sc, o_sl, which,
                              DETACH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                              BLOCK_L: tl.constexpr, PRECISION: tl.constexpr):
    """ĝ = sign·scale·[(K + sign·Q) D̂ + (Qᵀ + sign·E) Σ̂] for rows [0, C_in) of one input,
    scale = grad_loss · factor (read on the device: no host synchronisation).

    DETACH: writes the input gradient ĝ / r' (the norm a constant) in the output's dtype;
    otherwise ĝ in float32 for the projection kernel."""
    n = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    acc = tl.zeros((BLOCK_M, BLOCK_L), dtype=tl.float32)
    row_mask = rows < C_in
    base = n.to(tl.int64) * C * C
    for c0 in range(0, C, BLOCK_K):
        inner = c0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (inner[None, :] < C)
        ij = base + rows[:, None].to(tl.int64) * C + inner[None, :]
        ji = base + inner[None, :].to(tl.int64) * C + rows[:, None]
        k = tl.load(k_ptr + ij, mask=mask, other=0.0)
        e = tl.load(e_ptr + ij, mask=mask, other=0.0)
        q = tl.load(q_ptr + ij, mask=mask, other=0.0)
        qt = tl.load(q_ptr + ji, mask=mask, other=0.0)
        d, s = _pairwise_operands(s_ptr, t_ptr, norms_ptr, n, inner, cols, Cs, Ct, L,
                                  s_sn, s_sc, s_sl, t_sn, t_sc, t_sl)
        acc = tl.dot(k + sign * q, d, acc, input_precision=PRECISION)
        acc = tl.dot(qt + sign * e, s, acc, input_precision=PRECISION)
    scale = tl.load(grad_loss_ptr).to(tl.float32) * factor
    grad = acc * (sign * scale)
    mask = row_mask[:, None] & (cols[None, :] < L)
    offsets = n.to(tl.int64) * o_sn + rows[:, None].to(tl.int64) * o_sc + cols[None, :].to(tl.int64) * o_sl
    if DETACH:
        inv = _inverse_norms(norms_ptr + which * L, n, cols, L)
        tl.store(out_ptr + offsets, (grad.to(tl.float64) * inv[None, :]).to(tl.float32).to(out_ptr.dtype.element_ty),
                 mask=mask)
    else:
        tl.store(out_ptr + offsets, grad, mask=mask)


@triton.jit
def _normalisation_backward_kernel(x_ptr, g_ptr, norms_ptr, out_ptr, C, L,
                                   x_sn, x_sc, x_sl, o_sn, o_sc, o_sl,
                                   BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
    """out = (ĝ − x ⟨x, ĝ⟩ / r'²) / r' per pixel (no projection where r ≤ eps); ĝ contiguous
    (N, C, L) float32; norms a (N, L) view with row stride 2L."""
    n = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    r = tl.load(norms_ptr + n.to(tl.int64) * 2 * L + cols, mask=cols < L, other=1.0)
    inv = 1.0 / tl.maximum(r, _NORM_EPS)
    radial = tl.zeros((BLOCK_L,), dtype=tl.float64)
    for c0 in range(0, C, BLOCK_C):
        rows = c0 + tl.arange(0, BLOCK_C)
        x = _load_tile(x_ptr, n, rows, cols, C, L, x_sn, x_sc, x_sl).to(tl.float64)
        g = _load_tile(g_ptr, n, rows, cols, C, L, C * L, L, 1).to(tl.float64)
        radial += tl.sum(x * g, axis=0)
    radial = tl.where(r > _NORM_EPS, radial * inv * inv, 0.0)
    for c0 in range(0, C, BLOCK_C):
        rows = c0 + tl.arange(0, BLOCK_C)
        x = _load_tile(x_ptr, n, rows, cols, C, L, x_sn, x_sc, x_sl).to(tl.float64)
        g = _load_tile(g_ptr, n, rows, cols, C, L, C * L, L, 1).to(tl.float64)
        out = (g - x * radial[None, :]) * inv[None, :]
        mask = (rows[:, None] < C) & (cols[None, :] < L)
        offsets = n.to(tl.int64) * o_sn + rows[:, None].to(tl.int64) * o_sc + cols[None, :].to(tl.int64) * o_sl
        tl.store(out_ptr + offsets, out.to(tl.float32).to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Gram kernels (channel_correlation, channel_correlation_loss)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _grams_kernel(s_ptr, t_ptr, b_ptr, g_ptr, m_ptr, C, L,
                  s_sn, s_sc, s_sl, t_sn, t_sc, t_sl, b_sn, b_sc, b_sl,
                  DIFFERENCE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_L: tl.constexpr,
                  PRECISION: tl.constexpr):
    """g = X_b X_bᵀ (X_b: the base features, per image the student's or the teacher's); with
    DIFFERENCE also m = (X_s + X_t)(X_s − X_t)ᵀ (equal L). (N, C, C) float32."""
    n = tl.program_id(0)
    rows_i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    rows_j = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    acc_g = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    acc_m = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        b_i = _load_tile(b_ptr, n, rows_i, cols, C, L, b_sn, b_sc, b_sl)
        b_j = _load_tile(b_ptr, n, rows_j, cols, C, L, b_sn, b_sc, b_sl)
        acc_g = tl.dot(b_i, tl.trans(b_j), acc_g, input_precision=PRECISION)
        if DIFFERENCE:
            s_i = _load_tile(s_ptr, n, rows_i, cols, C, L, s_sn, s_sc, s_sl)
            s_j = _load_tile(s_ptr, n, rows_j, cols, C, L, s_sn, s_sc, s_sl)
            t_i = _load_tile(t_ptr, n, rows_i, cols, C, L, t_sn, t_sc, t_sl)
            t_j = _load_tile(t_ptr, n, rows_j, cols, C, L, t_sn, t_sc, t_sl)
            acc_m = tl.dot(s_i + t_i, tl.trans(s_j - t_j), acc_m, input_precision=PRECISION)
    mask = (rows_i[:, None] < C) & (rows_j[None, :] < C)
    offsets = (n.to(tl.int64) * C + rows_i[:, None]) * C + rows_j[None, :]
    tl.store(g_ptr + offsets, acc_g, mask=mask)
    if DIFFERENCE:
        tl.store(m_ptr + offsets, acc_m, mask=mask)


@triton.jit
def _difference_row(gs_ptr, other_ptr, row_base, col_base, j, C, teacher_base,
                    SAME_LENGTH: tl.constexpr):
    """(g_s, g_t, ΔG) at columns j of one row, float64. Equal L: gs_ptr holds the Gram of the
    image's smaller-norm side (the teacher's when teacher_base) and the other side's is it ± ΔG,
    which adds without cancellation (see csrc/cpu/correlation.cpp GramRows)."""
    mask = j < C
    s = tl.load(gs_ptr + row_base + j, mask=mask, other=0.0).to(tl.float64)
    if SAME_LENGTH:
        m_ij = tl.load(other_ptr + row_base + j, mask=mask, other=0.0).to(tl.float64)
        m_ji = tl.load(other_ptr + col_base + j.to(tl.int64) * C, mask=mask, other=0.0).to(tl.float64)
        d = 0.5 * (m_ij + m_ji)
        base = s
        s = tl.where(teacher_base, base + d, base)
        t = tl.where(teacher_base, base, base - d)
    else:
        t = tl.load(other_ptr + row_base + j, mask=mask, other=0.0).to(tl.float64)
        d = s - t
    return s, t, d


@triton.jit
def _normalised_difference(s, t, d, rs, rt, gap_scale, length_s, length_t,
                           NORM: tl.constexpr, SAME_LENGTH: tl.constexpr):
    """R_s − R_t at the loaded columns (see csrc/common/correlation_ops.h)."""
    if NORM == 2:
        out = d
    elif NORM == 1:
        if SAME_LENGTH:
            out = d / length_s
        else:
            out = s / length_s - t / length_t
    else:
        rs_c = tl.maximum(rs, _NORM_EPS)
        rt_c = tl.maximum(rt, _NORM_EPS)
        unclamped = (rs > _NORM_EPS) & (rt > _NORM_EPS)
        out = tl.where(unclamped, d / rs_c - t * gap_scale, s / rs_c - t / rt_c)
    return out


@triton.jit
def _gram_rows_kernel(gs_ptr, other_ptr, flags_ptr, partial_ptr, half_s_ptr, half_t_ptr,
                      grad_loss_ptr, C, length_s, length_t, factor,
                      NORM: tl.constexpr, SAME_LENGTH: tl.constexpr, BACKWARD: tl.constexpr,
                      STUDENT: tl.constexpr, TEACHER: tl.constexpr, BLOCK_C: tl.constexpr):
    """One row (n, i) of R_s − R_t. Forward: partial[row] = Σ_j (R_s − R_t)². Backward: the rows
    of ∂loss/∂G_s and ∂loss/∂G_t (scale = grad_loss · factor, factor = 2/(N·C)), float32."""
    row = tl.program_id(0).to(tl.int64)
    n = row // C
    i = row % C
    row_base = row * C
    col_base = n * C * C + i
    teacher_base = tl.load(flags_ptr + n) != 0
    ss = tl.zeros((), dtype=tl.float64)
    tt = tl.zeros((), dtype=tl.float64)
    cross = tl.zeros((), dtype=tl.float64)
    for c0 in range(0, C, BLOCK_C):
        j = c0 + tl.arange(0, BLOCK_C)
        s, t, d = _difference_row(gs_ptr, other_ptr, row_base, col_base, j, C, teacher_base, SAME_LENGTH)
        ss += tl.sum(s * s, axis=0)
        tt += tl.sum(t * t, axis=0)
        cross += tl.sum(d * (s + t), axis=0)
    rs = tl.sqrt(ss)
    rt = tl.sqrt(tt)
    rs_c = tl.maximum(rs, _NORM_EPS)
    rt_c = tl.maximum(rt, _NORM_EPS)
    gap_scale = cross / tl.maximum(rs + rt, _NORM_EPS) / (rs_c * rt_c)
    total = tl.zeros((), dtype=tl.float64)
    radial_s = tl.zeros((), dtype=tl.float64)
    radial_t = tl.zeros((), dtype=tl.float64)
    for c0 in range(0, C, BLOCK_C):
        j = c0 + tl.arange(0, BLOCK_C)
        s, t, d = _difference_row(gs_ptr, other_ptr, row_base, col_base, j, C, teacher_base, SAME_LENGTH)
        diff = _normalised_difference(s, t, d, rs, rt, gap_scale, length_s, length_t, NORM, SAME_LENGTH)
        total += tl.sum(diff * diff, axis=0)
        radial_s += tl.sum(s * diff, axis=0)
        radial_t += tl.sum(t * diff, axis=0)
    if BACKWARD:
        scale = tl.load(grad_loss_ptr).to(tl.float64) * factor
        radial_s = tl.where(rs > _NORM_EPS, radial_s / (rs_c * rs_c), 0.0)
        radial_t = tl.where(rt > _NORM_EPS, radial_t / (rt_c * rt_c), 0.0)
        for c0 in range(0, C, BLOCK_C):
            j = c0 + tl.arange(0, BLOCK_C)
            s, t, d = _difference_row(gs_ptr, other_ptr, row_base, col_base, j, C, teacher_base, SAME_LENGTH)
            diff = _normalised_difference(s, t, d, rs, rt, gap_scale, length_s, length_t, NORM, SAME_LENGTH)
            if NORM == 2:
                grad_s = diff * scale
                grad_t = -diff * scale
            elif NORM == 1:
                grad_s = diff * scale / length_s
                grad_t = -diff * scale / length_t
            else:
                grad_s = scale * (diff - s * radial_s) / rs_c
                grad_t = -scale * (diff - t * radial_t) / rt_c
            if STUDENT:
                tl.store(half_s_ptr + row_base + j, grad_s.to(tl.float32), mask=j < C)
            if TEACHER:
                tl.store(half_t_ptr + row_base + j, grad_t.to(tl.float32), mask=j < C)
    else:
        tl.store(partial_ptr + row, total)


@triton.jit
def _symmetric_product_kernel(h_ptr, x_ptr, out_ptr, C, L, x_sn, x_sc, x_sl, o_sn, o_sc, o_sl,
                              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr,
                              PRECISION: tl.constexpr):
    """out = (H + Hᵀ) X, H (N, C, C) float32 contiguous, written in out's dtype."""
    n = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    acc = tl.zeros((BLOCK_M, BLOCK_L), dtype=tl.float32)
    base = n.to(tl.int64) * C * C
    for c0 in range(0, C, BLOCK_K):
        inner = c0 + tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < C) & (inner[None, :] < C)
        h = tl.load(h_ptr + base + rows[:, None].to(tl.int64) * C + inner[None, :], mask=mask, other=0.0)
        ht = tl.load(h_ptr + base + inner[None, :].to(tl.int64) * C + rows[:, None], mask=mask, other=0.0)
        x = _load_tile(x_ptr, n, inner, cols, C, L, x_sn, x_sc, x_sl)
        acc = tl.dot(h + ht, x, acc, input_precision=PRECISION)
    mask = (rows[:, None] < C) & (cols[None, :] < L)
    offsets = n.to(tl.int64) * o_sn + rows[:, None].to(tl.int64) * o_sc + cols[None, :].to(tl.int64) * o_sl
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _normalise_rows_kernel(g_ptr, out_ptr, norms_ptr, C, inv_length,
                           NORM: tl.constexpr, BLOCK_C: tl.constexpr):
    """channel_correlation: out row = G row / max(‖row‖, eps) | G / L | G; norms[row] = ‖G row‖."""
    row = tl.program_id(0).to(tl.int64)
    base = row * C
    ss = tl.zeros((), dtype=tl.float64)
    for c0 in range(0, C, BLOCK_C):
        j = c0 + tl.arange(0, BLOCK_C)
        g = tl.load(g_ptr + base + j, mask=j < C, other=0.0).to(tl.float64)
        ss += tl.sum(g * g, axis=0)
    r = tl.sqrt(ss)
    tl.store(norms_ptr + row, r.to(tl.float32))
    for c0 in range(0, C, BLOCK_C):
        j = c0 + tl.arange(0, BLOCK_C)
        g = tl.load(g_ptr + base + j, mask=j < C, other=0.0).to(tl.float64)
        if NORM == 0:
            out = g / tl.maximum(r, _NORM_EPS)
        elif NORM == 1:
            out = g * inv_length
        else:
            out = g
        tl.store(out_ptr + base + j, out.to(tl.float32), mask=j < C)


@triton.jit
def _gram_rows_backward_kernel(grad_ptr, out_ptr, norms_ptr, half_ptr, C, inv_length,
                               g_sn, g_sr, g_sc, NORM: tl.constexpr, BLOCK_C: tl.constexpr):
    """channel_correlation backward: half row = ∂/∂G of the row (R the saved output)."""
    row = tl.program_id(0).to(tl.int64)
    n = row // C
    i = row % C
    grad_base = n * g_sn + i * g_sr
    base = row * C
    r = tl.load(norms_ptr + row).to(tl.float64)
    r_c = tl.maximum(r, _NORM_EPS)
    radial = tl.zeros((), dtype=tl.float64)
    if NORM == 0:
        for c0 in range(0, C, BLOCK_C):
            j = c0 + tl.arange(0, BLOCK_C)
            y = tl.load(grad_ptr + grad_base + j * g_sc, mask=j < C, other=0.0).to(tl.float64)
            out = tl.load(out_ptr + base + j, mask=j < C, other=0.0).to(tl.float64)
            radial += tl.sum(y * out, axis=0)
        radial = tl.where(r > _NORM_EPS, radial, 0.0)
    for c0 in range(0, C, BLOCK_C):
        j = c0 + tl.arange(0, BLOCK_C)
        y = tl.load(grad_ptr + grad_base + j * g_sc, mask=j < C, other=0.0).to(tl.float64)
        if NORM == 0:
            out = tl.load(out_ptr + base + j, mask=j < C, other=0.0).to(tl.float64)
            half = (y - out * radial) / r_c
        elif NORM == 1:
            half = y * inv_length
        else:
            half = y
        tl.store(half_ptr + base + j, half.to(tl.float32), mask=j < C)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------


def _precision() -> str:
    # Three-TF32 products on GPU (float32-accurate, tensor cores); the interpreter computes
    # in numpy float32 whatever the setting.
    return "ieee" if triton_interpreting() else "tf32x3"


def _blocks(c: int, length: int) -> dict[str, int]:
    """Tile sizes (see the module docstring of the GPU tile choice in the final report)."""
    if triton_interpreting():
        block, block_l = 16, 16
    else:
        block = 64 if c > 32 else 32
        block_l = 32
    block = _LAUNCH_OVERRIDES.get("block", block)
    block_l = _LAUNCH_OVERRIDES.get("block_l", block_l)
    block_rows = _LAUNCH_OVERRIDES.get("block_rows", 16 if triton_interpreting() else 128)
    return {"block": block, "block_l": block_l, "block_rows": block_rows}


def _pixel_norms(xs: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    n, _, length = xs.shape
    norms = new_buffer((n, 2, length), torch.float64, xs.device)
    block_l = 64
    for which, x in enumerate((xs, xt)):
        _pixel_norms_kernel[(n, triton.cdiv(length, block_l))](
            x, norms[:, which], x.shape[1], length, *x.stride(), BLOCK_C=16, BLOCK_L=block_l,
        )
    return norms


def _pairwise_forward(student: torch.Tensor, teacher: torch.Tensor, detach_norm: bool):
    check_kernel_dtype("student", student)
    xs, xt = flatten(student), flatten(teacher)
    n, cs, length = xs.shape
    ct = xt.shape[1]
    c = max(cs, ct)
    b = _blocks(c, length)
    with device_guard(student):
        norms = _pixel_norms(xs, xt)
        if length <= c:
            # Σ Δ² over the L × L tiles (sym(Σ̂ᵀD̂) formed per tile, never stored).
            tiles = triton.cdiv(length, b["block"])
            partial = new_buffer((n, tiles, tiles), torch.float64, student.device)
            _pairwise_pixel_loss_kernel[(n, tiles, tiles)](
                xs, xt, norms, partial, cs, ct, c, length, tiles, *xs.stride(), *xt.stride(),
                BLOCK=b["block"], BLOCK_C=b["block_l"], PRECISION=_precision(),
            )
            total = partial.sum()
        else:
            tiles = triton.cdiv(c, b["block"])
            partial = new_buffer((n, tiles, tiles), torch.float64, student.device)
            _pairwise_loss_kernel[(n, tiles, tiles)](
                xs, xt, norms, partial, cs, ct, length, tiles, *xs.stride(), *xt.stride(),
                BLOCK=b["block"], BLOCK_L=b["block_l"], PRECISION=_precision(),
                num_warps=8 if not triton_interpreting() else 4,
            )
            total = 0.5 * partial.sum()
    loss = (total / (n * length * length)).to(torch.float32)
    return loss, norms


def _pairwise_backward(grad_loss, student, teacher, norms, detach_norm, student_requires_grad,
                       teacher_requires_grad):
    check_kernel_dtype("student", student)
    none = student.new_empty(0)
    if not (student_requires_grad or teacher_requires_grad):
        return none, none
    xs, xt = flatten(student), flatten(teacher)
    n, cs, length = xs.shape
    ct = xt.shape[1]
    c = max(cs, ct)
    b = _blocks(c, length)
    norms = norms.contiguous()
    grad_loss = grad_loss.reshape(1).to(torch.float32)
    factor = 1.0 / (n * length * length)
    outs = []
    with device_guard(student):
        k, e, q = (new_buffer((n, c, c), torch.float32, student.device) for _ in range(3))
        tiles = triton.cdiv(c, b["block"])
        _pairwise_matrices_kernel[(n, tiles, tiles)](
            xs, xt, norms, k, e, q, cs, ct, c, length, *xs.stride(), *xt.stride(),
            BLOCK=b["block"], BLOCK_L=b["block_l"], PRECISION=_precision(),
        )
        for which, (x, x_in, wanted, sign) in enumerate(
            ((xs, student, student_requires_grad, 1.0), (xt, teacher, teacher_requires_grad, -1.0))
        ):
            if not wanted:
                outs.append(none)
                continue
            buffer = GradBuffer(x_in)
            grad_flat = buffer.flat
            channels = x.shape[1]
            target = grad_flat if detach_norm else new_buffer((n, channels, length), torch.float32, x.device)
            grid = (n, triton.cdiv(channels, b["block"]), triton.cdiv(length, b["block_l"]))
            _pairwise_grad_hat_kernel[grid](
                xs, xt, norms, k, e, q, target, grad_loss, cs, ct, c, length, channels, sign, factor,
                *xs.stride(), *xt.stride(), *target.stride(), which,
                DETACH=detach_norm, BLOCK_M=b["block"], BLOCK_K=b["block"], BLOCK_L=b["block_l"],
                PRECISION=_precision(),
            )
            if not detach_norm:
                _normalisation_backward_kernel[(n, triton.cdiv(length, 64))](
                    x, target, norms[:, which], grad_flat, channels, length, *x.stride(),
                    *grad_flat.stride(), BLOCK_C=16, BLOCK_L=64,
                )
            outs.append(buffer.finish())
    return outs[0], outs[1]


def _loss_grams(xs: torch.Tensor, xt: torch.Tensor, b: dict[str, int]):
    """(base, M, flags, same) with equal L — base the Gram of each image's smaller-norm side
    (flags[n] = 1: the teacher's), M = (X_s + X_t)(X_s − X_t)ᵀ — else (G_s, G_t, zeros, False);
    (N, C, C) float32, flags (N,) int32. The flags are computed on the device (no host sync)."""
    n, c, ls = xs.shape
    tiles = triton.cdiv(c, b["block"])
    gs = new_buffer((n, c, c), torch.float32, xs.device)
    other = new_buffer((n, c, c), torch.float32, xs.device)
    same = ls == xt.shape[2]
    if same:
        norms_s, norms_t = (torch.linalg.vector_norm(x, dim=(1, 2), dtype=torch.float32) for x in (xs, xt))
        flags = (norms_t < norms_s).to(torch.int32)
        base = torch.where(flags.view(-1, 1, 1).bool(), xt, xs)
    else:
        flags = torch.zeros(n, dtype=torch.int32, device=xs.device)
        base = xs
    _grams_kernel[(n, tiles, tiles)](
        xs, xt, base, gs, other, c, ls, *xs.stride(), *xt.stride(), *base.stride(),
        DIFFERENCE=same, BLOCK=b["block"], BLOCK_L=b["block_l"], PRECISION=_precision(),
    )
    if not same:
        _grams_kernel[(n, tiles, tiles)](
            xt, xt, xt, other, other, c, xt.shape[2], *xt.stride(), *xt.stride(), *xt.stride(),
            DIFFERENCE=False, BLOCK=b["block"], BLOCK_L=b["block_l"], PRECISION=_precision(),
        )
    return gs, other, flags, same


def _correlation_loss_forward(student: torch.Tensor, teacher: torch.Tensor, norm: str):
    check_kernel_dtype("student", student)
    xs, xt = flatten(student), flatten(teacher)
    n, c, ls = xs.shape
    b = _blocks(c, ls)
    with device_guard(student):
        gs, other, flags, same = _loss_grams(xs, xt, b)
        partial = new_buffer((n * c,), torch.float64, student.device)
        _gram_rows_kernel[(n * c,)](
            gs, other, flags, partial, partial, partial, partial, c, float(ls),
            float(xt.shape[2]), 0.0,
            NORM=_NORM_CODES[norm], SAME_LENGTH=same, BACKWARD=False, STUDENT=False, TEACHER=False,
            BLOCK_C=b["block_rows"],
        )
    return (partial.sum() / (n * c)).to(torch.float32)


def _correlation_loss_backward(grad_loss, student, teacher, norm, student_requires_grad,
                               teacher_requires_grad):
    check_kernel_dtype("student", student)
    none = student.new_empty(0)
    if not (student_requires_grad or teacher_requires_grad):
        return none, none
    xs, xt = flatten(student), flatten(teacher)
    n, c, ls = xs.shape
    b = _blocks(c, ls)
    grad_loss = grad_loss.reshape(1).to(torch.float32)
    outs = []
    with device_guard(student):
        gs, other, flags, same = _loss_grams(xs, xt, b)
        half_s = new_buffer((n, c, c), torch.float32, student.device)
        half_t = new_buffer((n, c, c), torch.float32, student.device)
        _gram_rows_kernel[(n * c,)](
            gs, other, flags, half_s, half_s, half_t, grad_loss, c, float(ls), float(xt.shape[2]),
            2.0 / (n * c),
            NORM=_NORM_CODES[norm], SAME_LENGTH=same, BACKWARD=True, STUDENT=student_requires_grad,
            TEACHER=teacher_requires_grad, BLOCK_C=b["block_rows"],
        )
        for x, x_in, wanted, half in ((xs, student, student_requires_grad, half_s),
                                      (xt, teacher, teacher_requires_grad, half_t)):
            if not wanted:
                outs.append(none)
                continue
            buffer = GradBuffer(x_in)
            grad_flat = buffer.flat
            length = x.shape[2]
            grid = (n, triton.cdiv(c, b["block"]), triton.cdiv(length, b["block_l"]))
            _symmetric_product_kernel[grid](
                half, x, grad_flat, c, length, *x.stride(), *grad_flat.stride(),
                BLOCK_M=b["block"], BLOCK_K=b["block"], BLOCK_L=b["block_l"], PRECISION=_precision(),
            )
            outs.append(buffer.finish())
    return outs[0], outs[1]


def _channel_correlation_forward(x: torch.Tensor, norm: str):
    check_kernel_dtype("x", x)
    flat = flatten(x)
    n, c, length = flat.shape
    b = _blocks(c, length)
    with device_guard(x):
        tiles = triton.cdiv(c, b["block"])
        gram = new_buffer((n, c, c), torch.float32, x.device)
        _grams_kernel[(n, tiles, tiles)](
            flat, flat, flat, gram, gram, c, length, *flat.stride(), *flat.stride(), *flat.stride(),
            DIFFERENCE=False, BLOCK=b["block"], BLOCK_L=b["block_l"], PRECISION=_precision(),
        )
        out = new_buffer((n, c, c), torch.float32, x.device)
        row_norms = new_buffer((n, c), torch.float32, x.device)
        _normalise_rows_kernel[(n * c,)](
            gram, out, row_norms, c, 1.0 / length, NORM=_NORM_CODES[norm], BLOCK_C=b["block_rows"],
        )
    return out, row_norms


def _channel_correlation_backward(grad_gram, x, gram, row_norms, norm):
    check_kernel_dtype("x", x)
    flat = flatten(x)
    n, c, length = flat.shape
    b = _blocks(c, length)
    with device_guard(x):
        half = new_buffer((n, c, c), torch.float32, x.device)
        _gram_rows_backward_kernel[(n * c,)](
            grad_gram, gram.contiguous(), row_norms.contiguous(), half, c, 1.0 / length,
            *grad_gram.stride(), NORM=_NORM_CODES[norm], BLOCK_C=b["block_rows"],
        )
        buffer = GradBuffer(x)
        grad_flat = buffer.flat
        grid = (n, triton.cdiv(c, b["block"]), triton.cdiv(length, b["block_l"]))
        _symmetric_product_kernel[grid](
            half, flat, grad_flat, c, length, *flat.stride(), *grad_flat.stride(),
            BLOCK_M=b["block"], BLOCK_K=b["block"], BLOCK_L=b["block_l"], PRECISION=_precision(),
        )
    return buffer.finish()


# ---------------------------------------------------------------------------------------------
# ops: kdops_triton::…, the schemas of csrc/kdops.cpp; fake kernels and autograd are registered
# by kdops.ops.correlation, the same way as for the C++ ops
# ---------------------------------------------------------------------------------------------

torch.library.custom_op(
    "kdops_triton::channel_correlation", _channel_correlation_forward, mutates_args=(),
    schema="(Tensor x, str norm) -> (Tensor gram, Tensor row_norms)",
)
torch.library.custom_op(
    "kdops_triton::channel_correlation_backward", _channel_correlation_backward, mutates_args=(),
    schema="(Tensor grad_gram, Tensor x, Tensor gram, Tensor row_norms, str norm) -> Tensor grad_x",
)
torch.library.custom_op(
    "kdops_triton::channel_correlation_loss", _correlation_loss_forward, mutates_args=(),
    schema="(Tensor student, Tensor teacher, str norm) -> Tensor loss",
)
torch.library.custom_op(
    "kdops_triton::channel_correlation_loss_backward", _correlation_loss_backward, mutates_args=(),
    schema=(
        "(Tensor grad_loss, Tensor student, Tensor teacher, str norm, bool student_requires_grad, "
        "bool teacher_requires_grad) -> (Tensor grad_student, Tensor grad_teacher)"
    ),
)
torch.library.custom_op(
    "kdops_triton::pairwise_affinity_loss", _pairwise_forward, mutates_args=(),
    schema="(Tensor student, Tensor teacher, bool detach_norm) -> (Tensor loss, Tensor norms)",
)
torch.library.custom_op(
    "kdops_triton::pairwise_affinity_loss_backward", _pairwise_backward, mutates_args=(),
    schema=(
        "(Tensor grad_loss, Tensor student, Tensor teacher, Tensor norms, bool detach_norm, "
        "bool student_requires_grad, bool teacher_requires_grad) "
        "-> (Tensor grad_student, Tensor grad_teacher)"
    ),
)

register_correlation_ops("kdops_triton")


# ---------------------------------------------------------------------------------------------
# backend entry points (kdops.backend.OPS): validated arguments, positional
# ---------------------------------------------------------------------------------------------


def channel_correlation(x: torch.Tensor, norm: str) -> torch.Tensor:
    """(N, C, C) float32 normalised Gram matrices, with autograd."""
    return torch.ops.kdops_triton.channel_correlation(x, norm)[0]


def channel_correlation_loss(student: torch.Tensor, teacher: torch.Tensor, norm: str) -> torch.Tensor:
    """Σ (R_s − R_t)² / (N·C), a float32 scalar, with autograd."""
    return torch.ops.kdops_triton.channel_correlation_loss(student, teacher, norm)


def pairwise_affinity_loss(student: torch.Tensor, teacher: torch.Tensor, detach_norm: bool) -> torch.Tensor:
    """Σ (A_s − A_t)² / (N·L²), a float32 scalar, with autograd."""
    return torch.ops.kdops_triton.pairwise_affinity_loss(student, teacher, detach_norm)[0]
