"""The distiller: frozen teacher, loss bookkeeping, and the checks of its arguments."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from kdops.train.distiller import Distiller, segmentation_loss
from kdops.train.recipes import get_recipe

from tests.train import helpers


def _batch(n=2):
    data = helpers.TinySegmentation(num_samples=n)
    return data.images, data.labels


def test_teacher_is_frozen_and_runs_without_autograd():
    teacher = helpers.teacher()
    calls = []
    teacher.register_forward_hook(lambda m, i, o: calls.append((torch.is_grad_enabled(), m.training)))
    distiller = Distiller(helpers.student(), num_classes=helpers.NUM_CLASSES, recipe=get_recipe("cwd"),
                          teacher=teacher)
    distiller.train()
    assert distiller.student.training and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    images, labels = _batch()
    out = distiller(images, labels)
    assert calls == [(False, False)]
    out.total.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_total_is_the_sum_of_the_logged_terms():
    distiller = Distiller(helpers.student(), num_classes=helpers.NUM_CLASSES, recipe=get_recipe("cwd+kd+acfd"),
                          teacher=helpers.teacher())
    images, labels = _batch()
    out = distiller(images, labels)
    assert set(out.terms) == {"task", "cwd/logits", "kd/logits", "acfd/feature", "acfd/correlation",
                              "acfd/channel_kl"}
    assert torch.allclose(out.total, sum(out.terms.values()))


def test_task_loss_is_cross_entropy_of_upsampled_logits_plus_aux():
    torch.manual_seed(0)
    distiller = Distiller(helpers.student(), num_classes=helpers.NUM_CLASSES)
    images, labels = _batch()
    torch.manual_seed(1)
    out = distiller(images, labels)
    torch.manual_seed(1)
    raw = distiller.student(images)
    up = F.interpolate(raw["logits"], labels.shape[-2:], mode="bilinear", align_corners=False)
    up_aux = F.interpolate(raw["aux_logits"], labels.shape[-2:], mode="bilinear", align_corners=False)
    expected = F.cross_entropy(up, labels, ignore_index=255) + 0.4 * F.cross_entropy(up_aux, labels, ignore_index=255)
    assert torch.allclose(out.total, expected)
    assert set(out.terms) == {"task"}
    assert torch.equal(segmentation_loss(up, labels, 255), F.cross_entropy(up, labels, ignore_index=255))


def test_class_weights_weight_the_cross_entropy():
    weights = [0.4, 1.0, 1.0, 2.0]
    distiller = Distiller(helpers.student(), num_classes=helpers.NUM_CLASSES, aux_weight=0.0, class_weights=weights)
    distiller.eval()  # no dropout: the two forwards agree
    images, labels = _batch()
    up = F.interpolate(distiller.student(images)["logits"], labels.shape[-2:], mode="bilinear", align_corners=False)
    expected = F.cross_entropy(up, labels, weight=torch.tensor(weights), ignore_index=255)
    assert torch.allclose(distiller(images, labels).total, expected)
    with pytest.raises(ValueError, match="class_weights must hold 4 weights"):
        Distiller(helpers.student(), num_classes=helpers.NUM_CLASSES, class_weights=[1.0, 2.0])


def test_label_teacher_reads_the_labels():
    teacher = helpers.teacher(kind="labels")
    seen = []
    teacher.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    distiller = Distiller(helpers.student(), num_classes=helpers.NUM_CLASSES, recipe=get_recipe("lgad"),
                          teacher=teacher)
    images, labels = _batch()
    distiller(images, labels)
    assert torch.equal(seen[0], labels)


def test_a_warming_up_term_is_skipped_and_the_teacher_not_run():
    calls = []
    teacher = helpers.teacher()
    teacher.register_forward_hook(lambda *a: calls.append(1))
    recipe = get_recipe("cwd")
    recipe = replace(recipe, terms=(replace(recipe.terms[0], start=0.5),))
    distiller = Distiller(helpers.student(), num_classes=helpers.NUM_CLASSES, recipe=recipe, teacher=teacher,
                          total_steps=10)
    images, labels = _batch()
    assert set(distiller(images, labels, step=4).terms) == {"task"} and not calls
    assert "cwd/logits" in distiller(images, labels, step=5).terms and calls


@pytest.mark.parametrize("make,match", [
    pytest.param(lambda: Distiller(helpers.student(), num_classes=helpers.NUM_CLASSES, recipe=get_recipe("cwd")),
                 "needs a teacher", id="no-teacher"),
    pytest.param(lambda: Distiller(helpers.student(), num_classes=helpers.NUM_CLASSES, recipe=get_recipe("cwd"),
                                   teacher=helpers.TinySegmenter(num_classes=3)),
                 "class-count mismatch: the teacher predicts 3", id="teacher-classes"),
    pytest.param(lambda: Distiller(helpers.student(), num_classes=5), "predicts 4 classes", id="student-classes"),
    pytest.param(lambda: Distiller(helpers.student(), num_classes=helpers.NUM_CLASSES, recipe=get_recipe("sad"),
                                   teacher=helpers.teacher()), "reads none", id="needless-teacher"),
    pytest.param(lambda: Distiller(helpers.student(), num_classes=helpers.NUM_CLASSES, student_input="depth"),
                 "student_input", id="bad-input"),
])
def test_bad_setups_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_a_term_reading_a_missing_feature_is_refused():
    class NoLayer4(helpers.TinySegmenter):
        def __init__(self):
            super().__init__()
            del self.feature_channels["layer4"]

    with pytest.raises(ValueError, match="reads student feature 'layer4'"):
        Distiller(NoLayer4(), num_classes=helpers.NUM_CLASSES, recipe=get_recipe("acfd"), teacher=helpers.teacher())


def test_profile_losses_reports_time_and_saved_memory():
    distiller = Distiller(helpers.student(), num_classes=helpers.NUM_CLASSES, recipe=get_recipe("cwd"),
                          teacher=helpers.teacher())
    images, labels = _batch()
    profile = distiller.profile_losses(images, labels, repeats=2)
    assert profile["ms"] > 0 and profile["saved_bytes"] > 0 and profile["peak_bytes"] is None
    assert all(p.grad is None for p in distiller.parameters())
    assert Distiller(helpers.student(), num_classes=helpers.NUM_CLASSES).profile_losses(images, labels) == {}
