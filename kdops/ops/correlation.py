"""Channel correlations: ``channel_correlation``, ``channel_correlation_loss`` (ICKD) and
``pairwise_affinity_loss`` (SKD pair-wise distillation).

Public API: argument checks, then the backend chosen by :mod:`kdops.backend`.
Math: :mod:`kdops.reference.correlation`.
"""
from __future__ import annotations

import torch

from kdops import _checks, _extension, backend as _backend
from kdops.reference.correlation import NORMS


def _check_pair(student, teacher) -> None:
    _checks.tensor("student", student, min_dim=3)
    _checks.tensor("teacher", teacher, min_dim=3)
    _checks.same_dtype_and_device("student", student, "teacher", teacher)
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(
            f"teacher must have the batch size of student ({student.shape[0]}), "
            f"got shape {tuple(teacher.shape)}"
        )


def channel_correlation(
    x: torch.Tensor, norm: str = "row", *, backend: str | None = None
) -> torch.Tensor:
    """Channel correlation (Gram) matrices G = X Xᵀ, X = x as (N, C, L).

    x: (N, C, *spatial). ``norm``: "row" divides each row of G by max(its L2 norm, 1e-12)
    (ICKD), "l" divides G by L, "none" leaves it. Returns (N, C, C) in float32 (float64 for
    float64 input).
    """
    _checks.tensor("x", x, min_dim=3)
    _checks.choice("norm", norm, NORMS)
    return _backend.dispatch("channel_correlation", backend, x)(x, norm)


def channel_correlation_loss(
    student: torch.Tensor, teacher: torch.Tensor, norm: str = "row", *, backend: str | None = None
) -> torch.Tensor:
    """Inter-channel correlation distillation (ICKD): Σ (G_s − G_t)² / (N·C).

    student: (N, C, *spatial), teacher: (N, C, *spatial') of one dtype and device; the spatial
    sizes may differ. G as in :func:`channel_correlation` with ``norm``. Returns a float32
    scalar (float64 for float64 inputs). With norm="row" this is ICKD's loss; channel counts
    that differ need an adapter in the loss module first.
    """
    _check_pair(student, teacher)
    if teacher.shape[1] != student.shape[1]:
        raise ValueError(
            f"teacher must have the channels of student ({student.shape[1]}), "
            f"got shape {tuple(teacher.shape)}"
        )
    _checks.choice("norm", norm, NORMS)
    return _backend.dispatch("channel_correlation_loss", backend, student)(student, teacher, norm)


def pairwise_affinity_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    detach_norm: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """SKD pair-wise distillation: Σ (A_s − A_t)² / (N·L²), A = X̂ᵀ X̂ the L × L cosine affinity
    of positions, x̂ = x / max(‖x‖₂, 1e-12) over channels.

    student: (N, C_s, *spatial), teacher: (N, C_t, *spatial) of one dtype and device; the
    channel counts may differ. ``detach_norm=True`` treats the per-pixel norm as a constant for
    the gradient, as SKD's ``sim_dis_compute`` does (the loss is the same; the gradients of the two
    differ by ~100%). Memory is O(C²): no L × L matrix larger than C × C is formed. Returns a
    float32 scalar (float64 for float64 inputs).
    """
    _check_pair(student, teacher)
    if teacher.shape[2:] != student.shape[2:]:
        raise ValueError(
            f"teacher must have the spatial shape of student ({tuple(student.shape[2:])}), "
            f"got shape {tuple(teacher.shape)}"
        )
    if not isinstance(detach_norm, bool):
        raise TypeError(f"detach_norm must be a bool, got {type(detach_norm).__name__}")
    return _backend.dispatch("pairwise_affinity_loss", backend, student)(student, teacher, detach_norm)


# ---------------------------------------------------------------------------------------------
# The C++ extension (backends "cpu" and "cuda"): the kdops:: ops of csrc/kdops.cpp, made
# differentiable here. Saved for backward: the inputs, and O(N·C) / O(N·L) statistics only —
# channel_correlation its (N, C, C) output and the (N, C) row norms of the raw Gram,
# pairwise_affinity_loss the (N, 2, L) per-pixel norms (float64), channel_correlation_loss nothing else.
# The backward ops recompute the C × C Gram matrices (at C = L one is as large as the input).


def _channel_correlation_extension(x: torch.Tensor, norm: str) -> torch.Tensor:
    gram, _ = torch.ops.kdops.channel_correlation(x, norm)
    return gram


def _channel_correlation_loss_extension(student: torch.Tensor, teacher: torch.Tensor, norm: str) -> torch.Tensor:
    return torch.ops.kdops.channel_correlation_loss(student, teacher, norm)


def _pairwise_affinity_loss_extension(
    student: torch.Tensor, teacher: torch.Tensor, detach_norm: bool
) -> torch.Tensor:
    loss, _ = torch.ops.kdops.pairwise_affinity_loss(student, teacher, detach_norm)
    return loss


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_grads(student, teacher, student_requires_grad, teacher_requires_grad):
    """What the backward ops return: empty_like of each input, or an empty tensor when not requested."""
    none = student.new_empty((0,))
    return (
        torch.empty_like(student) if student_requires_grad else none,
        torch.empty_like(teacher) if teacher_requires_grad else none,
    )


