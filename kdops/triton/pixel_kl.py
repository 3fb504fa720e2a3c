"""Triton kernels of ``pixel_kl`` (KD): the KL between the channel softmaxes of each pixel.

A row is the C channels of one pixel (math: :mod:`kdops.triton.softmax_kl_rows`). Forward: a
program holds a tile of pixels × channels (channels beyond one block looped over in chunks), the
KL of each valid pixel summed per program; backward recomputes the pixel's statistics and writes
both gradients. With ``size`` the logits are resized bilinearly inside the kernels
(:mod:`kdops.triton.resized_pixel_kl`).

File layout: kernels → launchers (launch heuristics, buffers) → the ``kdops_triton::`` ops
(``custom_op``; fake kernels and autograd from :mod:`kdops.ops.softmax_kl`) → the backend entry
point :func:`pixel_kl` that :mod:`kdops.backend` calls.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kdops.ops.softmax_kl import (
    check_op_grad_loss, check_op_pair, check_op_target, check_op_tau, register_pixel_kl_ops,
)
from kdops.triton import resized_pixel_kl  # noqa: F401  (defines kdops_triton::resized_pixel_kl)
from kdops.triton._launch import (
    GradBuffer, check_kernel_dtype, device_guard, flatten, new_buffer, strides,
)
from kdops.triton.softmax_kl_rows import (
    _LN2, LOG2E, _kl_from_stats, _load_pixel_chunk, _pixel_chunk_stats, _pixel_stats,
    _store_kl_partials, _store_pixel_grads, _valid_pixels,
)

# Test hook: replaces launch heuristics (keys "pixel_block_p", "pixel_block_c") so small test
# inputs cross blocks and chunks. (Every buffer a launcher makes starts as NaN under
# kdops.triton._launch.POISON_OUTPUTS.)
_LAUNCH_OVERRIDES: dict[str, int] = {}

# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _pixel_tile(pid, num_p_tiles, L, target_ptr, target_stride_n, target_stride_l, ignore_index,
                BLOCK_P: tl.constexpr, HAS_TARGET: tl.constexpr):
    """Program pid's pixels: image n, its BLOCK_P positions (int64), those in range, and those
    that count (in range and, given a target, labelled ≠ ignore_index)."""
    n = (pid // num_p_tiles).to(tl.int64)
    positions = (pid % num_p_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_mask = positions < L
    positions = positions.to(tl.int64)
    valid = _valid_pixels(
        target_ptr, n * target_stride_n + positions * target_stride_l, pixel_mask, ignore_index,
        HAS_TARGET,
    )
    return n, positions, pixel_mask, valid


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
    n, positions, pixel_mask, valid = _pixel_tile(
        pid, num_p_tiles, L, target_ptr, target_stride_n, target_stride_l, ignore_index,
        BLOCK_P, HAS_TARGET,
    )
    s_pixels = n * s_stride_n + positions * s_stride_l
    t_pixels = n * t_stride_n + positions * t_stride_l
    _, sum_s, _, sum_t, cross = _pixel_stats(
        s_ptr, t_ptr, s_pixels, t_pixels, s_stride_c, t_stride_c, C, pixel_mask, log2e_over_tau,
        BLOCK_P, BLOCK_C,
    )
    _store_kl_partials(kl_partials_ptr, count_partials_ptr, pid, valid, sum_s, sum_t, cross)


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
    n, positions, pixel_mask, valid = _pixel_tile(
        pid, num_p_tiles, L, target_ptr, target_stride_n, target_stride_l, ignore_index,
        BLOCK_P, HAS_TARGET,
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

_PIXEL_TILE = {4: 2048, 2: 1024}  # BLOCK_P·BLOCK_C of a pixel_kl program, by element size
_MAX_BLOCK_C = 256           # pixel_kl: more channels than this are looped over in chunks


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


def _check_args(student, teacher, target, tau) -> None:
    """The C++ op's checks, with its messages (the op can be called directly)."""
    check_op_pair(student, teacher)
    check_kernel_dtype("student", student)
    check_op_tau(tau)
    check_op_target(target, student)


def _pixel_kl_forward(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor | None, ignore_index: int,
    tau: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, num_valid): loss = τ²/max(V, 1) · Σ_valid KL, a float32 scalar; num_valid V, the
    int64 count of valid pixels (N·L without target)."""
    _check_args(student, teacher, target, tau)
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
    check_op_grad_loss(grad_loss)
    _check_args(student, teacher, target, tau)
    s, t = flatten(student), flatten(teacher)
    n, c, length = s.shape
    grad_student = GradBuffer(student, student_requires_grad)
    grad_teacher = GradBuffer(teacher, teacher_requires_grad)
    grad_s, grad_t = grad_student.flat, grad_teacher.flat
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
    return grad_student.finish(), grad_teacher.finish()


# ---------------------------------------------------------------------------------------------
# ops: kdops_triton::pixel_kl{, _backward}
# ---------------------------------------------------------------------------------------------

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

register_pixel_kl_ops("kdops_triton")


# ---------------------------------------------------------------------------------------------
# backend entry point (kdops.backend.OPS): validated arguments, positional
# ---------------------------------------------------------------------------------------------


def pixel_kl(
    student: torch.Tensor, teacher: torch.Tensor, tau: float, target: torch.Tensor | None,
    ignore_index: int, size: tuple[int, int] | None = None, align_corners: bool = False,
) -> torch.Tensor:
    """τ² · mean over valid pixels of KL(softmax_C(t/τ) ‖ softmax_C(s/τ)), a float32 scalar
    (0 when no pixel is valid) with autograd — of the logits as they are, or with size = (H, W)
    of the (N, C, h, w) logits resized bilinearly to it (:mod:`kdops.triton.resized_pixel_kl`;
    target (N, H, W) or None)."""
    if size is None:
        return torch.ops.kdops_triton.pixel_kl(student, teacher, target, ignore_index, tau)[0]
    return torch.ops.kdops_triton.resized_pixel_kl(
        student, teacher, target, ignore_index, tau, list(size), align_corners
    )[0]
