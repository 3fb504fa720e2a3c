"""Public API of the prototype ops: dispatch to the reference, argument order, validation."""
from __future__ import annotations

import pytest
import torch

import kdops
from kdops import backend as kd_backend
from kdops.reference import prototypes as ref

OPS = ("prototype_pool", "prototype_kl", "class_variation_loss")


def features(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def labels_like(n, h, w, num_classes, ignore_index=255, seed=1):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n, h, w), generator=g)
    return labels.masked_fill(torch.rand(n, h, w, generator=g) < 0.25, ignore_index)


def pool_args():
    # Non-default ignore_index, per_image and normalize_features, labels at another resolution:
    # a wrong argument order or a dropped argument changes the result.
    return (features(2, 3, 5, 7), labels_like(2, 9, 4, 4, ignore_index=7), 4, 7, False, True)


def kl_args():
    s, t = features(2, 3, 5, 7, seed=2), features(2, 4, 5, 7, seed=3)
    counts = torch.tensor([[2, 0, 1, 5], [1, 1, 0, 3]])
    return (s, t, features(2, 4, 3, seed=4), features(2, 4, 4, seed=5), counts, 0.3)


def variation_args():
    s, t = features(2, 3, 5, 7, seed=6), features(2, 4, 5, 7, seed=7)
    return (s, t, labels_like(2, 10, 14, 5, ignore_index=-1), 5, -1)


ARGS = {"prototype_pool": pool_args, "prototype_kl": kl_args, "class_variation_loss": variation_args}


def assert_same(actual, expected, exact=True):
    """Same dtypes and values: bitwise, or (a fused backend against the reference) to 1e-5."""
    actual = actual if isinstance(actual, tuple) else (actual,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype
        if exact or not a.dtype.is_floating_point:
            assert torch.equal(a, e)
        else:
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "auto", None], ids=["reference", "auto", "default"])
@pytest.mark.parametrize("op", OPS)
def test_public_api_equals_reference(op, backend, monkeypatch):
    monkeypatch.delenv(kd_backend.BACKEND_ENV_VAR, raising=False)
    args = ARGS[op]()
    result = getattr(kdops, op)(*args, backend=backend)
    assert_same(result, getattr(ref, op)(*args), exact=backend == "reference")
    # "auto" and the default run the backend "auto" resolves to (on CPU: the C++ kernels when
    # built), bit for bit.
    if backend != "reference":
        chosen = kd_backend.resolve(op, "auto", args[0].device, args[0].dtype)
        assert_same(result, getattr(kdops, op)(*args, backend=chosen))


@pytest.mark.parametrize("op", OPS)
def test_backend_environment_variable_is_the_default(op, monkeypatch):
    monkeypatch.setenv(kd_backend.BACKEND_ENV_VAR, "reference")
    args = ARGS[op]()
    assert_same(getattr(kdops, op)(*args), getattr(ref, op)(*args))


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_defaults_match_the_documented_ones(backend):
    x, labels = features(2, 3, 4, 4), labels_like(2, 4, 4, 3)
    assert_same(
        kdops.prototype_pool(x, labels, 3, backend=backend),
        kdops.prototype_pool(x, labels, 3, 255, True, False, backend=backend),
    )
    s, t, s_protos, t_protos, counts, _ = kl_args()
    assert_same(
        kdops.prototype_kl(s, t, s_protos, t_protos, counts, backend=backend),
        kdops.prototype_kl(s, t, s_protos, t_protos, counts, 0.1, backend=backend),
    )
    s, t = features(2, 3, 4, 4), features(2, 2, 4, 4)
    assert_same(
        kdops.class_variation_loss(s, t, labels, 3, backend=backend),
        kdops.class_variation_loss(s, t, labels, 3, 255, backend=backend),
    )
    # The reference's own defaults are the same ones.
    assert_same(ref.prototype_pool(x, labels, 3), ref.prototype_pool(x, labels, 3, 255, True, False))
    assert_same(ref.class_variation_loss(s, t, labels, 3), ref.class_variation_loss(s, t, labels, 3, 255))


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize(
    "label_dtype", [torch.uint8, torch.int32, torch.int64], ids=["uint8", "int32", "int64"]
)
def test_label_dtypes(label_dtype, backend):
    x, labels = features(2, 3, 5, 7), labels_like(2, 3, 4, 4)
    exact = backend == "reference"
    expected = ref.prototype_pool(x, labels, 4)
    assert_same(kdops.prototype_pool(x, labels.to(label_dtype), 4, backend=backend), expected, exact)
    s, t = features(2, 2, 5, 7, seed=9), x
    assert_same(
        kdops.class_variation_loss(s, t, labels.to(label_dtype), 4, backend=backend),
        ref.class_variation_loss(s, t, labels, 4),
        exact,
    )


