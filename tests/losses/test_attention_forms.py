"""The map-level loss forms of SAD / MAD / LGAD: ``norm`` ("softmax" as ENet-SAD, or "l2")
and ``positions`` ("mean" over the pixels as ENet-SAD's MSELoss, or "sum"), written out in
float64 here and compared with the modules; and the recipes that use each form."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdops import losses
from kdops.train.recipes import RecipeContext, get_recipe

from tests.utils import relative_error

TOL = 1e-5  # float32 module vs float64 formula


def _randn(*shape, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).requires_grad_(grad)


def _map(x: torch.Tensor, size, norm: str) -> torch.Tensor:
    """Σ_c x², bilinearly resized to ``size``, normalised over the positions: (N, H·W)."""
    a = (x.double() ** 2).sum(dim=1, keepdim=True)
    if tuple(a.shape[-2:]) != tuple(size):
        a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
    a = a.flatten(1)
    return torch.softmax(a, dim=1) if norm == "softmax" else a / a.norm(dim=1, keepdim=True)


def _pair(shallow, deep, norm, positions):
    size = shallow.shape[-2:]
    d = (_map(shallow, size, norm) - _map(deep, size, norm)) ** 2
    return d.mean() if positions == "mean" else d.sum(dim=1).mean()


FORMS = [
    pytest.param("softmax", "mean", id="softmax-mean-upstream"),
    pytest.param("softmax", "sum", id="softmax-sum"),
    pytest.param("l2", "mean", id="l2-mean"),
    pytest.param("l2", "sum", id="l2-sum"),
]
STAGES = [(3, 9, 11), (5, 5, 6), (4, 5, 6), (6, 3, 3)]


@pytest.mark.parametrize("norm,positions", FORMS)
@pytest.mark.parametrize("pairs", ["consecutive", "all"])
def test_self_attention_forms_equal_the_formula(norm, positions, pairs):
    stages = [_randn(2, c, h, w, seed=30 + i) for i, (c, h, w) in enumerate(STAGES)]
    module = losses.SelfAttentionDistillation(pairs=pairs, loss_weight=0.3, norm=norm, positions=positions)
    expected = 0.3 * sum(_pair(stages[i], stages[j], norm, positions) for i, j in module.stage_pairs(4))
    assert relative_error(module(stages), expected) < TOL


@pytest.mark.parametrize("norm,positions", FORMS)
def test_label_guided_forms_equal_the_formula(norm, positions):
    student = [_randn(2, 4, 8, 8, seed=1), _randn(2, 6, 4, 4, seed=2)]
    teacher = [_randn(2, 5, 4, 4, seed=3), _randn(2, 7, 2, 2, seed=4)]
    value = losses.LabelGuidedAttention(norm=norm, positions=positions)(student, teacher)
    expected = sum(_pair(s, t, norm, positions) for s, t in zip(student, teacher))
    assert relative_error(value, expected) < TOL


def test_l2_sum_is_two_minus_twice_the_cosine_and_keeps_its_scale_across_resolutions():
    """Summed over positions, L2 maps give 2 - 2 cos(a_i, a_j) per image: bounded by 2 and the
    same for a map and its 2x nearest upsampling, where the upstream mean shrinks ~4x."""
    shallow, deep = _randn(2, 3, 8, 8, seed=5), _randn(2, 4, 8, 8, seed=6)
    module = losses.SelfAttentionDistillation(norm="l2", positions="sum")
    a = (shallow.double() ** 2).sum(1).flatten(1)
    b = (deep.double() ** 2).sum(1).flatten(1)
    cosine = F.cosine_similarity(a, b, dim=1)
    assert relative_error(module([shallow, deep]), (2 - 2 * cosine).mean()) < TOL
    up = [F.interpolate(x, scale_factor=2, mode="nearest") for x in (shallow, deep)]
    assert relative_error(module(up), module([shallow, deep])) < TOL
    upstream = losses.SelfAttentionDistillation()
    assert upstream(up) < upstream([shallow, deep]) / 3


def test_the_upstream_softmax_saturates_on_large_features_and_l2_does_not():
    """The reason for the l2 form: with Σ_c x² in the hundreds (ERFNet's stages), the spatial
    softmax puts all the mass on one position, so the gradient reaching the features is ~0."""
    shallow = (10 * _randn(2, 16, 8, 8, seed=7)).requires_grad_(True)
    deep = (10 * _randn(2, 16, 4, 4, seed=8)).requires_grad_(True)
    softmax_map = _map(shallow.detach(), (8, 8), "softmax")
    assert (softmax_map.max(dim=1).values > 0.99).all()
    upstream = losses.SelfAttentionDistillation()([shallow, deep])
    (g_upstream,) = torch.autograd.grad(upstream, shallow)
    l2 = losses.SelfAttentionDistillation(norm="l2", positions="sum")([shallow, deep])
    (g_l2,) = torch.autograd.grad(l2, shallow)
    assert g_upstream.norm() < 1e-3 * g_l2.norm()


@pytest.mark.parametrize("make,name", [
    pytest.param(lambda: losses.SelfAttentionDistillation(norm="none"), "norm", id="sad-norm"),
    pytest.param(lambda: losses.SelfAttentionDistillation(positions="max"), "positions", id="sad-positions"),
    pytest.param(lambda: losses.LabelGuidedAttention(norm="cosine"), "norm", id="lgad-norm"),
    pytest.param(lambda: losses.LabelGuidedAttention(positions="none"), "positions", id="lgad-positions"),
])
def test_bad_forms_name_the_argument(make, name):
    with pytest.raises(ValueError, match=name):
        make()


@pytest.mark.parametrize("recipe,pairs,norm,positions", [
    pytest.param("sad-upstream", "consecutive", "softmax", "mean", id="sad-upstream"),
    pytest.param("mad-upstream", "all", "softmax", "mean", id="mad-upstream"),
    pytest.param("sad", "consecutive", "l2", "sum", id="sad"),
    pytest.param("mad", "all", "l2", "sum", id="mad"),
])
def test_self_attention_recipes_build_their_form(recipe, pairs, norm, positions):
    term = get_recipe(recipe).terms[0]
    module = term.build(RecipeContext({}, {}, 5))
    assert (module.pairs, module.norm, module.positions) == (pairs, norm, positions)


def test_upstream_recipes_keep_the_published_weight_and_warm_up():
    for name in ("sad-upstream", "mad-upstream"):
        term = get_recipe(name).terms[0]
        assert (term.weight, term.start) == (0.1, 0.5)
        assert not term.build(RecipeContext({}, {}, 5)).detach_target
    lgad = get_recipe("lgad-upstream").terms[0]
    assert (lgad.weight, lgad.start) == (0.1, 0.0)
