"""Recipes: the registry, composition, and every recipe training two steps."""
from __future__ import annotations

import math

import pytest
import torch

from kdops import losses
from kdops.train.distiller import Distiller
from kdops.train.recipes import Recipe, Term, UnknownRecipeError, get_recipe, recipe_names, register_recipe
from kdops.train.trainer import TrainConfig, Trainer

from tests.train import helpers

ALL = ("acfd", "apd", "at", "camd", "cwd", "ickd", "ifvd", "kd", "lgad", "lgad-upstream", "mad", "mad-upstream", "sad",
       "sad-upstream", "skd")


def test_registry_has_every_method():
    assert recipe_names() == sorted(ALL)


@pytest.mark.parametrize("spec", [
    pytest.param("nope", id="unknown"),
    pytest.param("cwd+nope", id="unknown-in-sum"),
    pytest.param("cwd+", id="empty-part"),
])
def test_unknown_recipe_names_the_choices(spec):
    with pytest.raises(UnknownRecipeError, match="choose from acfd, apd, at") if "nope" in spec else \
            pytest.raises(UnknownRecipeError, match="empty name"):
        get_recipe(spec)


def test_sum_of_recipes_holds_both_terms():
    recipe = get_recipe("cwd+kd")
    assert recipe.name == "cwd+kd"
    assert [t.name for t in recipe.terms] == ["cwd/logits", "kd/logits"]
    assert recipe.teacher == "model"
    assert get_recipe(" CWD + sad ").teacher == "model"  # self-distillation adds no teacher kind


def test_recipes_needing_different_teachers_do_not_combine():
    with pytest.raises(ValueError, match="different teachers"):
        get_recipe("lgad+cwd")


def test_a_term_cannot_appear_twice():
    with pytest.raises(ValueError, match="appear twice"):
        get_recipe("kd+kd")


def test_with_weights_replaces_one_term():
    recipe = get_recipe("cwd+kd").with_weights({"kd/logits": 0.5})
    assert [t.weight for t in recipe.terms] == [3.0, 0.5]
    with pytest.raises(ValueError, match="no term 'cwd'"):
        recipe.with_weights({"cwd": 1.0})


def test_register_recipe_rejects_composite_names_and_duplicates():
    kd = get_recipe("kd")
    with pytest.raises(ValueError, match="plain name"):
        register_recipe(Recipe("a+b", kd.terms))
    with pytest.raises(ValueError, match="already registered"):
        register_recipe(kd)


def test_term_warm_up():
    term = get_recipe("sad-upstream").terms[0]
    assert term.start == 0.5 and term.weight == 0.1
    assert not term.active(4, 10) and term.active(5, 10)


def _trainer(recipe_name: str) -> Trainer:
    recipe = get_recipe(recipe_name)
    teacher = helpers.teacher(kind=recipe.teacher) if recipe.teacher else None
    distiller = Distiller(helpers.student(), num_classes=helpers.NUM_CLASSES, recipe=recipe, teacher=teacher,
                          total_steps=2)
    data = helpers.TinySegmentation(num_samples=4)
    config = TrainConfig(steps=2, batch_size=2, progress=False, lr=0.01)
    return Trainer(distiller, data, None, config)


@pytest.mark.parametrize("name", ALL)
def test_recipe_trains_two_steps(name):
    trainer = _trainer(name)
    distiller = trainer.distiller
    teacher_before = {k: v.clone() for k, v in distiller.teacher.state_dict().items()} if distiller.teacher else {}
    student_before = [p.detach().clone() for p in distiller.student.parameters()]
    trainer.fit()

    recipe_terms = {t.name for t in distiller.terms}
    for record in trainer.history:
        logged = {k for k in record if k.split("/")[0] in {n.split("/")[0] for n in recipe_terms}}
        assert bool(logged) == bool(distiller.active_terms(record["step"])), record
        assert all(math.isfinite(v) for k, v in record.items() if k not in ("step",)), record
        assert record["total"] == pytest.approx(sum(v for k, v in record.items() if k in ("task",) or k in logged
                                                    and not k.startswith("own/")), rel=1e-5)
    # The last step's gradients: on the student and on every adapter, never on the teacher.
    assert all(p.grad is not None for p in distiller.student.parameters() if p.requires_grad)
    assert any(not torch.equal(a, b) for a, b in zip(student_before, distiller.student.parameters()))
    own = {id(p) for ps in distiller.own_parameters().values() for p in ps}
    for module in distiller.losses.values():
        for p in module.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            if id(p) not in own:
                assert p.grad.abs().sum() > 0, name
    if distiller.teacher is not None:
        assert not distiller.teacher.training
        assert all(not p.requires_grad and p.grad is None for p in distiller.teacher.parameters())
        for key, value in distiller.teacher.state_dict().items():
            assert torch.equal(value, teacher_before[key]), f"teacher {key} changed"


def test_recipes_with_adapters_build_them_for_the_channel_gap():
    # Student fusion 24, teacher fusion 48: ICKD and ACFD need an adapter, APD projects.
    # (ICKD's adapter is its Conv1×1 + BatchNorm embed.)
    for name, attribute in (("ickd", "adapter.conv2d"), ("acfd", "fusion_adapter")):
        module = next(iter(_trainer(name).distiller.losses.values()))
        assert module.get_submodule(attribute).weight.shape == (48, 24, 1, 1)
    apd = next(iter(_trainer("apd").distiller.losses.values()))
    assert isinstance(apd, losses.AdaptivePerspectiveDistillation)
    assert apd.student_projection[0].in_channels == 24 and apd.student_projection[-1].out_channels == 48


def test_apd_teacher_projection_has_its_own_optimizer():
    trainer = _trainer("apd")
    projection = next(iter(trainer.distiller.losses.values())).teacher_projection
    main = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) not in main for p in projection.parameters())
    optimizer = trainer.own_optimizers["apd"]
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 1e-5
    before = [p.detach().clone() for p in projection.parameters()]
    trainer.fit()
    assert all(not torch.equal(a, b) for a, b in zip(before, projection.parameters()))
    assert all(k.startswith("own/apd") or not k.startswith("own") for k in trainer.history[-1])
    assert "own/apd" in trainer.history[-1]


def test_term_rejects_bad_declarations():
    build = lambda c: losses.PixelKD()  # noqa: E731
    with pytest.raises(ValueError, match="as many features"):
        Term("x", build, student=("logits",), teacher=("logits", "fusion"))
    with pytest.raises(ValueError, match="start"):
        Term("x", build, student=("logits",), start=1.0)
    with pytest.raises(ValueError, match="has none"):
        Recipe("x", (Term("x", build, student=("logits",), teacher=("logits",)),), teacher=None)
