"""Triton kernels of ``channel_kl`` (CWD): the KL between the spatial softmaxes of each channel.

A row is the L positions of one (n, c) (math: :mod:`kdops.triton.softmax_kl_rows`). Forward: a
program holds a tile of rows × positions and folds it into the rows' online statistics; a row of
large L is split across programs whose partial statistics a second kernel merges (a few rows of a
large map would otherwise leave the GPU idle). Backward: elementwise, from the saved statistics
[m_s, log z_s, m_t, log z_t, KL] of each row.

File layout: kernels → launchers (launch heuristics, buffers) → the ``kdops_triton::`` ops
(``custom_op``; fake kernels and autograd from :mod:`kdops.ops.softmax_kl`) → the backend entry
point :func:`channel_kl` that :mod:`kdops.backend` calls.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kdops.ops.softmax_kl import (
    ROW_STATS, check_op_grad_loss, check_op_pair, check_op_tau, register_channel_kl_ops,
)
from kdops.triton._launch import (
    GradBuffer, check_kernel_dtype, device_guard, flatten, new_buffer, strides,
)
from kdops.triton.softmax_kl_rows import (
    _LN2, _LOG2E, _LOWEST, LOG2E, _kl_from_stats, _kl_grads, _merge_lanes, _online_add,
)

# Test hook: replaces launch heuristics (keys "channel_block_r", "channel_block_l",
# "channel_splits") so small test inputs cross blocks and splits. (Every buffer a launcher makes
# starts as NaN under kdops.triton._launch.POISON_OUTPUTS.)
_LAUNCH_OVERRIDES: dict[str, int] = {}

# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _row_tile(pid, splits, num_c_tiles, C, BLOCK_R: tl.constexpr):
    """Program pid = row_tile·splits + split: its split, image n, the BLOCK_R channels of its
    row tile (int64) and those in range."""
    split = pid % splits
    row_tile = pid // splits
    n = (row_tile // num_c_tiles).to(tl.int64)
    channels = (row_tile % num_c_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = channels < C
    return split, n, channels.to(tl.int64), row_mask


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
    split, n, channels, row_mask = _row_tile(tl.program_id(0), splits, num_c_tiles, C, BLOCK_R)
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
    split, n, channels, row_mask = _row_tile(tl.program_id(0), splits, num_c_tiles, C, BLOCK_R)
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


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

_TILE = 2048                 # elements of s (and of t) one channel_kl program holds per step
_MAX_BLOCK_R = 32            # channels_last: channels side by side in one channel_kl tile
_PROGRAMS_PER_SM = 16        # channel_kl forward splits rows until the grid is this deep
_MIN_BLOCKS_PER_SPLIT = 4    # … but never into splits shorter than this many tiles
_BACKWARD_BLOCKS_PER_PROGRAM = 4


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


def _check_args(student, teacher, tau) -> None:
    """The C++ op's checks, with its messages (the op can be called directly)."""
    check_op_pair(student, teacher)
    check_kernel_dtype("student", student)
    check_op_tau(tau)


def _channel_kl_forward(
    student: torch.Tensor, teacher: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, row_stats): loss = τ²/(N·C) · Σ_rows KL, a float32 scalar; row_stats (N·C, 5)
    float32 = per row [max s, log z_s, max t, log z_t, KL] over the L positions (maxima raw,
    z = Σ exp((x − max)/τ))."""
    _check_args(student, teacher, tau)
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
    check_op_grad_loss(grad_loss)
    _check_args(student, teacher, tau)
    s, t = flatten(student), flatten(teacher)
    n, c, length = s.shape
    grad_student = GradBuffer(student, student_requires_grad)
    grad_teacher = GradBuffer(teacher, teacher_requires_grad)
    grad_s, grad_t = grad_student.flat, grad_teacher.flat
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
    return grad_student.finish(), grad_teacher.finish()


# ---------------------------------------------------------------------------------------------
# ops: kdops_triton::channel_kl{, _backward}
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

register_channel_kl_ops("kdops_triton")


# ---------------------------------------------------------------------------------------------
# backend entry point (kdops.backend.OPS): validated arguments, positional
# ---------------------------------------------------------------------------------------------


def channel_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """τ² · Σ_{n,c} KL(softmax_L(t/τ) ‖ softmax_L(s/τ)) / (N·C): a float32 scalar, with
    autograd."""
    return torch.ops.kdops_triton.channel_kl(student, teacher, tau)[0]
