"""Attention maps: ``attention_map`` / ``attention_loss`` (SAD, MAD, LGAD, AT) and
``class_attention_map`` / ``class_attention_loss`` (CAMD).

Public API: argument checks, then the backend chosen by :mod:`kdops.backend`. Backends get
canonical arguments: ``size`` as a (H', W') tuple or None, class weights as (K, C).
Math: :mod:`kdops.reference.attention`.

How the fused backends split the work. The cost of these ops is reading the features: a map
is C (or C/K) times smaller than the feature it comes from. So the kernels (C++ CPU, CUDA,
Triton) do exactly the feature-sized steps, as two custom ops with a backward op each:

* ``attention_reduce(x, p, mean)`` → a = Σ_c |x_c|^p (/C), (N, H, W) float32: one read of x,
  float32 accumulation, p = 1, 2, 3 without a pow; backward reads x once more and writes
  grad_x = g·p·|x|^(p−1)·sign(x) (/C) once (0 at x = 0, also for p < 1, where the reference's
  autograd gives NaN).
* ``attention_loss(s, t, p, mean, norm, size)`` (C++ CPU and CUDA): both reductions and the
  map-sized steps in one op with one backward op — one autograd node instead of a dozen, which
  on CPU costs as much as the reductions themselves. It saves the inputs and the two resized
  raw maps. (The Triton backend composes the loss from ``attention_reduce`` in PyTorch.)
  ``class_attention_loss`` (C++ CPU) does the same for CAMD: both GEMMs, the normalisation and the
  loss in one op; CUDA and Triton compose it from ``class_attention_scores``.
* ``class_attention_scores(x, weight, bias)`` → ReLU(W·x + b), (N, K, H, W) float32: a GEMM
  (float32-accurate for float32 inputs, tensor cores for 16-bit) with bias and ReLU fused;
  backward: grad_x = Wᵀ·g', grad_W = Σ_n g'·xᵀ, grad_b = Σ g' with g' = g·[maps > 0].

What follows them — the bilinear resize, the spatial softmax / L2 normalisation and the squared
difference — acts on the (N, H', W') or (N, K, H, W) maps in PyTorch (``finish_attention_map``,
``attention_map_distance``). Fusing those into the kernels would save only map-sized traffic,
while the normalisations need each whole map's max / norm before any element is final. What is
saved for backward: the inputs, and map-sized tensors (the maps and what autograd keeps of the
map-sized steps) — never a tensor of a feature's size (tests/ops/test_attention.py measures it).

A stage feeding several pairs (MAD, SAD) is reduced once: ``attention_map(x, p, reduce,
norm="none")`` is the raw map, and ``attention_map_distance`` compares two raw maps at a size
(see :class:`kdops.losses.SelfAttentionDistillation`).
"""
from __future__ import annotations

import torch

from kdops import _checks, _extension, backend as _backend
from kdops.reference import attention as _reference

REDUCTIONS = ("sum", "mean")
ATTENTION_NORMS = ("softmax", "l2", "none")
CLASS_ATTENTION_NORMS = ("l2", "softmax", "none")


def _check_pair(student, teacher, *, same_spatial: bool) -> None:
    """Two (N, C, H, W) feature maps of one dtype and device with equal N (and H, W)."""
    _checks.tensor("student", student, ndim=4)
    _checks.tensor("teacher", teacher, ndim=4)
    _checks.same_dtype_and_device("student", student, "teacher", teacher)
    if teacher.shape[0] != student.shape[0]:
        raise ValueError(
            f"teacher must have the batch size of student (N={student.shape[0]}), "
            f"got shape {tuple(teacher.shape)}"
        )
    if same_spatial and teacher.shape[2:] != student.shape[2:]:
        raise ValueError(
            f"teacher must have the spatial size of student (H, W = {tuple(student.shape[2:])}), "
            f"got shape {tuple(teacher.shape)}"
        )


