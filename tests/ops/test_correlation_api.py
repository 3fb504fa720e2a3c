"""Public API of the channel-correlation ops: argument checks, dispatch, agreement with the
reference on every backend that runs here."""
import inspect

import pytest
import torch

import kdops
from kdops import backend as kd_backend
from kdops.reference import correlation as ref
from tests.utils import TOLERANCES, relative_error


def randn(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


# (public op, its reference, argument factory); the factories give valid, odd-sized inputs.
OPS = [
    pytest.param(
        kdops.channel_correlation,
        ref.channel_correlation,
        lambda dtype: (randn((2, 3, 5, 7), 0, dtype),),
        id="channel_correlation",
    ),
    pytest.param(
        kdops.channel_correlation_loss,
        ref.channel_correlation_loss,
        lambda dtype: (randn((2, 3, 5, 7), 1, dtype), randn((2, 3, 3, 4), 2, dtype)),
        id="channel_correlation_loss",
    ),
    pytest.param(
        kdops.pairwise_affinity_loss,
        ref.pairwise_affinity_loss,
        lambda dtype: (randn((2, 3, 5, 7), 3, dtype), randn((2, 6, 5, 7), 4, dtype)),
        id="pairwise_affinity_loss",
    ),
]


@pytest.mark.parametrize("op, reference, make_args", OPS)
def test_backend_reference_is_the_reference(op, reference, make_args):
    args = make_args(torch.float32)
    assert torch.equal(op(*args, backend="reference"), reference(*args))


@pytest.mark.parametrize("op, reference, make_args", OPS)
@pytest.mark.parametrize("dtype, loss_rtol, grad_rtol", TOLERANCES)
def test_default_backend_matches_reference(op, reference, make_args, dtype, loss_rtol, grad_rtol):
    args = [a.requires_grad_() for a in make_args(dtype)]
    args64 = [a.detach().double().requires_grad_() for a in args]
    got, expected = op(*args), reference(*args64)
    assert got.dtype == torch.float32
    assert relative_error(got, expected) <= loss_rtol
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad((got * weights).sum(), args)
    grads64 = torch.autograd.grad((expected * weights.double()).sum(), args64)
    for grad, grad64 in zip(grads, grads64):
        assert grad.dtype == dtype
        assert relative_error(grad, grad64) <= grad_rtol


@pytest.mark.parametrize("op, reference, make_args", OPS)
@pytest.mark.parametrize("name", kd_backend.BACKENDS)
def test_named_backend_runs_or_says_why(op, reference, make_args, name):
    # A backend that can run the op here agrees with the reference; one that cannot raises,
    # never falling back silently.
    args = make_args(torch.float32)
    reason = kd_backend.unavailable_reason(op.__name__, name, "cpu", torch.float32)
    if reason is None:
        got = op(*args, backend=name)
        expected = reference(*[a.double() for a in args])
        assert relative_error(got, expected) <= 1e-5
    else:
        with pytest.raises(kd_backend.BackendUnavailableError, match=name):
            op(*args, backend=name)


@pytest.mark.parametrize("op, reference, make_args", OPS)
def test_env_default_backend(op, reference, make_args, monkeypatch):
    args = make_args(torch.float32)
    monkeypatch.setenv(kd_backend.BACKEND_ENV_VAR, "reference")
    assert torch.equal(op(*args), reference(*args))


@pytest.mark.parametrize("op, reference, make_args", OPS)
def test_backend_is_keyword_only(op, reference, make_args):
    param = inspect.signature(op).parameters["backend"]
    assert param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is None


@pytest.mark.parametrize("op, reference, make_args", OPS)
def test_unknown_backend(op, reference, make_args):
    with pytest.raises(ValueError, match="backend"):
        op(*make_args(torch.float32), backend="fast")


@pytest.mark.parametrize("op, reference, make_args", OPS)
def test_compiles_without_graph_break(op, reference, make_args):
    args = make_args(torch.float32)
    compiled = torch.compile(op, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), op(*args), rtol=1e-6, atol=0)


@pytest.mark.parametrize("norm", ["row", "l", "none"])
def test_channel_correlation_norms(norm):
    # The default backend (the C++ kernels where built) against the float64 reference.
    x = randn((1, 2, 3, 3), 6)
    assert relative_error(kdops.channel_correlation(x, norm), ref.channel_correlation(x.double(), norm)) <= 1e-6
    s, t = randn((1, 2, 3, 3), 7), randn((1, 2, 4, 1), 8)
    assert relative_error(
        kdops.channel_correlation_loss(s, t, norm), ref.channel_correlation_loss(s.double(), t.double(), norm)
    ) <= 1e-6


