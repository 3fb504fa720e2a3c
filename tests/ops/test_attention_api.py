"""Public API of the attention-map ops: dispatch to the reference, canonical arguments, checks."""
from __future__ import annotations

import pytest
import torch

import kdops
from kdops import backend as kd_backend
from kdops.reference import attention as ref
from tests.utils import make_layout


def randn(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=dtype)


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    """backend=None means "auto" here, whatever the environment of the test run says."""
    monkeypatch.delenv(kd_backend.BACKEND_ENV_VAR, raising=False)


# The public API's argument handling, bit for bit against the reference it dispatches to. The
# default backend ("auto") runs the fused kernels on CPU tensors: tests/ops/test_attention.py
# holds those to the reference's tolerances, and test_default_backend_is_fused below checks the
# choice.
BACKENDS = [pytest.param("reference", id="reference")]


@pytest.mark.parametrize("op", ["attention_map", "attention_loss", "class_attention_map",
                                "class_attention_loss"])
def test_default_backend_is_fused(op):
    expected = "cpu" if kd_backend.unavailable_reason(op, "cpu", "cpu", torch.float32) is None else "reference"
    assert kd_backend.resolve(op, None, torch.device("cpu"), torch.float32) == expected


def assert_same_values_and_grads(api_out, ref_out, api_inputs, ref_inputs):
    assert api_out.dtype == ref_out.dtype
    assert torch.equal(api_out, ref_out)
    api_grads = torch.autograd.grad(api_out.square().sum(), api_inputs)
    ref_grads = torch.autograd.grad(ref_out.square().sum(), ref_inputs)
    for api_input, api_grad, ref_grad in zip(api_inputs, api_grads, ref_grads):
        # A (K, C, 1, 1) weight gets its gradient in its own shape.
        assert api_grad.shape == api_input.shape and api_grad.dtype == api_input.dtype
        assert torch.equal(api_grad.reshape(ref_grad.shape), ref_grad)


def leaves(*tensors):
    return tuple(t.detach().clone().requires_grad_() for t in tensors)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"),
                                   pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("p, reduce, norm, size, ref_size", [
    pytest.param(2, "sum", "softmax", None, None, id="SAD"),
    pytest.param(2.0, "mean", "l2", (3, 4), (3, 4), id="AT-resized"),
    pytest.param(1.5, "sum", "none", 6, (6, 6), id="int-size"),
])
def test_attention_map_equals_reference(p, reduce, norm, size, ref_size, dtype, backend):
    (x,) = leaves(make_layout(randn(2, 3, 5, 7, dtype=dtype), "channels_last"))
    (x_ref,) = leaves(x)
    out = kdops.attention_map(x, p, reduce, norm, size, backend=backend)
    expected = ref.attention_map(x_ref, float(p), reduce, norm, ref_size)
    assert_same_values_and_grads(out, expected, (x,), (x_ref,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p, reduce, norm, size", [
    pytest.param(2, "sum", "softmax", None, id="SAD-teacher-resized"),
    pytest.param(2, "mean", "l2", [4, 3], id="AT-list-size"),
])
def test_attention_loss_equals_reference(p, reduce, norm, size, backend):
    student, teacher = leaves(randn(2, 3, 6, 5, seed=1), randn(2, 8, 3, 3, seed=2))
    student_ref, teacher_ref = leaves(student, teacher)
    loss = kdops.attention_loss(student, teacher, p, reduce, norm, size, backend=backend)
    ref_size = None if size is None else tuple(size)
    expected = ref.attention_loss(student_ref, teacher_ref, float(p), reduce, norm, ref_size)
    assert_same_values_and_grads(loss, expected, (student, teacher), (student_ref, teacher_ref))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_shape", [pytest.param((4, 3), id="KxC"),
                                          pytest.param((4, 3, 1, 1), id="conv1x1")])
@pytest.mark.parametrize("norm", ["l2", "softmax", "none"])
def test_class_attention_map_equals_reference(norm, weight_shape, backend):
    x, weight, bias = leaves(randn(2, 3, 5, 7, seed=3), randn(*weight_shape, seed=4), randn(4, seed=5))
    x_ref, weight_ref, bias_ref = leaves(x, weight.flatten(1), bias)
    out = kdops.class_attention_map(x, weight, bias, norm, backend=backend)
    expected = ref.class_attention_map(x_ref, weight_ref, bias_ref, norm)
    assert_same_values_and_grads(out, expected, (x, weight, bias), (x_ref, weight_ref, bias_ref))
    assert out.shape == (2, 4, 5, 7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_bias", [pytest.param(False, id="no-bias"),
                                       pytest.param(True, id="bias")])
