"""Class prototypes: ``prototype_pool``, ``prototype_kl`` (APD), ``class_variation_loss`` (IFVD).

Public API: argument checks, then the backend chosen by :mod:`kdops.backend`.
Math: :mod:`kdops.reference.prototypes`.
"""
from __future__ import annotations

import torch

from kdops import _checks, _extension, backend as _backend


def _check_classes(num_classes, ignore_index) -> tuple[int, int]:
    num_classes = _checks.integer("num_classes", num_classes, minimum=1)
    ignore_index = _checks.integer("ignore_index", ignore_index)
    return num_classes, ignore_index


# The backends whose kernels check every label value (csrc/cpu/prototypes_common.h label_map:
# an error at once). The CUDA kernels flag only the labels they read (at the features'
# positions), so the public API still checks the whole map there.
_KERNELS_CHECK_LABEL_VALUES = ("cpu",)


def _check_labels(labels, like: torch.Tensor, num_classes: int, ignore_index: int, backend: str) -> None:
    """labels: integer (N, H_l, W_l), any H_l, W_l ≥ 1, on the device of ``like``; its values
    are checked here unless ``backend``'s kernels check them."""
    _checks.labels(
        "labels", labels, batch=like.shape[0], num_classes=num_classes, ignore_index=ignore_index,
        check_values=backend not in _KERNELS_CHECK_LABEL_VALUES,
    )
    if labels.dim() != 3 or labels.numel() == 0:
        raise ValueError(
            f"labels must have shape (N, H, W) with H, W >= 1, got {tuple(labels.shape)}"
        )
    if labels.device != like.device:
        raise ValueError(
            f"labels must be on the device of the features ({like.device}), got {labels.device}"
        )


def _check_features(student, teacher) -> None:
    """Two (N, C, H, W) features of one dtype and device, same N, H, W; C may differ."""
    _checks.tensor("student", student, ndim=4)
    _checks.tensor("teacher", teacher, ndim=4)
    _checks.same_dtype_and_device("student", student, "teacher", teacher)
    if teacher.shape[0] != student.shape[0] or teacher.shape[2:] != student.shape[2:]:
        raise ValueError(
            f"teacher must have the N, H, W of student {tuple(student.shape)}, "
            f"got {tuple(teacher.shape)}"
        )


def _check_protos(name: str, protos, features: torch.Tensor, features_name: str) -> None:
    """(N, K, C) or (K, C) prototypes of ``features`` (N, C, H, W), on their device."""
    _checks.tensor(name, protos)
    if protos.dim() not in (2, 3):
        raise ValueError(f"{name} must have shape (N, K, C) or (K, C), got {tuple(protos.shape)}")
    if protos.dim() == 3 and protos.shape[0] != features.shape[0]:
        raise ValueError(
            f"{name} must have N={features.shape[0]} images like {features_name}, "
            f"got {tuple(protos.shape)}"
        )
    if protos.shape[-1] != features.shape[1]:
        raise ValueError(
            f"{name} must have C={features.shape[1]} channels like {features_name}, "
            f"got {tuple(protos.shape)}"
        )
    _checks.same_device(features_name, features, name, protos)


