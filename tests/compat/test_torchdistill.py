"""kdops.compat.torchdistill against torchdistill's middle-level losses written from their
formulas (yoshitomo-matsubara/torchdistill, torchdistill/losses/mid_level.py): io-dict
forwards, values and student/teacher gradients in float32 and float64, the YAML kwargs,
``register()`` with a fake registry, and the fused backends against the reference."""
from __future__ import annotations

import builtins

import pytest
import torch

from kdops.compat import torchdistill
from tests.compat.helpers import (DEVICES, PRECISIONS, assert_backends_agree, assert_matches, defaults, labels,
                                  parameter_names, randn)


def io(path, io_type, x):
    return {path: {io_type: x}}


# -- formulas -------------------------------------------------------------------------------------
def kl_terms(s, t, tau):
    log_p, log_q = torch.log_softmax(t / tau, dim=1), torch.log_softmax(s / tau, dim=1)
    return log_p.exp() * (log_p - log_q)


def kd_formula(s, t, targets, tau, alpha, beta, reduction, ignore_index=-100):
    """KLDivLoss(reduction) without τ²; with alpha and targets: α·CE + β·τ²·soft."""
    terms = kl_terms(s, t, tau)
    soft = {"none": terms, "sum": terms.sum(), "mean": terms.sum() / terms.numel(),
            "batchmean": terms.sum() / s.shape[0]}[reduction]
    if alpha is None or alpha == 0 or targets is None:
        return soft
    log_q = torch.log_softmax(s, dim=1)
    valid = targets != ignore_index
    picked = -log_q.gather(1, torch.where(valid, targets, 0).unsqueeze(1)).squeeze(1)
    hard = (picked * valid).sum() / valid.sum()
    beta = 1 - alpha if beta is None else beta
    return alpha * hard + beta * tau**2 * soft


def at_code(x):
    a = (x**2).mean(1).flatten(1)
    return a / a.norm(dim=1, keepdim=True)


def at_paper(x):
    a = (x**2).sum(1).flatten(1)
    return a / a.norm(dim=1, keepdim=True)


def at_formula(pairs, mode):
    """pairs: [(s, t, weight)]; 'code': Σ w·mean((a_s − a_t)²); 'paper': Σ w·Σ_n ‖a_s − a_t‖ / N."""
    if mode == "code":
        return sum(w * ((at_code(s) - at_code(t)) ** 2).mean() for s, t, w in pairs)
    total = sum(w * (at_paper(s) - at_paper(t)).norm(dim=1).sum() for s, t, w in pairs)
    return total / pairs[0][0].shape[0]


def row_normalised_gram(x):
    x = x.flatten(2)
    g = x @ x.transpose(1, 2)
    return g / g.norm(dim=2, keepdim=True)


def chsim_formula(pairs):
    """Σ w · Σ (G_s − G_t)² / (C·N²)."""
    total = 0
    for s, t, w in pairs:
        n, c = s.shape[:2]
        total = total + w * ((row_normalised_gram(s) - row_normalised_gram(t)) ** 2).sum() / (c * n * n)
    return total


# -- KDLoss ---------------------------------------------------------------------------------------
KD_CASES = [
    pytest.param(None, None, "batchmean", False, id="soft-only"),
    pytest.param(0.5, None, "batchmean", True, id="alpha-targets"),
    pytest.param(0.3, 2.0, "batchmean", True, id="alpha-beta"),
    pytest.param(0.5, None, "sum", False, id="sum-no-targets"),
    pytest.param(0.5, None, "mean", False, id="mean-no-targets"),
    pytest.param(0.0, None, "batchmean", True, id="alpha-0"),
]


