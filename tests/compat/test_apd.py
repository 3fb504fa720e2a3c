"""kdops.compat.apd against APD's loss functions written from their formulas
(dvlab-research/APD, tool/train.py): APD's call signatures and ``args``, the three returned
terms with values and student/teacher gradients in float32 and float64 (kmeans_norm on and
off, with and without new_size), the fused backends against the reference."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdops.compat import apd
from tests.compat.helpers import (DEVICES, PRECISIONS, assert_backends_agree, assert_matches, labels, parameter_names,
                                  randn)

NUM_CLASSES = 5


def make_args(kmeans_norm=True, trans=True):
    return SimpleNamespace(classes=NUM_CLASSES, kmeans_temp=10.0, kmeans_norm=kmeans_norm, stu_trans=trans,
                           tea_trans=trans, temperature=2.0)


def projection(channels, hidden, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1))


# -- formulas -------------------------------------------------------------------------------------
def kd_formula(pred, soft, new_size, tau):
    """τ² · mean over all N·C·H·W elements of p_t (log p_t − log q_s), maps resized first."""
    if new_size:
        pred = F.interpolate(pred, new_size, mode="bilinear", align_corners=True)
        soft = F.interpolate(soft, new_size, mode="bilinear", align_corners=True)
    log_p, log_q = torch.log_softmax(soft / tau, dim=1), torch.log_softmax(pred / tau, dim=1)
    return tau**2 * (log_p.exp() * (log_p - log_q)).mean()


def kmeans_formula(pred, soft, target, args, new_size, stu, tea):
    """(pred_kl_loss, soft_loss, proto_align_loss) from APD's definitions, one class at a time."""
    pred, soft = stu(pred), tea(soft)
    n, c, h, w = soft.shape
    rows = torch.arange(h) * target.shape[1] // h  # nearest neighbour
    cols = torch.arange(w) * target.shape[2] // w
    small = target[:, rows][:, :, cols]
    if args.kmeans_norm:
        pred, soft = pred / pred.norm(dim=1, keepdim=True), soft / soft.norm(dim=1, keepdim=True)
    present = [k for k in range(args.classes) if (small == k).any()]
    pixels_s, pixels_t = pred.permute(0, 2, 3, 1), soft.permute(0, 2, 3, 1)
    centres_s = torch.stack([pixels_s[small == k].mean(0) for k in present])
    centres_t = torch.stack([pixels_t[small == k].mean(0) for k in present])
    if args.kmeans_norm:
        centres_s = centres_s / centres_s.norm(dim=1, keepdim=True)
        centres_t = centres_t / centres_t.norm(dim=1, keepdim=True)
    observed_s = torch.einsum("nchw,pc->nphw", pred, centres_s) * args.kmeans_temp
    observed_t = torch.einsum("nchw,pc->nphw", soft, centres_t).detach() * args.kmeans_temp
    log_p, log_q = torch.log_softmax(observed_t, dim=1), torch.log_softmax(observed_s, dim=1)
    pred_kl = (log_p.exp() * (log_p - log_q)).mean()
    align = (0.5 * (1 - (centres_s * centres_t.detach()).sum(1))).mean()
    # per-class scores: the cosine (dot product) to the class's centre, 0 for an absent class
    zero = torch.zeros(n, h, w, dtype=soft.dtype)
    scores = torch.stack([torch.einsum("nchw,c->nhw", soft, centres_t[present.index(k)]) if k in present else zero
                          for k in range(args.classes)], dim=1)
    if new_size:
        scores = F.interpolate(scores, new_size, mode="bilinear", align_corners=True)
        ce_target = target
    else:
        ce_target = small
    log_prob = torch.log_softmax(scores * args.kmeans_temp, dim=1)
    valid = ce_target != 255
    picked = -log_prob.gather(1, torch.where(valid, ce_target, 0).unsqueeze(1)).squeeze(1)
    soft_loss = (picked * valid).sum() / valid.sum()
    return pred_kl, soft_loss, align


# -- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", PRECISIONS)
@pytest.mark.parametrize("new_size", [pytest.param((9, 13), id="resized"), pytest.param(None, id="no-resize")])
def test_kd(dtype, tol, new_size):
    args = make_args()

    def dropin(pred, soft):
        return apd.CriterionKD(pred=pred, soft=soft, new_size=new_size, raw_pred=pred, raw_soft=soft,
                               target=None, args=args, cur_step=3, max_step=10)

    inputs = [randn(2, 5, 3, 4, seed=1), randn(2, 5, 3, 4, seed=2)]
    assert_matches(dropin, lambda p, s: kd_formula(p, s, new_size, 2.0), inputs, dtype, tol)