def prototype_pool(
    x: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    per_image: bool = True,
    normalize_features: bool = False,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class prototypes: the mean feature of each class's pixels.

    x: (N, C, H, W); labels: (N, H_l, W_l) integers in [0, num_classes) or ``ignore_index``,
    resized to (H, W) by nearest neighbour as ``F.interpolate(mode="nearest")``.
    Returns (protos, counts): protos[n, k] = mean of x[n, :, i] over the pixels i of class k,
    (N, K, C), or over the whole batch when ``per_image=False``, (K, C), in float32 (float64
    for float64 x); counts: int64 pixel counts, (N, K) or (K,). A class with count 0 has a
    zero prototype. ``normalize_features=True`` pools the unit features x / max(‖x‖₂, 1e-12)
    (over C, per pixel) instead: APD's prototypes of normalised features, without forming a
    normalised copy of x (nor keeping one for backward).
    """
    _checks.tensor("x", x, ndim=4)
    num_classes, ignore_index = _check_classes(num_classes, ignore_index)
    if not isinstance(per_image, bool):
        raise TypeError(f"per_image must be a bool, got {type(per_image).__name__}")
    if not isinstance(normalize_features, bool):
        raise TypeError(f"normalize_features must be a bool, got {type(normalize_features).__name__}")
    name = _backend.resolve("prototype_pool", backend, x.device, x.dtype)
    _check_labels(labels, x, num_classes, ignore_index, name)
    return _backend.implementation("prototype_pool", name)(
        x, labels, num_classes, ignore_index, per_image, normalize_features
    )


def prototype_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_protos: torch.Tensor,
    teacher_protos: torch.Tensor,
    counts: torch.Tensor,
    tau: float = 0.1,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """APD's observation KL: mean over pixels of KL(softmax(O_t) ‖ softmax(O_s)).

    student: (N, C_s, H, W), teacher: (N, C_t, H, W) of one dtype; student_protos (N, K, C_s)
    or (K, C_s) and teacher_protos of the same kind with C_t (any floating dtype, e.g. from
    :func:`prototype_pool`); counts (N, K) or (K,) integers: the classes with count > 0 are
    present. O[k] = cos(x, P_k) / τ per pixel over the present classes. Returns a float32
    scalar (float64 for float64 features); an image with no present class contributes 0.
    Gradients flow to the features and to both prototype tensors.
    """
    _check_features(student, teacher)
    _check_protos("student_protos", student_protos, student, "student")
    _check_protos("teacher_protos", teacher_protos, teacher, "teacher")
    if teacher_protos.shape[:-1] != student_protos.shape[:-1]:
        raise ValueError(
            f"teacher_protos must have the leading shape {tuple(student_protos.shape[:-1])} of "
            f"student_protos, got {tuple(teacher_protos.shape)}"
        )
    if not isinstance(counts, torch.Tensor):
        raise TypeError(f"counts must be a torch.Tensor, got {type(counts).__name__}")
    if counts.dtype.is_floating_point or counts.dtype.is_complex or counts.dtype == torch.bool:
        raise TypeError(f"counts must be an integer tensor, got {counts.dtype}")
    if counts.shape != student_protos.shape[:-1]:
        raise ValueError(
            f"counts must have shape {tuple(student_protos.shape[:-1])} to match student_protos, "
            f"got {tuple(counts.shape)}"
        )
    _checks.same_device("student", student, "counts", counts)
    tau = _checks.positive_finite("tau", tau)
    return _backend.dispatch("prototype_kl", backend, student)(
        student, teacher, student_protos, teacher_protos, counts, tau
    )


def class_variation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """IFVD intra-class feature variation: mean over N·H·W of (m_s − m_t)².

    student: (N, C_s, H, W), teacher: (N, C_t, H, W) of one dtype; labels: (N, H_l, W_l)
    integers in [0, num_classes) or ``ignore_index``, resized to (H, W) by nearest neighbour.
    m[n, i] = cos(x[n, :, i], P[n, y_i]) with P the per-image class prototypes of that feature;
    m = 1 at ignored pixels. Returns a float32 scalar (float64 for float64 features). Equals
    IFVD / CIRKD ``CriterionIFV(num_classes)`` (whose 1e-6 in the mean's denominator only
    scales the centre, which the cosine ignores).
    """
    _check_features(student, teacher)
    num_classes, ignore_index = _check_classes(num_classes, ignore_index)
    name = _backend.resolve("class_variation_loss", backend, student.device, student.dtype)
    _check_labels(labels, student, num_classes, ignore_index, name)
    return _backend.implementation("class_variation_loss", name)(
        student, teacher, labels, num_classes, ignore_index
    )


# ---------------------------------------------------------------------------------------------
# The C++ extension (backends "cpu" and "cuda") and the Triton kernels: the
# ``<namespace>::{prototype_pool, prototype_kl, class_variation_loss}{, _backward}`` ops of
# csrc/kdops.cpp, made differentiable here. What autograd keeps (DESIGN contract): the inputs,
# the labels, the counts and, for class_variation_loss, the (N, K, C) prototypes of both sides;
# never a (K × L) observation tensor or a copy of the features.


def _prototype_pool_extension(x, labels, num_classes, ignore_index, per_image, normalize_features):
    return tuple(
        torch.ops.kdops.prototype_pool(x, labels, num_classes, ignore_index, per_image, normalize_features)
    )


def _prototype_kl_extension(student, teacher, student_protos, teacher_protos, counts, tau):
    return torch.ops.kdops.prototype_kl(student, teacher, student_protos, teacher_protos, counts, tau)


def _class_variation_loss_extension(student, teacher, labels, num_classes, ignore_index):
    loss, _, _, _ = torch.ops.kdops.class_variation_loss(student, teacher, labels, num_classes, ignore_index)
    return loss


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _prototype_pool_fake(x, labels, num_classes, ignore_index, per_image, normalize_features):
    n, c = x.shape[:2]
    leading = (n, num_classes) if per_image else (num_classes,)
    return x.new_empty((*leading, c), dtype=_acc_dtype(x)), x.new_empty(leading, dtype=torch.int64)


def _prototype_pool_backward_fake(grad_protos, x, labels, counts, ignore_index, normalize_features):
    return torch.empty_like(x)


def _prototype_kl_fake(student, teacher, student_protos, teacher_protos, counts, tau):
    return student.new_empty((), dtype=_acc_dtype(student))


def _requested(x: torch.Tensor, wanted: bool) -> torch.Tensor:
    return torch.empty_like(x) if wanted else x.new_empty((0,))


def _prototype_kl_backward_fake(
    grad_loss, student, teacher, student_protos, teacher_protos, counts, tau,
    student_requires_grad, teacher_requires_grad, student_protos_requires_grad,
    teacher_protos_requires_grad,
):
    return (
        _requested(student, student_requires_grad),
        _requested(teacher, teacher_requires_grad),
        student_protos.new_empty(student_protos.shape if student_protos_requires_grad else (0,)),
        teacher_protos.new_empty(teacher_protos.shape if teacher_protos_requires_grad else (0,)),
    )


def _class_variation_loss_fake(student, teacher, labels, num_classes, ignore_index):
    n = student.shape[0]
    acc = _acc_dtype(student)
    return (
        student.new_empty((), dtype=acc),
        student.new_empty((n, num_classes, student.shape[1]), dtype=acc),
        student.new_empty((n, num_classes, teacher.shape[1]), dtype=acc),
        student.new_empty((n, num_classes), dtype=torch.int64),
    )


def _class_variation_loss_backward_fake(
    grad_loss, student, teacher, labels, student_protos, teacher_protos, counts, ignore_index,
    student_requires_grad, teacher_requires_grad,
):
    return _requested(student, student_requires_grad), _requested(teacher, teacher_requires_grad)


def _prototype_pool_setup_context(ctx, inputs, output):
    x, labels, _, ignore_index, _, normalize_features = inputs
    _, counts = output
    ctx.mark_non_differentiable(counts)
    ctx.save_for_backward(x, labels, counts)
    ctx.ignore_index = ignore_index
    ctx.normalize_features = normalize_features


def _prototype_kl_setup_context(ctx, inputs, output):
    student, teacher, student_protos, teacher_protos, counts, tau = inputs
    ctx.save_for_backward(student, teacher, student_protos, teacher_protos, counts)
    ctx.tau = tau


def _class_variation_loss_setup_context(ctx, inputs, output):
    student, teacher, labels, _, ignore_index = inputs
    _, student_protos, teacher_protos, counts = output
    ctx.mark_non_differentiable(student_protos, teacher_protos, counts)
    ctx.save_for_backward(student, teacher, labels, student_protos, teacher_protos, counts)
    ctx.ignore_index = ignore_index


def register_prototype_ops(namespace: str) -> None:
    """Fake kernels and autograd for ``<namespace>::{prototype_pool, prototype_kl,
    class_variation_loss}`` and their backward ops (the same schemas in the C++ extension,
    ``kdops``, and the Triton kernels, ``kdops_triton``)."""
    ops = getattr(torch.ops, namespace)

    def prototype_pool_backward(ctx, grad_protos, _grad_counts):
        x, labels, counts = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        grad_x = ops.prototype_pool_backward(
            grad_protos, x, labels, counts, ctx.ignore_index, ctx.normalize_features
        )
        return grad_x, None, None, None, None, None

    def prototype_kl_backward(ctx, grad_loss):
        student, teacher, student_protos, teacher_protos, counts = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:4])
        if not any(needs):
            return None, None, None, None, None, None
        grads = ops.prototype_kl_backward(
            grad_loss, student, teacher, student_protos, teacher_protos, counts, ctx.tau, *needs
        )
        return tuple(g if need else None for g, need in zip(grads, needs)) + (None, None)

    def class_variation_loss_backward(ctx, grad_loss, _gs, _gt, _gc):
        student, teacher, labels, student_protos, teacher_protos, counts = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:2])
        if not any(needs):
            return None, None, None, None, None
        grad_student, grad_teacher = ops.class_variation_loss_backward(
            grad_loss, student, teacher, labels, student_protos, teacher_protos, counts,
            ctx.ignore_index, *needs,
        )
        return (
            grad_student if needs[0] else None,
            grad_teacher if needs[1] else None,
            None, None, None,
        )

    for name, fake in (
        ("prototype_pool", _prototype_pool_fake),
        ("prototype_pool_backward", _prototype_pool_backward_fake),
        ("prototype_kl", _prototype_kl_fake),
        ("prototype_kl_backward", _prototype_kl_backward_fake),
        ("class_variation_loss", _class_variation_loss_fake),
        ("class_variation_loss_backward", _class_variation_loss_backward_fake),
    ):
        torch.library.register_fake(f"{namespace}::{name}", fake)
    torch.library.register_autograd(
        f"{namespace}::prototype_pool", prototype_pool_backward,
        setup_context=_prototype_pool_setup_context,
    )
    torch.library.register_autograd(
        f"{namespace}::prototype_kl", prototype_kl_backward, setup_context=_prototype_kl_setup_context
    )
    torch.library.register_autograd(
        f"{namespace}::class_variation_loss", class_variation_loss_backward,
        setup_context=_class_variation_loss_setup_context,
    )


if _extension.loaded():
    register_prototype_ops("kdops")