def _channel_correlation_fake(x, norm):
    n, c = x.shape[:2]
    dtype = _stats_dtype(x)
    return x.new_empty((n, c, c), dtype=dtype), x.new_empty((n, c), dtype=dtype)


def _channel_correlation_backward_fake(grad_gram, x, gram, row_norms, norm):
    return torch.empty_like(x)


def _channel_correlation_loss_fake(student, teacher, norm):
    return student.new_empty((), dtype=_stats_dtype(student))


def _channel_correlation_loss_backward_fake(
    grad_loss, student, teacher, norm, student_requires_grad, teacher_requires_grad
):
    return _fake_grads(student, teacher, student_requires_grad, teacher_requires_grad)


def _pairwise_affinity_loss_fake(student, teacher, detach_norm):
    length = 1
    for size in student.shape[2:]:
        length *= size
    norms = student.new_empty((student.shape[0], 2, length), dtype=torch.float64)
    return student.new_empty((), dtype=_stats_dtype(student)), norms


def _pairwise_affinity_loss_backward_fake(
    grad_loss, student, teacher, norms, detach_norm, student_requires_grad, teacher_requires_grad
):
    return _fake_grads(student, teacher, student_requires_grad, teacher_requires_grad)


def _channel_correlation_setup_context(ctx, inputs, output):
    x, norm = inputs
    gram, row_norms = output
    ctx.mark_non_differentiable(row_norms)
    ctx.save_for_backward(x, gram, row_norms)
    ctx.norm = norm


def _channel_correlation_loss_setup_context(ctx, inputs, output):
    student, teacher, norm = inputs
    ctx.save_for_backward(student, teacher)
    ctx.norm = norm


def _pairwise_affinity_loss_setup_context(ctx, inputs, output):
    student, teacher, detach_norm = inputs
    _, norms = output
    ctx.mark_non_differentiable(norms)
    ctx.save_for_backward(student, teacher, norms)
    ctx.detach_norm = detach_norm


def register_correlation_ops(namespace: str) -> None:
    """Fake kernels and autograd for ``<namespace>::{channel_correlation, channel_correlation_loss,
    pairwise_affinity_loss}{, _backward}``.

    The C++ extension (``kdops``) and the Triton kernels (``kdops_triton``) define these six ops
    with the same schemas; both are made differentiable here, the same way.
    """
    ops = getattr(torch.ops, namespace)

    def channel_correlation_backward(ctx, grad_gram, _grad_row_norms):
        x, gram, row_norms = ctx.saved_tensors
        return ops.channel_correlation_backward(grad_gram, x, gram, row_norms, ctx.norm), None

    def channel_correlation_loss_backward(ctx, grad_loss):
        student, teacher = ctx.saved_tensors
        needs_student, needs_teacher = ctx.needs_input_grad[:2]
        grad_student, grad_teacher = ops.channel_correlation_loss_backward(
            grad_loss, student, teacher, ctx.norm, needs_student, needs_teacher
        )
        return (grad_student if needs_student else None, grad_teacher if needs_teacher else None, None)

    def pairwise_affinity_loss_backward(ctx, grad_loss, _grad_norms):
        student, teacher, norms = ctx.saved_tensors
        needs_student, needs_teacher = ctx.needs_input_grad[:2]
        grad_student, grad_teacher = ops.pairwise_affinity_loss_backward(
            grad_loss, student, teacher, norms, ctx.detach_norm, needs_student, needs_teacher
        )
        return (grad_student if needs_student else None, grad_teacher if needs_teacher else None, None)

    for name, fake in (
        ("channel_correlation", _channel_correlation_fake),
        ("channel_correlation_backward", _channel_correlation_backward_fake),
        ("channel_correlation_loss", _channel_correlation_loss_fake),
        ("channel_correlation_loss_backward", _channel_correlation_loss_backward_fake),
        ("pairwise_affinity_loss", _pairwise_affinity_loss_fake),
        ("pairwise_affinity_loss_backward", _pairwise_affinity_loss_backward_fake),
    ):
        torch.library.register_fake(f"{namespace}::{name}", fake)
    torch.library.register_autograd(
        f"{namespace}::channel_correlation", channel_correlation_backward,
        setup_context=_channel_correlation_setup_context,
    )
    torch.library.register_autograd(
        f"{namespace}::channel_correlation_loss", channel_correlation_loss_backward,
        setup_context=_channel_correlation_loss_setup_context,
    )
    torch.library.register_autograd(
        f"{namespace}::pairwise_affinity_loss", pairwise_affinity_loss_backward,
        setup_context=_pairwise_affinity_loss_setup_context,
    )


if _extension.loaded():
    register_correlation_ops("kdops")