def _check_attention_args(p, reduce, norm, size) -> tuple[float, tuple[int, int] | None]:
    p = _checks.positive_finite("p", p)
    _checks.choice("reduce", reduce, REDUCTIONS)
    _checks.choice("norm", norm, ATTENTION_NORMS)
    return p, _checks.size2d("size", size)


def _class_weight(name: str, weight, x_name: str, x: torch.Tensor) -> torch.Tensor:
    """A class weight of shape (K, C) or (K, C, 1, 1) matching x's C, returned as (K, C)."""
    _checks.tensor(name, weight, min_dim=2)
    if not (weight.dim() == 2 or (weight.dim() == 4 and weight.shape[2:] == (1, 1))):
        raise ValueError(f"{name} must have shape (K, C) or (K, C, 1, 1), got {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"{name} must have C={x.shape[1]} columns (the channels of {x_name}), "
            f"got shape {tuple(weight.shape)}"
        )
    _checks.same_device(x_name, x, name, weight)
    return weight.flatten(1)


def _check_class_bias(name: str, bias, num_classes: int, x_name: str, x: torch.Tensor) -> None:
    if bias is None:
        return
    _checks.tensor(name, bias, ndim=1)
    if bias.shape[0] != num_classes:
        raise ValueError(
            f"{name} must have shape (K,) = ({num_classes},), got {tuple(bias.shape)}"
        )
    _checks.same_device(x_name, x, name, bias)


