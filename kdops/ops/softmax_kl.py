"""Softmax-normalised KL: ``channel_kl`` (CWD) and ``pixel_kl`` (pixel-wise KD).

Public API: argument checks, then the backend chosen by :mod:`kdops.backend`.
Math: :mod:`kdops.reference.softmax_kl`.
"""
from __future__ import annotations

import math

import torch

from kdops import _checks, _extension, backend as _backend


def _check_pair(student, teacher) -> None:
    _checks.tensor("student", student, min_dim=3)
    _checks.tensor("teacher", teacher, min_dim=3)
    _checks.same_shape("student", student, "teacher", teacher)
    _checks.same_dtype_and_device("student", student, "teacher", teacher)


def _resize_size(size, student: torch.Tensor) -> tuple[int, int] | None:
    """``size`` as (H, W), or None when it asks for no resize (None, or the logits' own size:
    bilinear resizing to the same size is the identity for either align_corners)."""
    size = _checks.size2d("size", size)
    if size is None:
        return None
    if student.dim() != 4:
        raise ValueError(f"student must have shape (N, C, h, w) to be resized to size, got {tuple(student.shape)}")
    return None if size == tuple(student.shape[2:]) else size


def channel_kl(
    student: torch.Tensor, teacher: torch.Tensor, tau: float = 1.0, *, backend: str | None = None
) -> torch.Tensor:
    """Channel-wise distillation (CWD): τ² · Σ_{n,c} KL(softmax_L(t/τ) ‖ softmax_L(s/τ)) / (N·C).

    student, teacher: (N, C, *spatial) of one dtype; tau in [1e-6, 1e6]; returns a float32
    scalar (float64 for float64 inputs). Equals mmrazor ``ChannelWiseDivergence(tau,
    loss_weight=1)`` and CIRKD ``CriterionCWD('channel', 'kl', tau)``.
    """
    _check_pair(student, teacher)
    tau = _checks.temperature("tau", tau)
    return _backend.dispatch("channel_kl", backend, student)(student, teacher, tau)