@pytest.mark.parametrize("dtype,tol", PRECISIONS)
@pytest.mark.parametrize("alpha,beta,reduction,with_targets", KD_CASES)
def test_kd_loss_segmentation(dtype, tol, alpha, beta, reduction, with_targets):
    module = torchdistill.KDLoss("seg_head", "output", "seg_head", "output", temperature=4.0, alpha=alpha,
                                 beta=beta, reduction=reduction, ignore_index=255)
    y = labels(2, 3, 4, 5, seed=3) if with_targets else None

    def dropin(s, t):
        return module(io("seg_head", "output", s), io("seg_head", "output", t), y)

    def formula(s, t):
        return kd_formula(s, t, y, 4.0, alpha, beta, reduction, ignore_index=255)

    assert_matches(dropin, formula, [randn(2, 5, 3, 4, seed=1), randn(2, 5, 3, 4, seed=2)], dtype, tol)


@pytest.mark.parametrize("dtype,tol", PRECISIONS)
@pytest.mark.parametrize("reduction,targets", [pytest.param("batchmean", torch.tensor([1, 0, 4]), id="batchmean"),
                                               pytest.param("none", None, id="none")])
def test_kd_loss_classification(dtype, tol, reduction, targets):
    module = torchdistill.KDLoss(".", "output", ".", "output", 2.0, 0.5, reduction=reduction)

    def dropin(s, t):
        return module({".": {"output": s}}, {".": {"output": t}}, targets)

    assert_matches(dropin, lambda s, t: kd_formula(s, t, targets, 2.0, 0.5, None, reduction),
                   [randn(3, 5, seed=1), randn(3, 5, seed=2)], dtype, tol)


# -- ATLoss ---------------------------------------------------------------------------------------
AT_PAIRS = {
    "pair1": {"teacher": {"io": "output", "path": "layer3"}, "student": {"io": "output", "path": "layer3"},
              "weight": 1},
    "pair2": {"teacher": {"io": "output", "path": "layer4"}, "student": {"io": "output", "path": "layer4"},
              "weight": 0.5},
}


@pytest.mark.parametrize("dtype,tol", PRECISIONS)
@pytest.mark.parametrize("mode", ["code", "paper"])
def test_at_loss(dtype, tol, mode):
    module = torchdistill.ATLoss(AT_PAIRS, mode=mode)

    def dropin(s3, t3, s4, t4):
        return module({"layer3": {"output": s3}, "layer4": {"output": s4}},
                      {"layer3": {"output": t3}, "layer4": {"output": t4}})

    def formula(s3, t3, s4, t4):
        return at_formula([(s3, t3, 1), (s4, t4, 0.5)], mode)

    inputs = [randn(2, 3, 6, 6, seed=1), randn(2, 5, 6, 6, seed=2), randn(2, 4, 3, 3, seed=3),
              randn(2, 6, 3, 3, seed=4)]
    assert_matches(dropin, formula, inputs, dtype, tol)


# -- ChSimLoss ------------------------------------------------------------------------------------
CHSIM_PAIRS = {"pair1": {"teacher": {"io": "output", "path": "layer4"},
                         "student": {"io": "output", "path": "embed_dict.embed1"}, "weight": 1}}


@pytest.mark.parametrize("dtype,tol", PRECISIONS)
def test_chsim_loss(dtype, tol):
    module = torchdistill.ChSimLoss(CHSIM_PAIRS)

    def dropin(s, t):
        return module({"embed_dict.embed1": {"output": s}}, {"layer4": {"output": t}})

    inputs = [randn(3, 4, 5, 6, seed=1), randn(3, 4, 3, 3, seed=2)]
    assert_matches(dropin, lambda s, t: chsim_formula([(s, t, 1)]), inputs, dtype, tol)


# -- signatures and registry ----------------------------------------------------------------------
def test_signatures_are_torchdistills():
    assert parameter_names(torchdistill.KDLoss) == ["student_module_path", "student_module_io",
                                                    "teacher_module_path", "teacher_module_io", "temperature",
                                                    "alpha", "beta", "reduction"]
    assert defaults(torchdistill.KDLoss) == {"alpha": None, "beta": None, "reduction": "batchmean"}
    assert parameter_names(torchdistill.KDLoss.forward) == ["student_io_dict", "teacher_io_dict", "targets"]
    assert parameter_names(torchdistill.ATLoss) == ["at_pairs", "mode"]
    assert defaults(torchdistill.ATLoss) == {"mode": "code"}
    assert parameter_names(torchdistill.ChSimLoss) == ["feature_pairs"]
    for cls in (torchdistill.ATLoss, torchdistill.ChSimLoss):
        assert parameter_names(cls.forward) == ["student_io_dict", "teacher_io_dict"]