def test_class_attention_loss_equals_reference(with_bias, backend):
    tensors = leaves(
        randn(2, 3, 5, 7, seed=6), randn(2, 6, 5, 7, seed=7),
        randn(4, 3, 1, 1, seed=8), randn(4, 6, seed=9), randn(4, seed=10), randn(4, seed=11),
    )
    if not with_bias:
        tensors = tensors[:4]
    reference_inputs = leaves(tensors[0], tensors[1], tensors[2].flatten(1), *tensors[3:])
    biases = () if with_bias else (None, None)
    loss = kdops.class_attention_loss(*tensors, *biases, "l2", backend=backend)
    expected = ref.class_attention_loss(*reference_inputs, *biases, "l2")
    assert_same_values_and_grads(loss, expected, tensors, reference_inputs)


def recording(op: str, monkeypatch) -> list[tuple]:
    """Replace the reference implementation of ``op`` by one that records its arguments."""
    calls = []
    reference_fn = kd_backend.implementation(op, "reference")

    def record(*args):
        calls.append(args)
        return reference_fn(*args)

    monkeypatch.setitem(kd_backend._IMPLEMENTATIONS, (op, "reference"), record)
    return calls


def test_backends_get_canonical_arguments(monkeypatch):
    x = randn(2, 3, 5, 7)
    teacher = randn(2, 4, 5, 7)
    calls = recording("attention_map", monkeypatch)
    kdops.attention_map(x, 2, "sum", "softmax", [3, 4], backend="reference")
    assert calls[-1] == (x, 2.0, "sum", "softmax", (3, 4))
    assert type(calls[-1][1]) is float
    kdops.attention_map(x, size=5, backend="reference")
    assert calls[-1][4] == (5, 5)

    calls = recording("attention_loss", monkeypatch)
    kdops.attention_loss(x, teacher, 1, "mean", "l2", None, backend="reference")
    assert calls[-1] == (x, teacher, 1.0, "mean", "l2", None)

    calls = recording("class_attention_map", monkeypatch)
    kdops.class_attention_map(x, randn(4, 3, 1, 1), None, "softmax", backend="reference")
    weight_arg = calls[-1][1]
    assert weight_arg.shape == (4, 3) and calls[-1][2:] == (None, "softmax")

    calls = recording("class_attention_loss", monkeypatch)
    kdops.class_attention_loss(x, teacher, randn(6, 3, 1, 1), randn(6, 4, 1, 1), backend="reference")
    args = calls[-1]
    assert args[2].shape == (6, 3) and args[3].shape == (6, 4) and args[4:] == (None, None, "l2")