def pixel_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    tau: float = 1.0,
    target: torch.Tensor | None = None,
    ignore_index: int = 255,
    *,
    size: tuple[int, int] | None = None,
    align_corners: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Pixel-wise KD: τ² · mean over valid pixels of KL(softmax_C(t/τ) ‖ softmax_C(s/τ)).

    student, teacher: (N, C, *spatial) logits; target: (N, *spatial) integer labels, pixels
    equal to ``ignore_index`` excluded (all pixels when None), every other label in [0, C).
    tau in [1e-6, 1e6]. Returns a float32 scalar; 0 (with zero gradients) when no pixel is
    valid, whatever the ignored pixels hold. Equals CIRKD ``CriterionKD(temperature=tau)``.

    ``size`` = (H, W): the KL is taken between (N, C, h, w) logits resized bilinearly to
    (H, W) (as ``F.interpolate(x, size, mode="bilinear", align_corners=align_corners)``; APD's
    logit KD at label resolution), with target (N, H, W) — without storing the resized logits:
    the kernels interpolate on the fly and transpose the interpolation in backward.
    """
    _check_pair(student, teacher)
    tau = _checks.temperature("tau", tau)
    ignore_index = _checks.integer("ignore_index", ignore_index)
    size = _resize_size(size, student)
    if not isinstance(align_corners, bool):
        raise TypeError(f"align_corners must be a bool, got {align_corners!r}")
    if target is not None:
        if isinstance(target, torch.Tensor):
            _checks.same_device("student", student, "target", target)
        ignore_index = _checks.labels(
            "target", target, batch=student.shape[0], num_classes=student.shape[1],
            ignore_index=ignore_index, spatial=student.shape[2:] if size is None else size,
        )
    return _backend.dispatch("pixel_kl", backend, student)(
        student, teacher, tau, target, ignore_index, size, align_corners)


# ---------------------------------------------------------------------------------------------
# The C++ extension (backends "cpu" and "cuda"): the kdops:: ops of csrc/kdops.cpp, made
# differentiable here. Forward ops save only their inputs and O(rows) statistics: channel_kl its
# row_stats (N·C, 5) = per row [max_s, log z_s, max_t, log z_t, KL] (maxima: logits of the row
# within 8τ of its maximum, raw units, kept apart from the log-sums z = Σ exp((x − max)/τ) so
# that the backward's log-softmax stays shift-safe), pixel_kl
# the 0-dim count of valid pixels (its backward recomputes each pixel's softmaxes from the inputs).

# Columns of channel_kl's row_stats (csrc/common/softmax_kl.h, kKLRowStats).
ROW_STATS = 5


def _channel_kl_extension(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    loss, _ = torch.ops.kdops.channel_kl(student, teacher, tau)
    return loss


def _pixel_kl_extension(
    student: torch.Tensor,
    teacher: torch.Tensor,
    tau: float,
    target: torch.Tensor | None,
    ignore_index: int,
    size: tuple[int, int] | None = None,
    align_corners: bool = False,
) -> torch.Tensor:
    if size is None:
        loss, _ = torch.ops.kdops.pixel_kl(student, teacher, target, ignore_index, tau)
    else:
        loss, _ = torch.ops.kdops.resized_pixel_kl(
            student, teacher, target, ignore_index, tau, list(size), align_corners)
    return loss


# ---------------------------------------------------------------------------------------------
# The op entry points' argument checks, run by the Triton ops (the C++ ops make the same checks,
# with the same messages, in csrc/cpu/softmax_kl_common.h): an op can be called directly, without
# the public API's checks in front of it.


def check_op_pair(student: torch.Tensor, teacher: torch.Tensor, *, four_dims: bool = False) -> None:
    if four_dims and student.dim() != 4:
        raise ValueError(f"student must have shape (N, C, h, w), got {list(student.shape)}")
    if student.dim() < 2:
        raise ValueError(f"student must have shape (N, C, *spatial), got {list(student.shape)}")
    if teacher.shape != student.shape:
        raise ValueError(f"teacher must have the shape of student ({list(student.shape)}), "
                         f"got {list(teacher.shape)}")
    _checks.same_dtype_and_device("student", student, "teacher", teacher)
    if student.numel() == 0:
        raise ValueError(f"student must not be empty, got shape {list(student.shape)}")


def check_op_tau(tau: float) -> None:
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be finite and > 0, got {tau}")


def check_op_size(size) -> None:
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (H, W) with H, W >= 1, got {list(size)}")


def check_op_target(target: torch.Tensor | None, student: torch.Tensor, size=None) -> None:
    """target: integer labels (N, *spatial of student), or (N, *size) for the resized op."""
    if target is None:
        return
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor, got {target.dtype}")
    expected = [student.shape[0], *(size if size is not None else student.shape[2:])]
    if list(target.shape) != expected:
        where = "(N, *size)" if size is not None else "(N, *spatial of student)"
        raise ValueError(f"target must have shape {expected} {where}, got {list(target.shape)}")
    _checks.same_device("student", student, "target", target)


def check_op_grad_loss(grad_loss: torch.Tensor) -> None:
    if grad_loss.numel() != 1:
        raise ValueError(f"grad_loss must hold one element, got shape {list(grad_loss.shape)}")


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_grads(student, teacher, student_requires_grad, teacher_requires_grad):
    """What the backward ops return: empty_like of each input, or an empty tensor when not requested."""
    none = student.new_empty((0,))
    return (
        torch.empty_like(student) if student_requires_grad else none,
        torch.empty_like(teacher) if teacher_requires_grad else none,
    )


def _channel_kl_fake(student, teacher, tau):
    rows = student.shape[0] * student.shape[1]
    dtype = _stats_dtype(student)
    return student.new_empty((), dtype=dtype), student.new_empty((rows, ROW_STATS), dtype=dtype)


def _channel_kl_backward_fake(
    grad_loss, student, teacher, row_stats, tau, student_requires_grad, teacher_requires_grad
):
    return _fake_grads(student, teacher, student_requires_grad, teacher_requires_grad)


def _pixel_kl_fake(student, teacher, target, ignore_index, tau):
    return (
        student.new_empty((), dtype=_stats_dtype(student)),
        student.new_empty((), dtype=torch.int64),
    )


def _pixel_kl_backward_fake(
    grad_loss, student, teacher, target, num_valid, ignore_index, tau,
    student_requires_grad, teacher_requires_grad,
):
    return _fake_grads(student, teacher, student_requires_grad, teacher_requires_grad)


def _resized_pixel_kl_fake(student, teacher, target, ignore_index, tau, size, align_corners):
    return _pixel_kl_fake(student, teacher, target, ignore_index, tau)


def _resized_pixel_kl_backward_fake(
    grad_loss, student, teacher, target, num_valid, ignore_index, tau, size, align_corners,
    student_requires_grad, teacher_requires_grad,
):
    return _fake_grads(student, teacher, student_requires_grad, teacher_requires_grad)


def _channel_kl_setup_context(ctx, inputs, output):
    student, teacher, tau = inputs
    _, row_stats = output
    ctx.mark_non_differentiable(row_stats)
    ctx.save_for_backward(student, teacher, row_stats)
    ctx.tau = tau


def _pixel_kl_setup_context(ctx, inputs, output):
    student, teacher, target, ignore_index, tau = inputs
    _, num_valid = output
    ctx.mark_non_differentiable(num_valid)
    ctx.save_for_backward(student, teacher, target, num_valid)
    ctx.ignore_index = ignore_index
    ctx.tau = tau


def _resized_pixel_kl_setup_context(ctx, inputs, output):
    student, teacher, target, ignore_index, tau, size, align_corners = inputs
    _, num_valid = output
    ctx.mark_non_differentiable(num_valid)
    ctx.save_for_backward(student, teacher, target, num_valid)
    ctx.ignore_index = ignore_index
    ctx.tau = tau
    ctx.size = size
    ctx.align_corners = align_corners


def register_resized_pixel_kl_ops(namespace: str) -> None:
    """Fake kernels and autograd for ``<namespace>::resized_pixel_kl{, _backward}`` (the C++
    extension's ``kdops`` and the Triton kernels' ``kdops_triton``, same schemas)."""
    ops = getattr(torch.ops, namespace)

    def backward(ctx, grad_loss, _grad_num_valid):
        student, teacher, target, num_valid = ctx.saved_tensors
        needs_student, needs_teacher = ctx.needs_input_grad[:2]
        grad_student, grad_teacher = ops.resized_pixel_kl_backward(
            grad_loss, student, teacher, target, num_valid, ctx.ignore_index, ctx.tau, ctx.size,
            ctx.align_corners, needs_student, needs_teacher,
        )
        return (
            grad_student if needs_student else None,
            grad_teacher if needs_teacher else None,
            None, None, None, None, None,
        )

    torch.library.register_fake(f"{namespace}::resized_pixel_kl", _resized_pixel_kl_fake)
    torch.library.register_fake(f"{namespace}::resized_pixel_kl_backward", _resized_pixel_kl_backward_fake)
    torch.library.register_autograd(
        f"{namespace}::resized_pixel_kl", backward, setup_context=_resized_pixel_kl_setup_context
    )


def register_channel_kl_ops(namespace: str) -> None:
    """Fake kernels and autograd for ``<namespace>::channel_kl{, _backward}``: the C++
    extension's ``kdops`` and the Triton kernels' ``kdops_triton`` define them with the same
    schemas; both are made differentiable here, the same way."""
    ops = getattr(torch.ops, namespace)

    def backward(ctx, grad_loss, _grad_row_stats):
        student, teacher, row_stats = ctx.saved_tensors
        needs_student, needs_teacher = ctx.needs_input_grad[:2]
        grad_student, grad_teacher = ops.channel_kl_backward(
            grad_loss, student, teacher, row_stats, ctx.tau, needs_student, needs_teacher
        )
        return (grad_student if needs_student else None, grad_teacher if needs_teacher else None, None)

    torch.library.register_fake(f"{namespace}::channel_kl", _channel_kl_fake)
    torch.library.register_fake(f"{namespace}::channel_kl_backward", _channel_kl_backward_fake)
    torch.library.register_autograd(
        f"{namespace}::channel_kl", backward, setup_context=_channel_kl_setup_context
    )


def register_pixel_kl_ops(namespace: str) -> None:
    """Fake kernels and autograd for ``<namespace>::pixel_kl{, _backward}`` (``kdops`` and
    ``kdops_triton``, same schemas)."""
    ops = getattr(torch.ops, namespace)

    def backward(ctx, grad_loss, _grad_num_valid):
        student, teacher, target, num_valid = ctx.saved_tensors
        needs_student, needs_teacher = ctx.needs_input_grad[:2]
        grad_student, grad_teacher = ops.pixel_kl_backward(
            grad_loss, student, teacher, target, num_valid, ctx.ignore_index, ctx.tau,
            needs_student, needs_teacher,
        )
        return (
            grad_student if needs_student else None,
            grad_teacher if needs_teacher else None,
            None, None, None,
        )

    torch.library.register_fake(f"{namespace}::pixel_kl", _pixel_kl_fake)
    torch.library.register_fake(f"{namespace}::pixel_kl_backward", _pixel_kl_backward_fake)
    torch.library.register_autograd(
        f"{namespace}::pixel_kl", backward, setup_context=_pixel_kl_setup_context
    )


if _extension.loaded():
    register_channel_kl_ops("kdops")
    register_pixel_kl_ops("kdops")
    register_resized_pixel_kl_ops("kdops")
