"""kdops.compat.skd against SKD's losses written from their formulas
(irfanICMLL/structure_knowledge_distillation, utils/criterion.py and utils/utils.py
``sim_dis_compute``): model-output lists, values and student/teacher gradients in float32 and
float64 (SKD's detached norm included), SKD's signatures, the fused backends against the
reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdops
from kdops.compat import skd
from tests.compat.helpers import (DEVICES, PRECISIONS, assert_backends_agree, assert_matches, defaults, parameter_names,
                                  randn)


def pixel_wise_formula(s, t):
    """Σ over all N·H·W pixels of Σ_c −p_t log q_s, divided by H·W; no temperature, no detach."""
    h, w = s.shape[2:]
    return (-torch.softmax(t, dim=1) * torch.log_softmax(s, dim=1)).sum() / (h * w)


def detached_affinity(x):
    """SKD's similarity: x / ‖x‖ with the norm a constant, then the L × L Gram matrix."""
    x = x.flatten(2)
    x = x / x.norm(dim=1, keepdim=True).detach()
    return torch.einsum("icm,icn->imn", x, x)


def pair_wise_formula(s, t, scale):
    kernel = (int(t.shape[2] * scale), int(t.shape[3] * scale))
    s = F.max_pool2d(s, kernel, kernel, ceil_mode=True)
    t = F.max_pool2d(t, kernel, kernel, ceil_mode=True)
    length = t.shape[2] * t.shape[3]
    return ((detached_affinity(t) - detached_affinity(s)) ** 2).sum() / length**2 / t.shape[0]


@pytest.mark.parametrize("dtype,tol", PRECISIONS)
def test_pixel_wise(dtype, tol):
    module = skd.CriterionPixelWise()

    def dropin(s, t, aux):
        return module([s, aux], [t, aux])  # SKD passes the models' output lists; [0] is the logits

    inputs = [randn(2, 5, 3, 4, seed=1), randn(2, 5, 3, 4, seed=2), randn(2, 5, 3, 4, seed=3)]
    assert_matches(dropin, lambda s, t, aux: pixel_wise_formula(s, t), inputs, dtype, tol)


@pytest.mark.parametrize("dtype,tol", PRECISIONS)
@pytest.mark.parametrize("scale,size", [pytest.param(0.5, (8, 6), id="scale-0.5"),
                                        pytest.param(0.3, (7, 10), id="scale-0.3-ceil")])
def test_pair_wise(dtype, tol, scale, size):
    module = skd.CriterionPairWiseforWholeFeatAfterPool(scale=scale, feat_ind=-5)

    def dropin(s, t, logits):
        # SKD's student returns [x, x_dsn, ..., feature]; feat_ind=-5 picks the feature here
        return module([s, logits, logits, logits, logits], [t, logits, logits, logits, logits])

    inputs = [randn(2, 3, *size, seed=1), randn(2, 5, *size, seed=2), randn(2, 4, 2, 2, seed=3)]
    assert_matches(dropin, lambda s, t, logits: pair_wise_formula(s, t, scale), inputs, dtype, tol)


@pytest.mark.parametrize("dtype,tol", PRECISIONS)
def test_detached_norm_op_equals_formula(dtype, tol):
    inputs = [randn(2, 3, 4, 5, seed=1), randn(2, 4, 4, 5, seed=2)]
    assert_matches(lambda s, t: kdops.pairwise_affinity_loss(s, t, detach_norm=True), lambda s, t: pair_wise_formula(s, t, 0.25), inputs, dtype, tol)


def test_detached_norm_changes_the_gradient():
    # the ~100% gradient gap of issue 12, bug 2: the test above can tell the two apart
    s, t = randn(2, 3, 4, 4, seed=1).requires_grad_(), randn(2, 3, 4, 4, seed=2)
    detached = torch.autograd.grad(kdops.pairwise_affinity_loss(s, t, detach_norm=True), s)[0]
    through = torch.autograd.grad(kdops.pairwise_affinity_loss(s, t, backend="reference"), s)[0]
    assert (detached - through).norm() > 0.1 * through.norm()


def test_signatures_are_skds():
    assert parameter_names(skd.CriterionPixelWise) == ["ignore_index", "use_weight", "reduce"]
    assert defaults(skd.CriterionPixelWise) == {"ignore_index": 255, "use_weight": True, "reduce": True}
    assert parameter_names(skd.CriterionPairWiseforWholeFeatAfterPool) == ["scale", "feat_ind"]
    assert defaults(skd.CriterionPairWiseforWholeFeatAfterPool) == {}
    for cls in (skd.CriterionPixelWise, skd.CriterionPairWiseforWholeFeatAfterPool):
        assert parameter_names(cls.forward) == ["preds_S", "preds_T"]


def test_positional_and_keyword_calls_agree():
    s, t = randn(2, 3, 8, 8, seed=1).float(), randn(2, 3, 8, 8, seed=2).float()
    # SKD's train_and_eval: CriterionPairWiseforWholeFeatAfterPool(scale=args.pool_scale, feat_ind=-5)
    by_keyword = skd.CriterionPairWiseforWholeFeatAfterPool(scale=0.5, feat_ind=-1)
    by_position = skd.CriterionPairWiseforWholeFeatAfterPool(0.5, -1)
    assert torch.equal(by_keyword(preds_S=[s], preds_T=[t]), by_position([s], [t]))
    pixel = skd.CriterionPixelWise(ignore_index=255, use_weight=True, reduce=True)
    assert torch.equal(pixel(preds_S=[s], preds_T=[t]), skd.CriterionPixelWise()([s], [t]))


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="scale"):
        skd.CriterionPairWiseforWholeFeatAfterPool(0.1, 0)([randn(1, 2, 4, 4, seed=1)], [randn(1, 2, 4, 4, seed=2)])
    with pytest.raises(ValueError, match=r"preds_T\[0\]"):
        skd.CriterionPixelWise()([randn(1, 2, 4, 4, seed=1)], [randn(1, 3, 4, 4, seed=2)])
    with pytest.raises(IndexError, match="preds_S"):
        skd.CriterionPairWiseforWholeFeatAfterPool(0.5, 3)([randn(1, 2, 4, 4, seed=1)], [randn(1, 2, 4, 4, seed=2)])


@pytest.mark.parametrize("device", DEVICES)
def test_fused_backends_equal_reference(device):
    pixel = skd.CriterionPixelWise()
    pair = skd.CriterionPairWiseforWholeFeatAfterPool(0.5, 0)

    def with_backend(module):
        def make(backend):
            module.backend = backend
            return lambda s, t: module([s], [t])
        return make

    assert_backends_agree(with_backend(pixel), [randn(2, 5, 4, 6, seed=1), randn(2, 5, 4, 6, seed=2)], device)
    assert_backends_agree(with_backend(pair), [randn(2, 4, 4, 6, seed=1), randn(2, 3, 4, 6, seed=2)], device)