# --- validation: each error names the argument ----------------------------------------------
# Messages start with the argument's name ("teacher must ..."): matching at the start keeps a
# message about another argument that merely mentions it from passing.

X = randn((2, 3, 4, 5), 9)
X_ERRORS = [
    pytest.param([[1.0]], TypeError, "x", id="not-a-tensor"),
    pytest.param(X.to(torch.int32), TypeError, "x", id="int-dtype"),
    pytest.param(X[0, 0], ValueError, "x", id="2-d"),
    pytest.param(X[:, :0], ValueError, "x", id="empty"),
]


@pytest.mark.parametrize("x, error, name", X_ERRORS)
def test_channel_correlation_rejects_x(x, error, name):
    with pytest.raises(error, match=f"^{name} "):
        kdops.channel_correlation(x)


@pytest.mark.parametrize(
    "op",
    [
        pytest.param(kdops.channel_correlation, id="channel_correlation"),
        pytest.param(
            lambda x, norm: kdops.channel_correlation_loss(x, x, norm), id="channel_correlation_loss"
        ),
    ],
)
@pytest.mark.parametrize("norm", ["L2", "ROW", None, "softmax"])
def test_rejects_norm(op, norm):
    with pytest.raises(ValueError, match="^norm "):
        op(X, norm)


# (student, teacher, error, argument) shared by both losses.
PAIR_ERRORS = [
    pytest.param("student", X, TypeError, "student", id="student-not-a-tensor"),
    pytest.param(X, None, TypeError, "teacher", id="teacher-not-a-tensor"),
    pytest.param(X.long(), X, TypeError, "student", id="student-int"),
    pytest.param(X[0, 0], X, ValueError, "student", id="student-2-d"),
    pytest.param(X, X[0, 0], ValueError, "teacher", id="teacher-2-d"),
    pytest.param(X, X[:, :, :0], ValueError, "teacher", id="teacher-empty"),
    pytest.param(X, X.double(), TypeError, "teacher", id="teacher-dtype"),
    pytest.param(X, X.to("meta"), ValueError, "teacher", id="teacher-device"),
    pytest.param(X, X[:1], ValueError, "teacher", id="teacher-batch"),
]
LOSSES = [
    pytest.param(kdops.channel_correlation_loss, id="channel_correlation_loss"),
    pytest.param(kdops.pairwise_affinity_loss, id="pairwise_affinity_loss"),
]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("student, teacher, error, name", PAIR_ERRORS)
def test_losses_reject(loss, student, teacher, error, name):
    with pytest.raises(error, match=f"^{name} "):
        loss(student, teacher)


def test_channel_correlation_loss_rejects_other_channel_count():
    with pytest.raises(ValueError, match="^teacher must have the channels"):
        kdops.channel_correlation_loss(X, randn((2, 4, 4, 5), 10))


def test_channel_correlation_loss_takes_other_spatial_size():
    t = randn((2, 3, 2, 7), 11)
    expected = ref.channel_correlation_loss(X.double(), t.double())
    assert relative_error(kdops.channel_correlation_loss(X, t), expected) <= 1e-6


@pytest.mark.parametrize(
    "teacher_shape",
    [
        pytest.param((2, 3, 5, 4), id="transposed-HW"),
        pytest.param((2, 3, 20), id="same-L-other-dims"),
        pytest.param((2, 3, 4, 6), id="other-W"),
    ],
)
def test_pairwise_affinity_loss_rejects_other_spatial_shape(teacher_shape):
    with pytest.raises(ValueError, match="^teacher must have the spatial shape"):
        kdops.pairwise_affinity_loss(X, randn(teacher_shape, 12))


def test_pairwise_affinity_loss_takes_other_channel_count():
    t = randn((2, 1, 4, 5), 13)
    expected = ref.pairwise_affinity_loss(X.double(), t.double())
    assert relative_error(kdops.pairwise_affinity_loss(X, t), expected) <= 1e-6


@pytest.mark.parametrize("detach_norm", [1, "yes", None, torch.tensor(True)], ids=repr)
def test_pairwise_affinity_loss_rejects_detach_norm(detach_norm):
    with pytest.raises(TypeError, match="^detach_norm "):
        kdops.pairwise_affinity_loss(X, X, detach_norm)


def test_pairwise_affinity_loss_detach_norm_is_positional_or_keyword():
    param = inspect.signature(kdops.pairwise_affinity_loss).parameters["detach_norm"]
    assert param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and param.default is False
    assert torch.equal(kdops.pairwise_affinity_loss(X, X * 2, True), kdops.pairwise_affinity_loss(X, X * 2, detach_norm=True))