def test_built_from_yaml_kwargs():
    # the kwargs a YAML ``criterion: {key: ..., kwargs: {...}}`` block passes
    kd = torchdistill.KDLoss(**{"student_module_path": ".", "student_module_io": "output",
                                "teacher_module_path": ".", "teacher_module_io": "output",
                                "temperature": 4.0, "alpha": 0.5, "reduction": "batchmean"})
    assert kd.beta == 0.5 and kd.cross_entropy_loss.reduction == "mean"
    at = torchdistill.ATLoss(**{"at_pairs": AT_PAIRS, "mode": "code"})
    s = {"layer3": {"output": randn(2, 3, 4, 4, seed=1)}, "layer4": {"output": randn(2, 3, 2, 2, seed=2)}}
    t = {"layer3": {"output": randn(2, 3, 4, 4, seed=3)}, "layer4": {"output": randn(2, 3, 2, 2, seed=4)}}
    assert torch.equal(at(student_io_dict=s, teacher_io_dict=t), at(s, t))
    with pytest.raises(ValueError, match="mode"):
        torchdistill.ATLoss(AT_PAIRS, mode="both")


def test_register_adds_middle_level_losses():
    registered = {}

    def register_mid_level_loss(arg=None, **kwargs):  # torchdistill's decorator factory
        def add(cls):
            registered[kwargs.get("key") or cls.__name__] = cls
            return cls
        return add

    added = torchdistill.register(register_mid_level_loss)
    assert registered == {"ATLoss": torchdistill.ATLoss, "ChSimLoss": torchdistill.ChSimLoss,
                          "KDLoss": torchdistill.KDLoss} == added
    torchdistill.register(register_mid_level_loss, prefix="Kdops")
    assert registered["KdopsKDLoss"] is torchdistill.KDLoss


def test_register_without_torchdistill_says_so(monkeypatch):
    real_import = builtins.__import__

    def no_torchdistill(name, *args, **kwargs):
        if name.startswith("torchdistill"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchdistill)
    with pytest.raises(ImportError, match="torchdistill is not installed"):
        torchdistill.register()
    with pytest.raises(TypeError, match="registry"):
        torchdistill.register(object())


# -- fused backends -------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_fused_backends_equal_reference(device):
    kd = torchdistill.KDLoss(".", "output", ".", "output", 4.0, 0.5)
    chsim = torchdistill.ChSimLoss(CHSIM_PAIRS)
    at = torchdistill.ATLoss(AT_PAIRS, mode="paper")

    def kd_with(backend):
        kd.backend = backend
        return lambda s, t: kd({".": {"output": s}}, {".": {"output": t}})

    def chsim_with(backend):
        chsim.backend = backend
        return lambda s, t: chsim({"embed_dict.embed1": {"output": s}}, {"layer4": {"output": t}})

    def at_with(backend):
        at.backend = backend
        return lambda s, t: at({"layer3": {"output": s}, "layer4": {"output": s[:, :, :2, :2]}},
                               {"layer3": {"output": t}, "layer4": {"output": t[:, :, :2, :2]}})

    assert_backends_agree(kd_with, [randn(2, 5, 4, 6, seed=1), randn(2, 5, 4, 6, seed=2)], device)
    assert_backends_agree(chsim_with, [randn(2, 4, 4, 6, seed=1), randn(2, 4, 3, 3, seed=2)], device)
    assert_backends_agree(at_with, [randn(2, 4, 4, 6, seed=1), randn(2, 3, 4, 6, seed=2)], device)