def attention_map(
    x: torch.Tensor,
    p: float = 2,
    reduce: str = "sum",
    norm: str = "softmax",
    size: int | tuple[int, int] | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Spatial attention map: a = Σ_c |x_c|^p ("mean": divided by C), resized, normalised.

    x: (N, C, H, W); p: finite > 0 (for 0 < p < 1 the gradient at an exact zero of x is NaN:
    |x|^p has an unbounded derivative there); reduce: "sum" or "mean"; size: an int or
    (H', W') — when it differs from (H, W) the map is resized bilinearly (align_corners=False)
    before normalisation; norm over the H'·W' positions: "softmax", "l2" (a / max(‖a‖₂, 1e-12))
    or "none". Returns (N, H', W') in float32 (float64 for float64 x).
    """
    _checks.tensor("x", x, ndim=4)
    p, size = _check_attention_args(p, reduce, norm, size)
    return _backend.dispatch("attention_map", backend, x)(x, p, reduce, norm, size)


def attention_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    p: float = 2,
    reduce: str = "sum",
    norm: str = "softmax",
    size: int | tuple[int, int] | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention distillation: mean over N·H'·W' of (A_s − A_t)², A = ``attention_map``.

    student: (N, C_s, H_s, W_s), teacher: (N, C_t, H_t, W_t) of one dtype (C and H, W may
    differ). Both maps are taken at ``size`` (default (H_s, W_s)): a map of another size is
    resized before normalisation. SAD/MAD/LGAD: reduce="sum", norm="softmax" (the deeper
    stage's map resized to the shallower's); attention transfer (Zagoruyko & Komodakis):
    reduce="mean", norm="l2". Returns a float32 scalar (float64 for float64 inputs).
    """
    _check_pair(student, teacher, same_spatial=False)
    p, size = _check_attention_args(p, reduce, norm, size)
    return _backend.dispatch("attention_loss", backend, student)(
        student, teacher, p, reduce, norm, size
    )


def class_attention_map(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    norm: str = "l2",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Class attention maps: M[n, k] = ReLU(Σ_c weight[k, c]·x[n, c] + bias[k]), normalised.

    x: (N, C, H, W); weight: (K, C) or a 1×1 conv's (K, C, 1, 1); bias: (K,) or None; weight
    and bias may have any floating dtype (they are cast to x's accumulation dtype). Each
    (n, k) map is normalised over H·W by ``norm``: "l2", "softmax" or "none". A map the ReLU
    zeroes everywhere gives 0 ("l2", zero gradient) or a uniform map ("softmax").
    Returns (N, K, H, W) in float32 (float64 for float64 x).
    """
    _checks.tensor("x", x, ndim=4)
    weight = _class_weight("weight", weight, "x", x)
    _check_class_bias("bias", bias, weight.shape[0], "x", x)
    _checks.choice("norm", norm, CLASS_ATTENTION_NORMS)
    return _backend.dispatch("class_attention_map", backend, x)(x, weight, bias, norm)


def class_attention_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    norm: str = "l2",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Class attention map distillation (CAMD): mean over N·K·H·W of (M_s − M_t)².

    student: (N, C_s, H, W), teacher: (N, C_t, H, W) of one dtype; student_weight (K, C_s) and
    teacher_weight (K, C_t), each also accepted as (K, C, 1, 1); biases (K,) or None.
    M = ``class_attention_map`` of each side with ``norm``. Returns a float32 scalar
    (float64 for float64 inputs).
    """
    _check_pair(student, teacher, same_spatial=True)
    student_weight = _class_weight("student_weight", student_weight, "student", student)
    teacher_weight = _class_weight("teacher_weight", teacher_weight, "teacher", teacher)
    num_classes = student_weight.shape[0]
    if teacher_weight.shape[0] != num_classes:
        raise ValueError(
            f"teacher_weight must have the K={num_classes} rows of student_weight, "
            f"got shape {tuple(teacher_weight.shape)}"
        )
    _check_class_bias("student_bias", student_bias, num_classes, "student", student)
    _check_class_bias("teacher_bias", teacher_bias, num_classes, "teacher", teacher)
    _checks.choice("norm", norm, CLASS_ATTENTION_NORMS)
    return _backend.dispatch("class_attention_loss", backend, student)(
        student, teacher, student_weight, teacher_weight, student_bias, teacher_bias, norm
    )


def finish_attention_map(raw_map: torch.Tensor, norm: str = "softmax",
                         size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """A raw attention map (N, H, W) — ``attention_map(x, p, reduce, norm="none")`` — resized to
    ``size`` (bilinear, align_corners=False; None keeps (H, W)) and normalised over the positions
    by ``norm`` ("softmax", "l2", "none"). Returns (N, H', W'): ``attention_map(x, p, reduce, norm,
    size)`` without reading x again."""
    _checks.tensor("raw_map", raw_map, ndim=3)
    _checks.choice("norm", norm, ATTENTION_NORMS)
    return _finish(raw_map, norm, _checks.size2d("size", size))


def attention_map_distance(student_map: torch.Tensor, teacher_map: torch.Tensor, norm: str = "softmax",
                           size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """mean over N·H'·W' of (A_s − A_t)², A = ``finish_attention_map(raw, norm, size)``, from two raw
    maps (N, H_s, W_s) and (N, H_t, W_t); ``size`` defaults to the student map's (H_s, W_s).

    ``attention_loss(s, t, p, reduce, norm, size)`` equals ``attention_map_distance(
    attention_map(s, p, reduce, "none"), attention_map(t, p, reduce, "none"), norm, size)``: with
    a map reused by several pairs (MAD), each stage's features are read once per step.
    """
    _checks.tensor("student_map", student_map, ndim=3)
    _checks.tensor("teacher_map", teacher_map, ndim=3)
    _checks.same_dtype_and_device("student_map", student_map, "teacher_map", teacher_map)
    if teacher_map.shape[0] != student_map.shape[0]:
        raise ValueError(
            f"teacher_map must have the batch size of student_map (N={student_map.shape[0]}), "
            f"got shape {tuple(teacher_map.shape)}"
        )
    _checks.choice("norm", norm, ATTENTION_NORMS)
    size = _checks.size2d("size", size)
    return _distance(student_map, teacher_map, norm, size)


# ---------------------------------------------------------------------------------------------
# The fused backends: the kernels' ops (``torch.ops.kdops`` for the C++ CPU and CUDA kernels,
# ``torch.ops.kdops_triton`` for the Triton ones, same schemas) composed with the map-sized steps.


def _finish(raw_map: torch.Tensor, norm: str, size: tuple[int, int] | None) -> torch.Tensor:
    maps = _reference._resize(raw_map, size)
    n, h, w = maps.shape
    return _reference._normalize_positions(maps.reshape(n, h * w), norm).reshape(n, h, w)


def _distance(student_map, teacher_map, norm, size) -> torch.Tensor:
    if size is None:
        size = (student_map.shape[-2], student_map.shape[-1])
    return (_finish(student_map, norm, size) - _finish(teacher_map, norm, size)).square().mean()


def _class_maps(ops, x, weight, bias, norm) -> torch.Tensor:
    maps = ops.class_attention_scores(x, weight, bias)  # ReLU(W·x + b), (N, K, H, W)
    n, k, h, w = maps.shape
    return _reference._normalize_positions(maps.reshape(n, k, h * w), norm).reshape(n, k, h, w)


def fused_backend_functions(namespace: str) -> dict:
    """The four backend entry points (:mod:`kdops.backend` OPS) built on ``torch.ops.<namespace>``."""

    def ops():
        return getattr(torch.ops, namespace)

    def attention_map(x, p, reduce, norm, size):
        return _finish(ops().attention_reduce(x, p, reduce == "mean"), norm, size)

    def attention_loss(student, teacher, p, reduce, norm, size):
        mean = reduce == "mean"
        return _distance(ops().attention_reduce(student, p, mean),
                         ops().attention_reduce(teacher, p, mean), norm, size)

    def class_attention_map(x, weight, bias, norm):
        return _class_maps(ops(), x, weight, bias, norm)

    def class_attention_loss(student, teacher, student_weight, teacher_weight, student_bias,
                             teacher_bias, norm):
        student_maps = _class_maps(ops(), student, student_weight, student_bias, norm)
        teacher_maps = _class_maps(ops(), teacher, teacher_weight, teacher_bias, norm)
        return (student_maps - teacher_maps).square().mean()

    return {
        "attention_map": attention_map,
        "attention_loss": attention_loss,
        "class_attention_map": class_attention_map,
        "class_attention_loss": class_attention_loss,
    }


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _attention_reduce_fake(x, p, mean):
    return x.new_empty((x.shape[0], *x.shape[2:]), dtype=_acc_dtype(x))


def _attention_reduce_backward_fake(grad_map, x, p, mean):
    return torch.empty_like(x)


def _class_attention_scores_fake(x, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0], *x.shape[2:]), dtype=_acc_dtype(x))


def _class_attention_scores_backward_fake(grad_maps, maps, x, weight, x_requires_grad,
                                          weight_requires_grad, bias_requires_grad):
    k, c = weight.shape
    return (
        torch.empty_like(x) if x_requires_grad else x.new_empty((0,)),
        x.new_empty((k, c), dtype=maps.dtype) if weight_requires_grad else x.new_empty((0,)),
        x.new_empty((k,), dtype=maps.dtype) if bias_requires_grad else x.new_empty((0,)),
    )


def _attention_reduce_setup_context(ctx, inputs, output):
    x, p, mean = inputs
    ctx.save_for_backward(x)
    ctx.p, ctx.mean = p, mean


def _class_attention_scores_setup_context(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.weight_dtype = weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def register_attention_ops(namespace: str) -> None:
    """Fake kernels and autograd for ``<namespace>::{attention_reduce, class_attention_scores}``.

    The C++ extension (``kdops``) and the Triton kernels (``kdops_triton``) define these ops and
    their backward ops with the same schemas; both are made differentiable here, the same way.
    Saved for backward: the inputs (x, weight) and the class maps — nothing of a feature's size
    that the caller does not already hold.
    """
    ops = getattr(torch.ops, namespace)

    def attention_reduce_backward(ctx, grad_map):
        (x,) = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return ops.attention_reduce_backward(grad_map, x, ctx.p, ctx.mean), None, None

    def class_attention_scores_backward(ctx, grad_maps):
        x, weight, maps = ctx.saved_tensors
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        grad_x, grad_weight, grad_bias = ops.class_attention_scores_backward(
            grad_maps, maps, x, weight, needs_x, needs_weight, needs_bias
        )
        return (
            grad_x if needs_x else None,
            grad_weight.to(ctx.weight_dtype) if needs_weight else None,
            grad_bias.to(ctx.bias_dtype) if needs_bias else None,
        )

    torch.library.register_fake(f"{namespace}::attention_reduce", _attention_reduce_fake)
    torch.library.register_fake(f"{namespace}::attention_reduce_backward", _attention_reduce_backward_fake)
    torch.library.register_fake(f"{namespace}::class_attention_scores", _class_attention_scores_fake)
    torch.library.register_fake(
        f"{namespace}::class_attention_scores_backward", _class_attention_scores_backward_fake
    )
    torch.library.register_autograd(
        f"{namespace}::attention_reduce", attention_reduce_backward,
        setup_context=_attention_reduce_setup_context,
    )
    torch.library.register_autograd(
        f"{namespace}::class_attention_scores", class_attention_scores_backward,
        setup_context=_class_attention_scores_setup_context,
    )


def _attention_loss_fake(student, teacher, p, mean, norm, size):
    size = (student.shape[-2], student.shape[-1]) if size is None else tuple(size)
    dtype = _acc_dtype(student)
    n = student.shape[0]
    return (student.new_empty((), dtype=dtype), student.new_empty((n, *size), dtype=dtype),
            student.new_empty((n, *size), dtype=dtype))


def _attention_loss_backward_fake(grad_loss, student, teacher, student_map, teacher_map, p, mean, norm,
                                  student_requires_grad, teacher_requires_grad):
    return (torch.empty_like(student) if student_requires_grad else student.new_empty((0,)),
            torch.empty_like(teacher) if teacher_requires_grad else teacher.new_empty((0,)))


def _attention_loss_setup_context(ctx, inputs, output):
    student, teacher, p, mean, norm, size = inputs
    _, student_map, teacher_map = output
    ctx.mark_non_differentiable(student_map, teacher_map)
    ctx.save_for_backward(student, teacher, student_map, teacher_map)
    ctx.p, ctx.mean, ctx.norm = p, mean, norm


def register_attention_loss_op(namespace: str) -> None:
    """Fake kernel and autograd of ``<namespace>::attention_loss``: the whole loss as one op (the
    C++ CPU and CUDA kernels), which saves the inputs and the two resized raw maps (N, H', W')."""
    ops = getattr(torch.ops, namespace)

    def attention_loss_backward(ctx, grad_loss, _grad_student_map, _grad_teacher_map):
        student, teacher, student_map, teacher_map = ctx.saved_tensors
        needs_student, needs_teacher = ctx.needs_input_grad[:2]
        grad_student, grad_teacher = ops.attention_loss_backward(
            grad_loss, student, teacher, student_map, teacher_map, ctx.p, ctx.mean, ctx.norm,
            needs_student, needs_teacher,
        )
        return (grad_student if needs_student else None, grad_teacher if needs_teacher else None,
                None, None, None, None)

    torch.library.register_fake(f"{namespace}::attention_loss", _attention_loss_fake)
    torch.library.register_fake(f"{namespace}::attention_loss_backward", _attention_loss_backward_fake)
    torch.library.register_autograd(
        f"{namespace}::attention_loss", attention_loss_backward, setup_context=_attention_loss_setup_context
    )


def _attention_loss_extension(student, teacher, p, reduce, norm, size):
    """The C++ kernels' attention_loss: one op (one autograd node) for the whole loss — on CPU the
    Python and autograd overhead of a dozen map-sized ops costs as much as the reductions."""
    return torch.ops.kdops.attention_loss(student, teacher, p, reduce == "mean", norm,
                                          None if size is None else list(size))[0]


def _class_attention_loss_fake(student, teacher, student_weight, teacher_weight, student_bias,
                               teacher_bias, norm):
    dtype = _acc_dtype(student)
    shape = (student.shape[0], student_weight.shape[0], *student.shape[2:])
    return (student.new_empty((), dtype=dtype), student.new_empty(shape, dtype=dtype),
            student.new_empty(shape, dtype=dtype))


def _class_attention_loss_backward_fake(grad_loss, student, teacher, student_weight, teacher_weight,
                                        student_maps, teacher_maps, norm, output_mask):
    dtype = student_maps.dtype
    k = student_weight.shape[0]
    wanted = [
        torch.empty_like(student), torch.empty_like(teacher),
        student.new_empty(tuple(student_weight.shape), dtype=dtype),
        student.new_empty(tuple(teacher_weight.shape), dtype=dtype),
        student.new_empty((k,), dtype=dtype), student.new_empty((k,), dtype=dtype),
    ]
    return [w if flag else student.new_empty((0,)) for w, flag in zip(wanted, output_mask)]


def _class_attention_loss_setup_context(ctx, inputs, output):
    student, teacher, student_weight, teacher_weight, student_bias, teacher_bias, norm = inputs
    _, student_maps, teacher_maps = output
    ctx.mark_non_differentiable(student_maps, teacher_maps)
    ctx.save_for_backward(student, teacher, student_weight, teacher_weight, student_maps, teacher_maps)
    ctx.norm = norm
    ctx.dtypes = [None, None, student_weight.dtype, teacher_weight.dtype,
                  None if student_bias is None else student_bias.dtype,
                  None if teacher_bias is None else teacher_bias.dtype]


def register_class_attention_loss_op(namespace: str) -> None:
    """Fake kernel and autograd of ``<namespace>::class_attention_loss``: the whole CAMD loss as one
    op (the C++ CPU kernels), which saves the inputs and the two sides' (N, K, H, W) ReLU maps."""
    ops = getattr(torch.ops, namespace)

    def class_attention_loss_backward(ctx, grad_loss, _grad_student_maps, _grad_teacher_maps):
        saved = ctx.saved_tensors
        mask = [bool(flag) for flag in ctx.needs_input_grad[:6]]
        grads = ops.class_attention_loss_backward(grad_loss, *saved, ctx.norm, [int(f) for f in mask])
        out = [g.to(dtype) if dtype is not None else g for g, dtype in zip(grads, ctx.dtypes)]
        return tuple(g if flag else None for g, flag in zip(out, mask)) + (None,)

    torch.library.register_fake(f"{namespace}::class_attention_loss", _class_attention_loss_fake)
    torch.library.register_fake(f"{namespace}::class_attention_loss_backward",
                                _class_attention_loss_backward_fake)
    torch.library.register_autograd(
        f"{namespace}::class_attention_loss", class_attention_loss_backward,
        setup_context=_class_attention_loss_setup_context,
    )


def _class_attention_loss_cpu(student, teacher, student_weight, teacher_weight, student_bias,
                              teacher_bias, norm):
    """The C++ CPU kernels' class_attention_loss: one op (one autograd node) for the whole loss."""
    return torch.ops.kdops.class_attention_loss(student, teacher, student_weight, teacher_weight,
                                                student_bias, teacher_bias, norm)[0]


_EXTENSION_FUNCTIONS = fused_backend_functions("kdops")
_attention_map_extension = _EXTENSION_FUNCTIONS["attention_map"]
_class_attention_map_extension = _EXTENSION_FUNCTIONS["class_attention_map"]
_class_attention_loss_extension = _EXTENSION_FUNCTIONS["class_attention_loss"]

if _extension.loaded() and torch._C._dispatch_has_kernel("kdops::attention_reduce"):
    register_attention_ops("kdops")
    register_attention_loss_op("kdops")
    if torch._C._dispatch_has_kernel("kdops::class_attention_loss"):
        register_class_attention_loss_op("kdops")
