"""kdops.compat.ickd against ICKD's ICKDLoss written from its formula (ADLab-AutoDrive/ICKD,
Cifar100/distiller_zoo/ICKD.py): the Conv1×1 + BatchNorm embed (always), list in / list out,
values and student/teacher gradients in float32 and float64, ICKD's construction from ``opt``,
the fused backends against the reference."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kdops.compat import ickd
from tests.compat.helpers import DEVICES, PRECISIONS, assert_backends_agree, assert_matches, parameter_names, randn


def embed_formula(x, weight, gamma, beta, eps=1e-5):
    """1×1 conv (no bias), then BatchNorm in training mode: batch statistics over (N, H, W),
    biased variance."""
    y = torch.einsum("nchw,oc->nohw", x, weight)
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    var = ((y - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (y - mean) / torch.sqrt(var + eps) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)


def batch_loss_formula(s, t):
    """Σ (Ĝ_s − Ĝ_t)² / (C·N), Ĝ the C × C Gram matrix with rows L2-normalised."""
    def gram(x):
        x = x.flatten(2)
        g = x @ x.transpose(1, 2)
        return g / g.norm(dim=2, keepdim=True)
    n, c = s.shape[:2]
    return ((gram(s) - gram(t)) ** 2).sum() / (c * n)


def make_loss(s_dim, feat_dim, dtype=torch.float32):
    torch.manual_seed(0)
    module = ickd.ICKDLoss(SimpleNamespace(s_dim=s_dim, feat_dim=feat_dim)).to(dtype)
    with torch.no_grad():  # BatchNorm's affine parameters away from their (1, 0) start
        module.embed_s.l2norm.weight.uniform_(0.5, 1.5)
        module.embed_s.l2norm.bias.uniform_(-0.5, 0.5)
    return module


@pytest.mark.parametrize("dtype,tol", PRECISIONS)
@pytest.mark.parametrize("s_dim,feat_dim", [pytest.param(4, 4, id="equal-widths"),
                                            pytest.param(3, 5, id="widths-differ")])
def test_ickd_loss(dtype, tol, s_dim, feat_dim):
    module = make_loss(s_dim, feat_dim, dtype)
    weight = module.embed_s.conv2d.weight.detach().double()[:, :, 0, 0]
    gamma = module.embed_s.l2norm.weight.detach().double()
    beta = module.embed_s.l2norm.bias.detach().double()

    def dropin(s1, t1, s2, t2):
        return torch.stack(module([s1, s2], [t1, t2]))

    def formula(s1, t1, s2, t2):
        return torch.stack([batch_loss_formula(embed_formula(s, weight, gamma, beta), t)
                            for s, t in ((s1, t1), (s2, t2))])

    inputs = [randn(3, s_dim, 4, 5, seed=1), randn(3, feat_dim, 4, 5, seed=2), randn(3, s_dim, 2, 3, seed=3),
              randn(3, feat_dim, 3, 3, seed=4)]
    assert_matches(dropin, formula, inputs, dtype, tol)


def test_list_in_list_out_and_embed_trains():
    module = make_loss(4, 6)
    out = module([randn(2, 4, 3, 3, seed=1).float()], [randn(2, 6, 3, 3, seed=2).float()])
    assert isinstance(out, list) and len(out) == 1 and out[0].dim() == 0
    out[0].backward()
    assert module.embed_s.conv2d.weight.grad.abs().sum() > 0 and module.embed_s.l2norm.weight.grad.abs().sum() > 0


def test_constructed_from_opt_as_train_student_does():
    opt = SimpleNamespace(s_dim=64, t_dim=128)
    opt.feat_dim = opt.t_dim
    module = ickd.ICKDLoss(opt)
    assert parameter_names(ickd.ICKDLoss) == ["opt"]
    assert parameter_names(ickd.ICKDLoss.forward) == ["g_s", "g_t"]
    assert sorted(module.state_dict()) == ["embed_s.conv2d.weight", "embed_s.l2norm.bias",
                                           "embed_s.l2norm.num_batches_tracked", "embed_s.l2norm.running_mean",
                                           "embed_s.l2norm.running_var", "embed_s.l2norm.weight"]
    assert module.embed_s.conv2d.bias is None and module.embed_s.conv2d.in_channels == 64
    assert ickd.Embed().conv2d.in_channels == 256 and ickd.Embed().conv2d.out_channels == 128


@pytest.mark.parametrize("device", DEVICES)
def test_fused_backends_equal_reference(device):
    module = make_loss(4, 4)
    module.eval()  # running statistics fixed: both runs see the same embed

    def make(backend):
        module.backend = backend
        return lambda s, t: module([s], [t])[0]

    assert_backends_agree(make, [randn(2, 4, 4, 6, seed=1), randn(2, 4, 3, 3, seed=2)], device, [module])
