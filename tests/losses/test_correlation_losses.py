"""The correlation loss modules run the fused ops through the public API, with their options."""
import pytest
import torch

from kdops import losses
from kdops.reference import correlation as ref
from tests.utils import relative_error


def randn(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("detach_norm", [False, True], ids=["exact", "detach-norm"])
def test_pairwise_affinity_detach_norm(detach_norm):
    s, t = randn((2, 6, 4, 5), 0).requires_grad_(True), randn((2, 3, 4, 5), 1)
    module = losses.PairwiseAffinity(loss_weight=2.0, detach_norm=detach_norm)
    assert f"detach_norm={detach_norm}" in repr(module)
    value = module(s, t)
    (grad,) = torch.autograd.grad(value, s)
    s64 = s.detach().double().requires_grad_(True)
    expected = 2.0 * ref.pairwise_affinity_loss(s64, t.double(), detach_norm)
    (grad64,) = torch.autograd.grad(expected, s64)
    assert relative_error(value, expected) <= 1e-5
    assert relative_error(grad, grad64) <= 1e-5


def test_pairwise_affinity_defaults_to_skd_detached_norm():
    s, t = randn((1, 4, 3, 3), 4).requires_grad_(True), randn((1, 4, 3, 3), 5)
    (default,) = torch.autograd.grad(losses.PairwiseAffinity()(s, t), s)
    (detached,) = torch.autograd.grad(losses.PairwiseAffinity(detach_norm=True)(s, t), s)
    assert torch.equal(default, detached)


def test_modules_use_the_fused_ops(monkeypatch):
    # ICKD, PairwiseAffinity and ACFD's correlation term go through the public ops (and so
    # through the fused backend the dispatcher picks).
    import kdops

    calls = []
    for name in ("channel_correlation_loss", "pairwise_affinity_loss"):
        original = getattr(kdops, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(kdops, name, spy)
    s, t = randn((2, 4, 3, 5), 2), randn((2, 4, 3, 5), 3)
    losses.ICKD()(s, t)
    losses.PairwiseAffinity()(s, t)
    acfd = losses.AdaptiveChannelFeatureDistillation((4, 4), (4, 4))
    acfd(s, t, s, t, s, t)
    assert calls == ["channel_correlation_loss", "pairwise_affinity_loss", "channel_correlation_loss"]