def test_apd_pipeline_gradients_reach_features_and_projections():
    # APD: projected features → prototypes → observation KL, all differentiable.
    s, t = features(2, 3, 5, 7).requires_grad_(), features(2, 4, 5, 7, seed=1).requires_grad_()
    labels = labels_like(2, 5, 7, 6)
    s_protos, counts = kdops.prototype_pool(s, labels, 6)
    t_protos, _ = kdops.prototype_pool(t, labels, 6)
    loss = kdops.prototype_kl(s, t, s_protos, t_protos, counts)
    loss.backward()
    for grad in (s.grad, t.grad):
        assert grad.isfinite().all() and grad.ne(0).any()


# Backends other than the reference that do not implement an op must refuse, never fall back.
UNIMPLEMENTED = [
    pytest.param(op, name, id=f"{op}-{name}")
    for op in OPS
    for name in ("cpu", "cuda", "triton")
    if kd_backend.OPS[op].implementation_path(name) is None
]


@pytest.mark.parametrize("op, backend", UNIMPLEMENTED)
def test_unimplemented_backend_raises(op, backend):
    with pytest.raises(kdops.BackendUnavailableError, match=backend):
        getattr(kdops, op)(*ARGS[op](), backend=backend)


@pytest.mark.parametrize("op", OPS)
def test_unknown_backend_raises(op):
    with pytest.raises(ValueError, match="backend"):
        getattr(kdops, op)(*ARGS[op](), backend="fast")


# ---------------------------------------------------------------- validation -----------------

X = features(2, 3, 4, 5)
X_T = features(2, 2, 4, 5, seed=1)
LABELS = labels_like(2, 4, 5, 3)
S_PROTOS, T_PROTOS = features(2, 3, 3, seed=2), features(2, 3, 2, seed=3)
COUNTS = torch.tensor([[1, 0, 2], [3, 3, 0]])


def pool(**changes):
    kwargs = dict(x=X, labels=LABELS, num_classes=3, ignore_index=255, per_image=True) | changes
    return lambda: kdops.prototype_pool(**kwargs)


def kl(**changes):
    kwargs = dict(
        student=X, teacher=X_T, student_protos=S_PROTOS, teacher_protos=T_PROTOS, counts=COUNTS, tau=0.1
    ) | changes
    return lambda: kdops.prototype_kl(**kwargs)


def variation(**changes):
    kwargs = dict(student=X, teacher=X_T, labels=LABELS, num_classes=3, ignore_index=255) | changes
    return lambda: kdops.class_variation_loss(**kwargs)


BAD_LABELS = {
    "float": LABELS.float(),
    "bool": LABELS > 0,
    "wrong-N": LABELS[:1],
    "2d": LABELS.reshape(2, -1),
    "4d": LABELS[:, None],
    "empty": LABELS[:, :0],
    "too-large": LABELS.masked_fill(LABELS == 0, 3),
    "negative": LABELS.masked_fill(LABELS == 0, -1),
    "list": LABELS.tolist(),
}