KMEANS_CASES = [
    pytest.param(True, True, (9, 11), id="norm-trans-resized"),
    pytest.param(True, False, None, id="norm-no-trans-no-resize"),
    pytest.param(False, True, (9, 11), id="no-norm-trans-resized"),
]


@pytest.mark.parametrize("dtype,tol", PRECISIONS)
@pytest.mark.parametrize("kmeans_norm,trans,new_size", KMEANS_CASES)
@pytest.mark.parametrize("term", [pytest.param(0, id="pred_kl"), pytest.param(1, id="soft_loss"),
                                  pytest.param(2, id="proto_align")])
def test_kmeans_inter_whole(dtype, tol, kmeans_norm, trans, new_size, term):
    args = make_args(kmeans_norm, trans)
    stu = projection(4, 6, seed=1).to(dtype) if trans else nn.Identity()
    tea = projection(4, 6, seed=2).to(dtype) if trans else nn.Identity()
    stu64, tea64 = copy.deepcopy(stu).double(), copy.deepcopy(tea).double()
    target = labels(2, 9, 11, NUM_CLASSES - 1, seed=3)  # class 4 absent: a zero score column

    def dropin(pred, soft):
        return apd.CriterionKmeansInterWhole(pred=pred, soft=soft, target=target, args=args, new_size=new_size,
                                             StuTransConv=stu, TeaTransConv=tea)[term]

    def formula(pred, soft):
        return kmeans_formula(pred, soft, target, args, new_size, stu64, tea64)[term]

    inputs = [randn(2, 4, 5, 6, seed=4), randn(2, 4, 5, 6, seed=5)]
    assert_matches(dropin, formula, inputs, dtype, tol)


def test_returns_three_terms_and_trains_the_projections_as_apd():
    args = make_args()
    stu, tea = projection(4, 6, seed=1), projection(4, 6, seed=2)
    pred, soft = randn(2, 4, 5, 6, seed=4).float(), randn(2, 4, 5, 6, seed=5).float()
    out = apd.CriterionKmeansInterWhole(pred, soft, labels(2, 9, 11, 4, seed=3), args, (9, 11), stu, tea)
    assert isinstance(out, tuple) and len(out) == 3 and all(x.dim() == 0 for x in out)
    pred_kl, soft_loss, align = out
    (pred_kl + align).backward(retain_graph=True)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stu.parameters())
    assert all(p.grad is None for p in tea.parameters())  # the student terms detach the teacher side
    soft_loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tea.parameters())


def test_no_present_class_gives_zeros():
    args = make_args(trans=False)
    target = torch.full((1, 9, 11), 255)
    target[0, 1, 1] = 1  # present at full resolution only: the nearest resize to 2 × 2 reads (0|4, 0|5)
    out = apd.CriterionKmeansInterWhole(randn(1, 4, 2, 2, seed=1), randn(1, 4, 2, 2, seed=2), target, args,
                                        (9, 11), nn.Identity(), nn.Identity())
    assert [x.item() for x in out] == [0.0, 0.0, 0.0]


def test_signatures_are_apds():
    assert parameter_names(apd.CriterionKD) == ["pred", "soft", "new_size", "raw_soft", "raw_pred", "target",
                                                "args", "cur_step", "max_step"]
    assert parameter_names(apd.CriterionKmeansInterWhole) == ["pred", "soft", "target", "args", "new_size",
                                                              "StuTransConv", "TeaTransConv"]


@pytest.mark.parametrize("device", DEVICES)
def test_fused_backends_equal_reference(device):
    args = make_args()
    stu, tea = projection(4, 6, seed=1), projection(4, 6, seed=2)

    def kmeans(backend):
        return lambda p, s, target: sum(apd.CriterionKmeansInterWhole(p, s, target, args, (9, 11), stu, tea,
                                                                      backend=backend))

    def kd(backend):
        return lambda p, s: apd.CriterionKD(p, s, (9, 11), args=args, backend=backend)

    assert_backends_agree(kmeans, [randn(2, 4, 5, 6, seed=4), randn(2, 4, 5, 6, seed=5), labels(2, 9, 11, 4, seed=3)],
                          device, [stu, tea])
    assert_backends_agree(kd, [randn(2, 5, 5, 6, seed=4), randn(2, 5, 5, 6, seed=5)], device)