def test_named_backend_that_cannot_run_raises():
    x = randn(1, 2, 3, 3, dtype=torch.float64)  # no Triton kernel takes float64
    with pytest.raises(kdops.BackendUnavailableError, match="attention_map"):
        kdops.attention_map(x, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        kdops.attention_map(x, backend="fastest")


# ------------------------------------------------------------------------- checks -------------

X = randn(2, 3, 5, 7)
T = randn(2, 4, 6, 6)  # other C, H, W: a valid attention_loss teacher
T_SAME_HW = randn(2, 4, 5, 7)
W_S, W_T = randn(5, 3), randn(5, 4)
B = randn(5)


def attention_map_call(**overrides):
    kwargs = dict(x=X, p=2, reduce="sum", norm="softmax", size=None) | overrides
    return lambda: kdops.attention_map(**kwargs)


def attention_loss_call(**overrides):
    kwargs = dict(student=X, teacher=T, p=2, reduce="sum", norm="softmax", size=None) | overrides
    return lambda: kdops.attention_loss(**kwargs)


def class_map_call(**overrides):
    kwargs = dict(x=X, weight=W_S, bias=B, norm="l2") | overrides
    return lambda: kdops.class_attention_map(**kwargs)


def class_loss_call(**overrides):
    kwargs = dict(student=X, teacher=T_SAME_HW, student_weight=W_S, teacher_weight=W_T,
                  student_bias=B, teacher_bias=B, norm="l2") | overrides
    return lambda: kdops.class_attention_loss(**kwargs)


BAD_CALLS = [
    # attention_map
    pytest.param(attention_map_call(x=X.tolist()), TypeError, "x", id="map-x-not-tensor"),
    pytest.param(attention_map_call(x=X.long()), TypeError, "x", id="map-x-int"),
    pytest.param(attention_map_call(x=X[0]), ValueError, "x", id="map-x-3d"),
    pytest.param(attention_map_call(x=X[None]), ValueError, "x", id="map-x-5d"),
    pytest.param(attention_map_call(x=X[:, :0]), ValueError, "x", id="map-x-empty"),
    pytest.param(attention_map_call(p=0), ValueError, "p", id="map-p-zero"),
    pytest.param(attention_map_call(p=-1.0), ValueError, "p", id="map-p-negative"),
    pytest.param(attention_map_call(p=float("inf")), ValueError, "p", id="map-p-inf"),
    pytest.param(attention_map_call(p=float("nan")), ValueError, "p", id="map-p-nan"),
    pytest.param(attention_map_call(p="2"), TypeError, "p", id="map-p-str"),
    pytest.param(attention_map_call(p=True), TypeError, "p", id="map-p-bool"),
    pytest.param(attention_map_call(reduce="max"), ValueError, "reduce", id="map-reduce"),
    pytest.param(attention_map_call(norm="l1"), ValueError, "norm", id="map-norm"),
    pytest.param(attention_map_call(size=0), ValueError, "size", id="map-size-zero"),
    pytest.param(attention_map_call(size=(3,)), ValueError, "size", id="map-size-one-int"),
    pytest.param(attention_map_call(size=(3, 2.5)), ValueError, "size", id="map-size-float"),
    pytest.param(attention_map_call(size="4"), ValueError, "size", id="map-size-str"),
    # attention_loss
    pytest.param(attention_loss_call(student=X[0]), ValueError, "student", id="loss-student-3d"),
    pytest.param(attention_loss_call(teacher=T[0]), ValueError, "teacher", id="loss-teacher-3d"),
    pytest.param(attention_loss_call(teacher=T.int()), TypeError, "teacher", id="loss-teacher-int"),
    pytest.param(attention_loss_call(teacher=T.double()), TypeError, "teacher", id="loss-dtype"),
    pytest.param(attention_loss_call(teacher=T.to("meta")), ValueError, "teacher", id="loss-device"),
    pytest.param(attention_loss_call(teacher=T[:1]), ValueError, "teacher", id="loss-batch"),
    pytest.param(attention_loss_call(p=0.0), ValueError, "p", id="loss-p"),
    pytest.param(attention_loss_call(reduce="avg"), ValueError, "reduce", id="loss-reduce"),
    pytest.param(attention_loss_call(norm="max"), ValueError, "norm", id="loss-norm"),
    pytest.param(attention_loss_call(size=(4, -1)), ValueError, "size", id="loss-size"),
    # class_attention_map
    pytest.param(class_map_call(x=X[0]), ValueError, "x", id="cam-x-3d"),
    pytest.param(class_map_call(weight=W_S[0]), ValueError, "weight", id="cam-weight-1d"),
    pytest.param(class_map_call(weight=W_S[:, :, None]), ValueError, "weight", id="cam-weight-3d"),
    pytest.param(class_map_call(weight=randn(5, 3, 3, 3)), ValueError, "weight", id="cam-weight-3x3"),
    pytest.param(class_map_call(weight=randn(5, 4)), ValueError, "weight", id="cam-weight-C"),
    pytest.param(class_map_call(weight=W_S.long()), TypeError, "weight", id="cam-weight-int"),
    pytest.param(class_map_call(weight=W_S.to("meta")), ValueError, "weight", id="cam-weight-device"),
    pytest.param(class_map_call(bias=randn(4)), ValueError, "bias", id="cam-bias-K"),
    pytest.param(class_map_call(bias=B[None]), ValueError, "bias", id="cam-bias-2d"),
    pytest.param(class_map_call(bias=B.long()), TypeError, "bias", id="cam-bias-int"),
    pytest.param(class_map_call(bias=B.to("meta")), ValueError, "bias", id="cam-bias-device"),
    pytest.param(class_map_call(norm="mean"), ValueError, "norm", id="cam-norm"),
    # class_attention_loss
    pytest.param(class_loss_call(student=X[0]), ValueError, "student", id="camd-student-3d"),
    pytest.param(class_loss_call(teacher=T_SAME_HW.half()), TypeError, "teacher", id="camd-dtype"),
    pytest.param(class_loss_call(teacher=T_SAME_HW[:1]), ValueError, "teacher", id="camd-batch"),
    pytest.param(class_loss_call(teacher=T), ValueError, "teacher", id="camd-spatial"),
    pytest.param(class_loss_call(student_weight=W_T), ValueError, "student_weight", id="camd-sw-C"),
    pytest.param(class_loss_call(teacher_weight=W_S), ValueError, "teacher_weight", id="camd-tw-C"),
    pytest.param(class_loss_call(teacher_weight=randn(6, 4)), ValueError, "teacher_weight",
                 id="camd-tw-K"),
    pytest.param(class_loss_call(teacher_weight=randn(5, 4, 2, 2)), ValueError, "teacher_weight",
                 id="camd-tw-kernel"),
    pytest.param(class_loss_call(student_bias=randn(6)), ValueError, "student_bias", id="camd-sb"),
    pytest.param(class_loss_call(teacher_bias=B.int()), TypeError, "teacher_bias", id="camd-tb"),
    pytest.param(class_loss_call(norm="softmax2"), ValueError, "norm", id="camd-norm"),
]


@pytest.mark.parametrize("call, error, name", BAD_CALLS)
def test_bad_arguments_raise_naming_the_argument(call, error, name):
    # The message starts with the argument's name: "teacher" is not matched by "teacher_weight".
    with pytest.raises(error, match=rf"^{name} "):
        call()


@pytest.mark.parametrize("call", [
    pytest.param(attention_map_call(), id="attention_map"),
    pytest.param(attention_loss_call(), id="attention_loss"),
    pytest.param(class_map_call(), id="class_attention_map"),
    pytest.param(class_loss_call(), id="class_attention_loss"),
])
def test_valid_baseline_calls_run(call):
    # The bad calls above differ from these in one argument each.
    assert torch.isfinite(call()).all()