VALIDATION_CASES = [
    # prototype_pool
    pytest.param(pool(x=X.tolist()), TypeError, "x", id="pool-x-not-tensor"),
    pytest.param(pool(x=X.long()), TypeError, "x", id="pool-x-int"),
    pytest.param(pool(x=X[0]), ValueError, "x", id="pool-x-3d"),
    pytest.param(pool(x=X[:, :, :0]), ValueError, "x", id="pool-x-empty"),
    pytest.param(pool(num_classes=0), ValueError, "num_classes", id="pool-num_classes-0"),
    pytest.param(pool(num_classes=3.0), TypeError, "num_classes", id="pool-num_classes-float"),
    pytest.param(pool(num_classes=True), TypeError, "num_classes", id="pool-num_classes-bool"),
    pytest.param(pool(ignore_index=255.0), TypeError, "ignore_index", id="pool-ignore_index-float"),
    pytest.param(pool(per_image=1), TypeError, "per_image", id="pool-per_image-int"),
    pytest.param(pool(per_image="yes"), TypeError, "per_image", id="pool-per_image-str"),
    pytest.param(pool(normalize_features=1), TypeError, "normalize_features", id="pool-normalize-int"),
    *[
        pytest.param(pool(labels=bad), (TypeError, ValueError), "labels", id=f"pool-labels-{name}")
        for name, bad in BAD_LABELS.items()
    ],
    # prototype_kl
    pytest.param(kl(student=X[0]), ValueError, "student", id="kl-student-3d"),
    pytest.param(kl(teacher=X_T.double()), TypeError, "teacher", id="kl-teacher-dtype"),
    pytest.param(kl(teacher=X_T[:1]), ValueError, "teacher", id="kl-teacher-N"),
    pytest.param(kl(teacher=X_T[:, :, :3]), ValueError, "teacher", id="kl-teacher-H"),
    pytest.param(kl(teacher=X_T[..., :4]), ValueError, "teacher", id="kl-teacher-W"),
    pytest.param(kl(student_protos=S_PROTOS.tolist()), TypeError, "student_protos", id="kl-student_protos-list"),
    pytest.param(kl(student_protos=S_PROTOS.long()), TypeError, "student_protos", id="kl-student_protos-int"),
    pytest.param(kl(student_protos=S_PROTOS[0, 0]), ValueError, "student_protos", id="kl-student_protos-1d"),
    pytest.param(kl(student_protos=S_PROTOS[None]), ValueError, "student_protos", id="kl-student_protos-4d"),
    pytest.param(kl(student_protos=S_PROTOS[:1]), ValueError, "student_protos", id="kl-student_protos-N"),
    pytest.param(kl(student_protos=S_PROTOS[..., :2]), ValueError, "student_protos", id="kl-student_protos-C"),
    pytest.param(kl(teacher_protos=T_PROTOS[..., :1]), ValueError, "teacher_protos", id="kl-teacher_protos-C"),
    pytest.param(kl(teacher_protos=T_PROTOS[:, :2]), ValueError, "teacher_protos", id="kl-teacher_protos-K"),
    pytest.param(kl(teacher_protos=T_PROTOS[0]), ValueError, "teacher_protos", id="kl-teacher_protos-kind"),
    pytest.param(kl(counts=COUNTS.tolist()), TypeError, "counts", id="kl-counts-list"),
    pytest.param(kl(counts=COUNTS.float()), TypeError, "counts", id="kl-counts-float"),
    pytest.param(kl(counts=COUNTS > 0), TypeError, "counts", id="kl-counts-bool"),
    pytest.param(kl(counts=COUNTS[0]), ValueError, "counts", id="kl-counts-kind"),
    pytest.param(kl(counts=COUNTS[:, :2]), ValueError, "counts", id="kl-counts-K"),
    pytest.param(
        kl(student_protos=S_PROTOS[0], teacher_protos=T_PROTOS[0]), ValueError, "counts", id="kl-counts-per-batch"
    ),
    pytest.param(kl(tau=0.0), ValueError, "tau", id="kl-tau-0"),
    pytest.param(kl(tau=-0.1), ValueError, "tau", id="kl-tau-negative"),
    pytest.param(kl(tau=float("inf")), ValueError, "tau", id="kl-tau-inf"),
    pytest.param(kl(tau=float("nan")), ValueError, "tau", id="kl-tau-nan"),
    pytest.param(kl(tau="0.1"), TypeError, "tau", id="kl-tau-str"),
    # class_variation_loss
    pytest.param(variation(student=X.long()), TypeError, "student", id="variation-student-int"),
    pytest.param(variation(teacher=X_T[0]), ValueError, "teacher", id="variation-teacher-3d"),
    pytest.param(variation(teacher=X_T.half()), TypeError, "teacher", id="variation-teacher-dtype"),
    pytest.param(variation(teacher=X_T[..., :3]), ValueError, "teacher", id="variation-teacher-W"),
    pytest.param(variation(num_classes=-2), ValueError, "num_classes", id="variation-num_classes-negative"),
    pytest.param(variation(ignore_index="255"), TypeError, "ignore_index", id="variation-ignore_index-str"),
    *[
        pytest.param(variation(labels=bad), (TypeError, ValueError), "labels", id=f"variation-labels-{name}")
        for name, bad in BAD_LABELS.items()
    ],
    pytest.param(variation(ignore_index=-1), ValueError, "labels", id="variation-labels-255-not-ignored"),
]


@pytest.mark.parametrize("call, error, argument", VALIDATION_CASES)
def test_validation_names_the_argument(call, error, argument):
    with pytest.raises(error, match=rf"^{argument}\b"):
        call()


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_labels_equal_to_a_custom_ignore_index_are_accepted(backend):
    labels = LABELS.masked_fill(LABELS == 255, -1)
    assert_same(kdops.prototype_pool(X, labels, 3, -1, backend=backend), ref.prototype_pool(X, LABELS, 3, 255),
                exact=backend == "reference")


def _on_cuda(args):
    return tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)


def _on_cpu(result):
    return tuple(r.cpu() for r in result) if isinstance(result, tuple) else result.cpu()


@pytest.mark.needs_cuda
@pytest.mark.parametrize("backend", ["auto", "cuda"])
@pytest.mark.parametrize("op", OPS)
def test_public_api_on_cuda_tensors_equals_reference(op, backend, monkeypatch):
    """CUDA tensors: "auto" runs a fused backend, and the CUDA kernels named explicitly give the
    reference's values with the arguments in the public order."""
    monkeypatch.delenv(kd_backend.BACKEND_ENV_VAR, raising=False)
    args = _on_cuda(ARGS[op]())
    reason = kd_backend.unavailable_reason(op, "cuda", "cuda", torch.float32)
    if backend == "cuda" and reason is not None:
        pytest.skip(reason)
    if backend == "auto":
        assert kd_backend.resolve(op, "auto", args[0].device, args[0].dtype) in ("cuda", "triton")
    result = getattr(kdops, op)(*args, backend=backend)
    assert_same(_on_cpu(result), getattr(ref, op)(*ARGS[op]()), exact=False)
