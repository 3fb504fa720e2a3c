"""kdops.compat.cirkd against CIRKD's losses written from their formulas (winycg/CIRKD,
losses/{kd,cwd,at,skd,ifvd}.py): values and student/teacher gradients in float32 and float64,
CIRKD's constructor and forward signatures, and the fused backends against the reference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdops.compat import cirkd
from tests.compat.helpers import (DEVICES, PRECISIONS, assert_backends_agree, assert_matches, defaults, labels,
                                  parameter_names, randn)


# -- the upstream math, from the formulas ---------------------------------------------------------
def kd_formula(pred, soft, tau):
    """τ² · Σ_pixels KL(softmax_C(soft/τ) ‖ softmax_C(pred/τ)) / (N·H·W); no detach."""
    n, _, h, w = pred.shape
    p = torch.softmax(soft / tau, dim=1)
    kl = (p * (torch.log_softmax(soft / tau, dim=1) - torch.log_softmax(pred / tau, dim=1))).sum()
    return tau**2 * kl / (n * h * w)


def cwd_formula(s, t, conv_weight, norm_type, divergence, tau):
    """CIRKD CriterionCWD: n, c, h, w of the student before its 1×1 conv; teacher detached."""
    n, c, h, w = s.shape
    if s.shape[1] != t.shape[1]:
        s = torch.einsum("nchw,oc->nohw", s, conv_weight)
    t = t.detach()
    if divergence == "mse":
        tau = 1.0
    if norm_type == "channel":
        norm_s = torch.softmax(s.flatten(2) / tau, dim=2)
        norm_t = torch.softmax(t.flatten(2) / tau, dim=2)
        denominator = n * c
    elif norm_type == "spatial":
        norm_s, norm_t = torch.softmax(s / tau, dim=1), torch.softmax(t / tau, dim=1)
        denominator = n * h * w
    elif norm_type == "channel_mean":
        norm_s, norm_t = (s / tau).flatten(2).mean(2), (t / tau).flatten(2).mean(2)
        denominator = n * c
    else:  # "none": the first image, no temperature
        norm_s, norm_t = s[0], t[0]
        denominator = n * h * w
    if divergence == "kl":
        loss = (norm_t * (norm_t.log() - norm_s.log())).sum()
    else:
        loss = ((norm_s - norm_t) ** 2).sum()
    return loss / denominator * tau**2


def at_map(x):
    a = (x**2).mean(1).flatten(1)
    return a / a.norm(dim=1, keepdim=True)


def at_formula(s, t):
    return ((at_map(s) - at_map(t)) ** 2).mean()


def affinity(x):
    """The L × L cosine affinity of positions, per image."""
    x = x.flatten(2)
    x = x / x.norm(dim=1, keepdim=True)
    return torch.einsum("ncl,ncm->nlm", x, x)


def structural_formula(s, t):
    s, t = F.max_pool2d(s, 2, 2, ceil_mode=True), F.max_pool2d(t, 2, 2, ceil_mode=True)
    return ((affinity(s) - affinity(t)) ** 2).mean()


def class_cosines(x, y, num_classes):
    """cos of each pixel's feature to its image's mean feature of its class; 1 for no class."""
    n, c, h, w = x.shape
    rows = torch.arange(h) * y.shape[1] // h  # nearest neighbour: floor(i · H_l / h)
    cols = torch.arange(w) * y.shape[2] // w
    y = y[:, rows][:, :, cols]
    m = torch.ones(n, h, w, dtype=x.dtype)
    for i in range(n):
        for k in range(num_classes):
            mask = y[i] == k
            if mask.any():
                centre = x[i][:, mask].mean(1)
                cos = (x[i][:, mask] * centre[:, None]).sum(0) / (x[i][:, mask].norm(dim=0) * centre.norm())
                m = m.index_put((torch.full_like(y[i][mask], i), *mask.nonzero(as_tuple=True)), cos)
    return m


def ifv_formula(s, t, y, num_classes):
    return ((class_cosines(s, y, num_classes) - class_cosines(t, y, num_classes)) ** 2).mean()


# -- values and gradients -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", PRECISIONS)
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd(dtype, tol, tau):
    inputs = [randn(2, 5, 4, 6, seed=1), randn(2, 5, 4, 6, seed=2)]
    assert_matches(cirkd.CriterionKD(temperature=tau), lambda s, t: kd_formula(s, t, tau), inputs, dtype, tol)


CWD_CASES = [pytest.param(norm, div, id=f"{norm}-{div}")
             for norm in ("channel", "spatial", "channel_mean", "none") for div in ("kl", "mse")]


@pytest.mark.parametrize("dtype,tol", PRECISIONS)
@pytest.mark.parametrize("norm_type,divergence", CWD_CASES)
@pytest.mark.parametrize("s_channels,t_channels", [pytest.param(4, 4, id="equal-widths"),
                                                   pytest.param(3, 6, id="adapter")])
def test_cwd(dtype, tol, norm_type, divergence, s_channels, t_channels):
    torch.manual_seed(0)
    module = cirkd.CriterionCWD(s_channels, t_channels, norm_type=norm_type, divergence=divergence,
                                temperature=4.0).to(dtype)
    weight = module.conv.weight.detach().double()[:, :, 0, 0]
    positive = divergence == "kl" and norm_type in ("channel_mean", "none")  # log of raw values
    s, t = randn(2, s_channels, 4, 5, seed=1), randn(2, t_channels, 4, 5, seed=2)
    if positive:
        s, t = s.abs() + 0.5, t.abs() + 0.5
        module.conv.weight.data.abs_()
        weight = weight.abs()
    assert_matches(module, lambda a, b: cwd_formula(a, b, weight, norm_type, divergence, 4.0), [s, t], dtype, tol)


def test_cwd_adapter_divides_by_the_student_width():
    # Bug 1 of issue 12: CIRKD reads c before its conv (3 here), so the sum over the 6 teacher
    # channels is divided by 3, twice channel_kl's 6.
    torch.manual_seed(0)
    module = cirkd.CriterionCWD(3, 6, "channel", "kl", 4.0)
    s, t = randn(2, 3, 4, 5, seed=1).float(), randn(2, 6, 4, 5, seed=2).float()
    import kdops
    adapted = module.conv(s)
    assert torch.allclose(module(s, t), 2.0 * kdops.channel_kl(adapted, t, 4.0), rtol=1e-6)


def test_cwd_mse_runs_at_temperature_one():
    module = cirkd.CriterionCWD(4, 4)  # CIRKD's defaults: norm_type='none', divergence='mse'
    assert module.temperature == 1.0
    assert cirkd.CriterionCWD(4, 4, "channel", "mse", 4.0).temperature == 1.0
    s, t = randn(2, 4, 3, 3, seed=1), randn(2, 4, 3, 3, seed=2)
    assert torch.allclose(module(s, t), ((s[0] - t[0]) ** 2).sum() / (2 * 9))


@pytest.mark.parametrize("dtype,tol", PRECISIONS)
def test_at(dtype, tol):
    inputs = [randn(2, 3, 5, 6, seed=1), randn(2, 7, 5, 6, seed=2)]
    assert_matches(cirkd.CriterionAT(), at_formula, inputs, dtype, tol)


@pytest.mark.parametrize("dtype,tol", PRECISIONS)
@pytest.mark.parametrize("size", [pytest.param((6, 8), id="even"), pytest.param((5, 7), id="odd-ceil")])
def test_structural_kd(dtype, tol, size):
    inputs = [randn(2, 3, *size, seed=1), randn(2, 5, *size, seed=2)]
    assert_matches(cirkd.CriterionStructuralKD(), structural_formula, inputs, dtype, tol)


@pytest.mark.parametrize("dtype,tol", PRECISIONS)
@pytest.mark.parametrize("ignore", [pytest.param(-1, id="ignore--1"), pytest.param(255, id="ignore-255")])
def test_ifv(dtype, tol, ignore):
    y = labels(2, 8, 10, 3, seed=3, ignore=ignore)
    inputs = [randn(2, 4, 4, 5, seed=1), randn(2, 6, 4, 5, seed=2), y]
    assert_matches(cirkd.CriterionIFV(3), lambda s, t, y: ifv_formula(s, t, y, 3), inputs, dtype, tol)


# -- signatures: constructed and called as CIRKD's train_kd.py does -------------------------------
def test_signatures_are_cirkds():
    assert parameter_names(cirkd.CriterionKD) == ["temperature"]
    assert defaults(cirkd.CriterionKD) == {"temperature": 1}
    assert parameter_names(cirkd.CriterionKD.forward) == ["pred", "soft"]
    assert parameter_names(cirkd.CriterionCWD) == ["s_channels", "t_channels", "norm_type", "divergence",
                                                   "temperature"]
    assert defaults(cirkd.CriterionCWD) == {"norm_type": "none", "divergence": "mse", "temperature": 1.0}
    assert parameter_names(cirkd.CriterionCWD.forward) == ["preds_S", "preds_T"]
    assert parameter_names(cirkd.CriterionAT) == [] and parameter_names(cirkd.CriterionStructuralKD) == []
    assert parameter_names(cirkd.CriterionAT.forward) == ["feat_S", "feat_T"]
    assert parameter_names(cirkd.CriterionStructuralKD.forward) == ["feat_S", "feat_T"]
    assert parameter_names(cirkd.CriterionIFV) == ["classes"]
    assert parameter_names(cirkd.CriterionIFV.forward) == ["feat_S", "feat_T", "target"]


def test_positional_and_keyword_calls_agree():
    s, t = randn(2, 4, 4, 4, seed=1).float(), randn(2, 6, 4, 4, seed=2).float()
    torch.manual_seed(0)
    by_keyword = cirkd.CriterionCWD(4, 6, norm_type="channel", divergence="kl", temperature=4.)
    torch.manual_seed(0)
    by_position = cirkd.CriterionCWD(4, 6, "channel", "kl", 4.0)
    assert torch.equal(by_keyword(preds_S=s, preds_T=t), by_position(s, t))
    kd = cirkd.CriterionKD(temperature=2.0)
    assert torch.equal(kd(pred=t, soft=t.flip(0)), cirkd.CriterionKD(2.0)(t, t.flip(0)))
    y = labels(2, 4, 4, 3, seed=4, ignore=-1)
    ifv = cirkd.CriterionIFV(3)
    assert torch.equal(ifv(feat_S=s, feat_T=t, target=y), cirkd.CriterionIFV(classes=3)(s, t, y))
    assert torch.equal(cirkd.CriterionAT()(feat_S=s, feat_T=t), cirkd.CriterionAT()(s, t))
    assert torch.equal(cirkd.CriterionStructuralKD()(feat_S=s, feat_T=t), cirkd.CriterionStructuralKD()(s, t))


def test_state_dict_is_cirkds():
    assert list(cirkd.CriterionCWD(4, 6).state_dict()) == ["conv.weight"]


# -- fused backends -------------------------------------------------------------------------------
def _with_backend(module):
    def make(backend):
        module.backend = backend
        return module
    return make


@pytest.mark.parametrize("make,inputs", [
    pytest.param(lambda: cirkd.CriterionKD(2.0), lambda: [randn(2, 5, 4, 6, seed=1), randn(2, 5, 4, 6, seed=2)],
                 id="kd"),
    pytest.param(lambda: cirkd.CriterionCWD(4, 4, "channel", "kl", 4.0),
                 lambda: [randn(2, 4, 4, 6, seed=1), randn(2, 4, 4, 6, seed=2)], id="cwd-channel"),
    pytest.param(lambda: cirkd.CriterionCWD(4, 4, "spatial", "kl", 4.0),
                 lambda: [randn(2, 4, 4, 6, seed=1), randn(2, 4, 4, 6, seed=2)], id="cwd-spatial"),
    pytest.param(lambda: cirkd.CriterionAT(), lambda: [randn(2, 4, 4, 6, seed=1), randn(2, 3, 4, 6, seed=2)],
                 id="at"),
    pytest.param(lambda: cirkd.CriterionStructuralKD(),
                 lambda: [randn(2, 4, 4, 6, seed=1), randn(2, 3, 4, 6, seed=2)], id="structural"),
    pytest.param(lambda: cirkd.CriterionIFV(3),
                 lambda: [randn(2, 4, 4, 6, seed=1), randn(2, 3, 4, 6, seed=2), labels(2, 4, 6, 3, seed=3)],
                 id="ifv"),
])
@pytest.mark.parametrize("device", DEVICES)
def test_fused_backends_equal_reference(make, inputs, device):
    module = make()
    assert_backends_agree(_with_backend(module), inputs(), device, [module])


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="norm_type"):
        cirkd.CriterionCWD(4, 4, norm_type="pixel")
    with pytest.raises(ValueError, match="divergence"):
        cirkd.CriterionCWD(4, 4, divergence="js")
    with pytest.raises(ValueError, match="feat_T"):
        cirkd.CriterionAT()(randn(1, 2, 4, 4, seed=1), randn(1, 2, 2, 2, seed=2))
    with pytest.raises(ValueError, match="classes"):
        cirkd.CriterionIFV(0)
    assert math.isfinite(cirkd.CriterionIFV(2)(randn(1, 2, 3, 3, seed=1), randn(1, 2, 3, 3, seed=2),
                                               torch.full((1, 3, 3), -1)).item())
