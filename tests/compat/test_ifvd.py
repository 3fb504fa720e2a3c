"""kdops.compat.ifvd against IFVD's CriterionIFV written from its formula (YukangWang/IFVD,
utils/criterion.py): model-output lists (the feature at [2]), values and student/teacher
gradients in float32 and float64, IFVD's signature, the fused backends against the reference."""
from __future__ import annotations

import pytest
import torch

from kdops.compat import ifvd
from tests.compat.helpers import (DEVICES, PRECISIONS, assert_backends_agree, assert_matches, labels, parameter_names,
                                  randn)
from tests.compat.test_cirkd import ifv_formula


@pytest.mark.parametrize("dtype,tol", PRECISIONS)
@pytest.mark.parametrize("label_size", [pytest.param((8, 10), id="labels-2x"), pytest.param((4, 5), id="same-size")])
def test_ifv(dtype, tol, label_size):
    y = labels(2, *label_size, 4, seed=3, ignore=255)
    module = ifvd.CriterionIFV(classes=4)

    def dropin(s, t, logits, y):
        return module([logits, logits, s], [logits, logits, t], y)  # IFVD's PSPNet outputs: [x, x_dsn, feature]

    inputs = [randn(2, 4, 4, 5, seed=1), randn(2, 6, 4, 5, seed=2), randn(2, 4, 4, 5, seed=4), y]
    assert_matches(dropin, lambda s, t, logits, y: ifv_formula(s, t, y, 4), inputs, dtype, tol)


def test_signature_is_ifvds():
    assert parameter_names(ifvd.CriterionIFV) == ["classes"]
    assert parameter_names(ifvd.CriterionIFV.forward) == ["preds_S", "preds_T", "target"]
    s, t = [None, None, randn(1, 3, 4, 4, seed=1)], [None, None, randn(1, 3, 4, 4, seed=2)]
    y = labels(1, 4, 4, 2, seed=3)
    assert torch.equal(ifvd.CriterionIFV(classes=2)(preds_S=s, preds_T=t, target=y), ifvd.CriterionIFV(2)(s, t, y))


@pytest.mark.parametrize("device", DEVICES)
def test_fused_backends_equal_reference(device):
    module = ifvd.CriterionIFV(3)

    def make(backend):
        module.backend = backend
        return lambda s, t, y: module([None, None, s], [None, None, t], y)

    inputs = [randn(2, 4, 4, 6, seed=1), randn(2, 3, 4, 6, seed=2), labels(2, 4, 6, 3, seed=3)]
    assert_backends_agree(make, inputs, device)
