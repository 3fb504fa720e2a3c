"""The loss modules: each equals the upstream loss written out in this file (the way the
upstream repository computes it), equals the composition of kdops ops it claims, and its
adapters / projections receive gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kdops
from kdops import losses

from tests.utils import relative_error

TOL = 1e-5  # float32 module vs float64 upstream formula


def _randn(*shape, seed=0, grad=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


def _labels(n, h, w, k, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n, h, w), generator=g)
    if ignore:
        y[:, 0, 0] = 255
    return y


# -- upstream formulas, written as the upstream repositories write them ---------------------------
def cirkd_kd(s, t, tau):
    """CIRKD CriterionKD."""
    c = s.shape[1]
    s_rows = s.permute(0, 2, 3, 1).reshape(-1, c)
    t_rows = t.permute(0, 2, 3, 1).reshape(-1, c)
    return F.kl_div(F.log_softmax(s_rows / tau, 1), F.softmax(t_rows / tau, 1), reduction="batchmean") * tau**2


def mmrazor_cwd(s, t, tau):
    """mmrazor ChannelWiseDivergence (loss_weight 1)."""
    n, c, h, w = t.shape
    p_t = F.softmax(t.reshape(-1, h * w) / tau, dim=1)
    loss = torch.sum(p_t * F.log_softmax(t.reshape(-1, h * w) / tau, dim=1)
                     - p_t * F.log_softmax(s.reshape(-1, h * w) / tau, dim=1)) * tau**2
    return loss / (c * n)


def cirkd_cwd(adapted_s, t, tau, student_channels):
    """CIRKD CriterionCWD('channel', 'kl', tau): the KL summed over the adapted student's
    channels, divided by N·C_s with C_s the student's width before the 1×1 conv."""
    n, _, h, w = t.shape
    p_t = F.softmax(t.reshape(n, -1, h * w) / tau, dim=2)
    kl = p_t * (F.log_softmax(t.reshape(n, -1, h * w) / tau, dim=2)
                - F.log_softmax(adapted_s.reshape(n, -1, h * w) / tau, dim=2))
    return kl.sum() * tau**2 / (n * student_channels)


def cirkd_at(s, t):
    def at(f):
        return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))
    return (at(s) - at(t)).pow(2).mean()


def sad_at_gen(shallow, deep):
    """ENet-SAD at_gen: sum of squares, upsample the deeper map, spatial softmax, MSE."""
    a = shallow.pow(2).sum(1, keepdim=True)
    b = deep.pow(2).sum(1, keepdim=True)
    if b.shape[-2:] != a.shape[-2:]:
        b = F.interpolate(b, a.shape[-2:], mode="bilinear", align_corners=False)
    a = F.softmax(a.flatten(1), 1)
    b = F.softmax(b.flatten(1), 1)
    return F.mse_loss(a, b)


def cirkd_ifv(feat_s, feat_t, target, num_classes):
    """CIRKD CriterionIFV (centre per image and class, cosine to it, MSE)."""
    size = feat_s.shape[2:]
    tar_s = F.interpolate(target.unsqueeze(1).float(), size, mode="nearest").expand(feat_s.size())
    tar_t = F.interpolate(target.unsqueeze(1).float(), size, mode="nearest").expand(feat_t.size())
    center_s, center_t = feat_s.clone(), feat_t.clone()
    for i in range(num_classes):
        m_s, m_t = (tar_s == i).double(), (tar_t == i).double()
        mean_s = ((m_s * feat_s).sum(-1).sum(-1) / (m_s.sum(-1).sum(-1) + 1e-6))[..., None, None]
        mean_t = ((m_t * feat_t).sum(-1).sum(-1) / (m_t.sum(-1).sum(-1) + 1e-6))[..., None, None]
        center_s = (1 - m_s) * center_s + m_s * mean_s
        center_t = (1 - m_t) * center_t + m_t * mean_t
    cos_s = F.cosine_similarity(feat_s, center_s, dim=1)
    cos_t = F.cosine_similarity(feat_t, center_t, dim=1)
    return F.mse_loss(cos_s, cos_t)


def skd_pairwise(s, t, scale=None, detach_norm=True):
    """SKD sim_dis_compute (after CriterionPairWiseforWholeFeatAfterPool's max-pool); SKD
    divides by the detached norm, ``detach_norm=False`` differentiates through it."""
    if scale is not None:
        kernel = (int(s.shape[2] * scale), int(s.shape[3] * scale))
        s = F.max_pool2d(s, kernel, kernel, ceil_mode=True)
        t = F.max_pool2d(t, kernel, kernel, ceil_mode=True)

    def sim(f):
        norm = f.pow(2).sum(1, keepdim=True).sqrt()
        f = f / ((norm.detach() if detach_norm else norm) + 1e-12)
        f = f.flatten(2)
        return torch.einsum("icm,icn->imn", f, f)

    err = (sim(t) - sim(s)) ** 2 / (t.shape[-1] * t.shape[-2]) ** 2 / t.shape[0]
    return err.sum()


def ickd_batch_loss(s, t):
    bsz, ch = s.shape[:2]
    emd_s = F.normalize(torch.bmm(s.flatten(2), s.flatten(2).transpose(1, 2)), dim=2)
    emd_t = F.normalize(torch.bmm(t.flatten(2), t.flatten(2).transpose(1, 2)), dim=2)
    diff = emd_s - emd_t
    return (diff * diff).view(bsz, -1).sum() / (ch * bsz)


def apd_upstream(pred, soft, target, num_classes, tau, s_logits, t_logits):
    """APD's CriterionKmeansInterWhole (kmeans_norm) and CriterionKD, on projected features:
    returns (pred_kl_loss, soft_loss, proto_align_loss, logit kl)."""
    batch, c, h, w = soft.shape
    raw_target = target.clone()
    target = F.interpolate(target.unsqueeze(1).double(), size=(h, w), mode="nearest").squeeze(1)
    soft, pred = F.normalize(soft, 2, 1), F.normalize(pred, 2, 1)
    centers_pred, centers_soft, classes = [], [], []
    for cls in target.unique():
        if cls == 255:
            continue
        pos = (target == cls).nonzero()
        centers_pred.append(pred[pos[:, 0], :, pos[:, 1], pos[:, 2]].mean(0, keepdim=True))
        centers_soft.append(soft[pos[:, 0], :, pos[:, 1], pos[:, 2]].mean(0, keepdim=True))
        classes.append(int(cls))
    centers_pred = F.normalize(torch.cat(centers_pred), 2, 1)
    centers_soft = F.normalize(torch.cat(centers_soft), 2, 1)
    pred_out = F.conv2d(pred, centers_pred[..., None, None]) / tau
    soft_out = F.conv2d(soft, centers_soft[..., None, None]) / tau
    one_hot = torch.zeros(len(classes), num_classes, dtype=soft.dtype)
    one_hot[torch.arange(len(classes)), torch.tensor(classes)] = 1
    sum_soft = F.conv2d(soft_out, one_hot.t()[..., None, None]) / (one_hot.t().sum(1)[None, :, None, None] + 1e-12)
    sum_soft = F.interpolate(sum_soft, raw_target.shape[-2:], mode="bilinear", align_corners=True)
    soft_loss = F.cross_entropy(sum_soft, raw_target, ignore_index=255)
    pred_kl = nn.KLDivLoss()(F.log_softmax(pred_out, 1), F.softmax(soft_out, 1))
    align = 0.5 * (1 - (centers_pred * centers_soft).sum(1)).mean()
    size = raw_target.shape[-2:]
    up_s = F.interpolate(s_logits, size, mode="bilinear", align_corners=True)
    up_t = F.interpolate(t_logits, size, mode="bilinear", align_corners=True)
    logit_kl = nn.KLDivLoss()(F.log_softmax(up_s, 1), F.softmax(up_t, 1))
    return pred_kl, soft_loss, align, logit_kl


# -- logits -------------------------------------------------------------------------------------
@pytest.mark.parametrize("tau,weight", [pytest.param(1.0, 1.0, id="tau1"), pytest.param(4.0, 3.0, id="tau4-w3")])
def test_pixel_kd_equals_cirkd(tau, weight):
    s, t = _randn(2, 5, 3, 7, seed=1), _randn(2, 5, 3, 7, seed=2)
    value = losses.PixelKD(tau=tau, loss_weight=weight)(s, t)
    assert relative_error(value, weight * cirkd_kd(s.double(), t.double(), tau)) < TOL


def test_pixel_kd_with_target_equals_op():
    s, t = _randn(2, 5, 3, 7, seed=1), _randn(2, 5, 3, 7, seed=2)
    y = _labels(2, 3, 7, 5)
    assert torch.equal(losses.PixelKD(tau=2.0)(s, t, y), kdops.pixel_kl(s, t, 2.0, y))


@pytest.mark.parametrize("tau,weight", [pytest.param(1.0, 1.0, id="tau1"), pytest.param(4.0, 3.0, id="tau4-w3")])
def test_cwd_equals_mmrazor(tau, weight):
    s, t = _randn(3, 4, 5, 7, seed=3), _randn(3, 4, 5, 7, seed=4)
    value = losses.ChannelWiseDivergence(tau=tau, loss_weight=weight)(s, t)
    assert relative_error(value, weight * mmrazor_cwd(s.double(), t.double(), tau)) < TOL


def test_cwd_adapter_maps_student_channels_and_trains():
    module = losses.ChannelWiseDivergence(tau=4.0, student_channels=6, teacher_channels=4)
    assert module.adapter.weight.shape == (4, 6, 1, 1)
    s, t = _randn(2, 6, 5, 7, seed=5, grad=True), _randn(2, 4, 5, 7, seed=6)
    t.requires_grad_(True)
    value = module(s, t)
    # CIRKD CriterionCWD divides by the student's width (6) read before its conv, not by the 4
    # channels channel_kl sums over (issue 12, bug 1).
    assert relative_error(value, cirkd_cwd(module.adapter(s).double(), t.double(), 4.0, student_channels=6)) < TOL
    value.backward()
    assert t.grad is None  # CIRKD detaches the teacher
    assert module.adapter.weight.grad is not None and module.adapter.weight.grad.abs().sum() > 0
    assert s.grad is not None
    assert losses.ChannelWiseDivergence(student_channels=4, teacher_channels=4).adapter is None


# -- attention ------------------------------------------------------------------------------------
def test_attention_transfer_equals_cirkd():
    s, t = _randn(2, 3, 5, 7, seed=7), _randn(2, 6, 5, 7, seed=8)
    value = losses.AttentionTransfer()(s, t)
    assert relative_error(value, cirkd_at(s.double(), t.double())) < TOL


def test_attention_transfer_reference_positions_scale_with_the_map_size():
    s, t = _randn(2, 3, 5, 7, seed=7), _randn(2, 6, 5, 7, seed=8)
    value = losses.AttentionTransfer(loss_weight=1e4, reference_positions=70)(s, t)
    # 5 x 7 = 35 positions: half the reference, half the weight.
    assert relative_error(value, 1e4 * 0.5 * cirkd_at(s.double(), t.double())) < TOL
    with pytest.raises(ValueError, match="reference_positions"):
        losses.AttentionTransfer(reference_positions=0)


def test_attention_transfer_sums_feature_pairs():
    pairs = [(_randn(2, 3, 5, 7, seed=i), _randn(2, 4, 5, 7, seed=10 + i)) for i in range(3)]
    value = losses.AttentionTransfer(loss_weight=500.0)([s for s, _ in pairs], [t for _, t in pairs])
    expected = 500.0 * sum(cirkd_at(s.double(), t.double()) for s, t in pairs)
    assert relative_error(value, expected) < TOL


@pytest.mark.parametrize("pairs,expected_pairs", [
    pytest.param("consecutive", [(0, 1), (1, 2), (2, 3)], id="sad"),
    pytest.param("all", [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)], id="mad"),
])
def test_self_attention_distillation_equals_at_gen(pairs, expected_pairs):
    # Stages shrinking like a backbone's (odd sizes), the deeper maps upsampled.
    stages = [_randn(2, c, h, w, seed=20 + i) for i, (c, h, w) in
              enumerate([(3, 9, 11), (5, 5, 6), (4, 5, 6), (6, 3, 3)])]
    module = losses.SelfAttentionDistillation(pairs=pairs, loss_weight=0.1)
    assert module.stage_pairs(4) == expected_pairs
    expected = 0.1 * sum(sad_at_gen(stages[i].double(), stages[j].double()) for i, j in expected_pairs)
    assert relative_error(module(stages), expected) < TOL


@pytest.mark.parametrize("detach", [pytest.param(False, id="target-trains"), pytest.param(True, id="detached")])
def test_self_attention_distillation_gradient_to_deeper_stage(detach):
    shallow, deep = _randn(2, 3, 6, 6, seed=1, grad=True), _randn(2, 4, 3, 3, seed=2, grad=True)
    losses.SelfAttentionDistillation(detach_target=detach)([shallow, deep]).backward()
    assert shallow.grad.abs().sum() > 0
    assert (deep.grad is None) == detach


def test_label_guided_attention_equals_composition():
    student = [_randn(2, 4, 8, 8, seed=1), _randn(2, 6, 4, 4, seed=2)]
    teacher = [_randn(2, 5, 4, 4, seed=3), _randn(2, 7, 2, 2, seed=4)]
    value = losses.LabelGuidedAttention()(student, teacher)
    expected = sum(sad_at_gen(s.double(), t.double()) for s, t in zip(student, teacher))
    assert relative_error(value, expected) < TOL


def test_class_attention_with_classifier_weights_equals_op():
    s, t = _randn(2, 6, 5, 7, seed=1), _randn(2, 8, 5, 7, seed=2)
    ws, wt = _randn(4, 6, 1, 1, seed=3), _randn(4, 8, 1, 1, seed=4)
    value = losses.ClassAttentionDistillation(loss_weight=2.0)(s, t, student_weight=ws, teacher_weight=wt)
    assert torch.equal(value, 2.0 * kdops.class_attention_loss(s, t, ws, wt))


def test_class_attention_with_prototypes_equals_grad_cam_of_class_means():
    s, t = _randn(2, 6, 5, 7, seed=1).relu(), _randn(2, 8, 5, 7, seed=2).relu()
    y = _labels(2, 10, 14, 3)
    value = losses.ClassAttentionDistillation(num_classes=3)(s, t, y)
    # Class weights: the mean feature of each class over the batch (labels nearest-resized).
    small = F.interpolate(y[:, None].float(), (5, 7), mode="nearest")[:, 0].long()

    def maps(x):
        x = x.double()
        w = torch.stack([x.permute(1, 0, 2, 3)[:, small == k].mean(1) for k in range(3)])
        m = torch.einsum("kc,nchw->nkhw", w, x).relu()
        return m / m.flatten(2).norm(dim=2).clamp(min=1e-12)[..., None, None]

    assert relative_error(value, (maps(s) - maps(t)).pow(2).mean()) < TOL


def test_class_attention_needs_weights_or_labels():
    s, t = _randn(1, 2, 3, 3), _randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="student_weight"):
        losses.ClassAttentionDistillation(num_classes=2)(s, t)


# -- prototypes -----------------------------------------------------------------------------------
# APD uses KLDivLoss() with its default "mean" reduction, which torch warns about.
@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
def test_apd_terms_equal_upstream():
    torch.manual_seed(0)
    k = 4
    module = losses.AdaptivePerspectiveDistillation(5, 6, k, hidden_channels=7).double()
    s, t = _randn(2, 5, 5, 7, seed=1, dtype=torch.float64), _randn(2, 6, 5, 7, seed=2, dtype=torch.float64)
    s_logits = _randn(2, k, 5, 7, seed=3, dtype=torch.float64)
    t_logits = _randn(2, k, 5, 7, seed=4, dtype=torch.float64)
    y = _labels(2, 10, 14, 3, seed=5)  # class 3 absent
    out = module(s, t, s_logits, t_logits, y)
    own = module.teacher_projection_loss(t, y)
    with torch.no_grad():
        pred_kl, soft_loss, align, logit_kl = apd_upstream(module.student_projection(s), module.teacher_projection(t),
                                                           y, k, 0.1, s_logits, t_logits)
    assert relative_error(out["observation"], 10 * pred_kl) < 1e-10
    assert relative_error(out["prototype_align"], 10 * align) < 1e-10
    assert relative_error(out["logit_kl"], 10 * logit_kl) < 1e-10
    assert relative_error(own, soft_loss) < 1e-10


def test_apd_student_projection_trains_and_teacher_projection_only_by_its_own_loss():
    module = losses.AdaptivePerspectiveDistillation(5, 6, 3, hidden_channels=4)
    s, t = _randn(2, 5, 4, 4, seed=1, grad=True), _randn(2, 6, 4, 4, seed=2)
    logits_s, logits_t = _randn(2, 3, 4, 4, seed=3, grad=True), _randn(2, 3, 4, 4, seed=4)
    y = _labels(2, 8, 8, 3)
    sum(module(s, t, logits_s, logits_t, y).values()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.student_projection.parameters())
    assert all(p.grad is None for p in module.teacher_projection.parameters())
    module.teacher_projection_loss(t, y).backward()
    assert all(p.grad is not None for p in module.teacher_projection.parameters())


def test_apd_without_present_class_is_zero():
    module = losses.AdaptivePerspectiveDistillation(3, 3, 2, hidden_channels=2)
    y = torch.full((1, 4, 4), 255)
    x = _randn(1, 3, 4, 4)
    out = module(x, x, x[:, :2], x[:, :2], y)
    assert out["observation"].item() == 0 and out["prototype_align"].item() == 0


def test_ifvd_equals_cirkd():
    s, t = _randn(2, 4, 5, 7, seed=1), _randn(2, 6, 5, 7, seed=2)
    y = _labels(2, 10, 14, 3)
    value = losses.IntraClassVariation(3, loss_weight=20.0)(s, t, y)
    assert relative_error(value, 20.0 * cirkd_ifv(s.double(), t.double(), y, 3)) < TOL


# -- correlation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [pytest.param(None, id="full-resolution"), pytest.param(0.5, id="pooled-0.5")])
@pytest.mark.parametrize("detach_norm", [pytest.param(True, id="skd-detached-norm"),
                                         pytest.param(False, id="differentiated-norm")])
def test_pairwise_affinity_equals_skd(scale, detach_norm):
    s, t = _randn(2, 3, 6, 8, seed=1, grad=True), _randn(2, 5, 6, 8, seed=2, grad=True)
    value = losses.PairwiseAffinity(loss_weight=10.0, pool_scale=scale, detach_norm=detach_norm)(s, t)
    s64, t64 = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    expected = 10.0 * skd_pairwise(s64, t64, scale, detach_norm)
    assert relative_error(value, expected) < TOL
    # issue 12, bug 2: the gradients too (SKD's detached norm changes them by ~100%)
    grads = torch.autograd.grad(value, (s, t))
    for g, e in zip(grads, torch.autograd.grad(expected, (s64, t64))):
        assert relative_error(g, e) < TOL


def test_pairwise_affinity_defaults_to_skds_detached_norm():
    assert losses.PairwiseAffinity().detach_norm is True


def ickd_embed(x, weight, eps=1e-5):
    """ICKD's Embed at initialisation (BatchNorm γ = 1, β = 0) in training mode: 1×1 conv,
    then normalised by the batch statistics over (N, H, W) (biased variance)."""
    y = torch.einsum("nchw,oc->nohw", x, weight)
    mean = y.mean(dim=(0, 2, 3), keepdim=True)
    var = (y - mean).pow(2).mean(dim=(0, 2, 3), keepdim=True)
    return (y - mean) / torch.sqrt(var + eps)


@pytest.mark.parametrize("widths", [pytest.param((5, 5), id="equal-widths"), pytest.param((5, 3), id="widths-differ")])
def test_ickd_equals_batch_loss_with_embed_and_embed_trains(widths):
    # issue 12, bug 3: ICKD embeds the student with Conv1×1 + BatchNorm always, equal widths too
    module = losses.ICKD(*widths)
    assert isinstance(module.adapter.l2norm, nn.BatchNorm2d) and module.adapter.conv2d.bias is None
    s, t = _randn(2, widths[0], 4, 6, seed=1, grad=True), _randn(2, widths[1], 4, 6, seed=3)
    value = module(s, t)
    weight = module.adapter.conv2d.weight.detach().double()[:, :, 0, 0]
    assert relative_error(value, ickd_batch_loss(ickd_embed(s.double(), weight), t.double())) < TOL
    value.backward()
    assert module.adapter.conv2d.weight.grad.abs().sum() > 0
    assert module.adapter.l2norm.weight.grad.abs().sum() > 0


def test_ickd_without_widths_has_no_embed():
    s, t = _randn(2, 5, 4, 6, seed=1), _randn(2, 5, 4, 6, seed=2)
    module = losses.ICKD()
    assert module.adapter is None
    assert relative_error(module(s, t), ickd_batch_loss(s.double(), t.double())) < TOL


def test_acfd_terms_equal_composition():
    module = losses.AdaptiveChannelFeatureDistillation((4, 6), (5, 3), tau=2.0, feature_weight=0.5,
                                                       correlation_weight=2.0, logit_weight=3.0)
    s_stage, t_stage = _randn(2, 4, 5, 7, seed=1, grad=True), _randn(2, 6, 5, 7, seed=2)
    s_fus, t_fus = _randn(2, 5, 5, 7, seed=3, grad=True), _randn(2, 3, 5, 7, seed=4)
    s_log, t_log = _randn(2, 4, 5, 7, seed=5, grad=True), _randn(2, 4, 5, 7, seed=6)
    out = module(s_stage, t_stage, s_fus, t_fus, s_log, t_log)
    with torch.no_grad():
        adapted = module.stage_adapter(s_stage).double()
        weights = F.softmax(t_stage.double().pow(2).sum(1).flatten(1), 1).view(2, 5, 7)
        feature = 0.5 * (weights * (adapted - t_stage.double()).pow(2).mean(1)).sum() / 2
        correlation = 2.0 * ickd_batch_loss(module.fusion_adapter(s_fus).double(), t_fus.double())
        channel = 3.0 * mmrazor_cwd(s_log.double(), t_log.double(), 2.0)
    assert relative_error(out["feature"], feature) < TOL
    assert relative_error(out["correlation"], correlation) < TOL
    assert relative_error(out["channel_kl"], channel) < TOL
    sum(out.values()).backward()
    for adapter in (module.stage_adapter, module.fusion_adapter):
        assert adapter.weight.grad.abs().sum() > 0


# -- arguments ------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,match", [
    pytest.param(lambda: losses.PixelKD(tau=0.0), "tau", id="kd-tau"),
    pytest.param(lambda: losses.ChannelWiseDivergence(loss_weight=-1.0), "loss_weight", id="cwd-weight"),
    pytest.param(lambda: losses.ChannelWiseDivergence(tau=float("nan")), "tau", id="cwd-nan-tau"),
    pytest.param(lambda: losses.SelfAttentionDistillation(pairs="every"), "pairs", id="sad-pairs"),
    pytest.param(lambda: losses.AttentionTransfer(p=-2), "p", id="at-p"),
    pytest.param(lambda: losses.IntraClassVariation(0), "num_classes", id="ifvd-classes"),
    pytest.param(lambda: losses.AdaptivePerspectiveDistillation(4, 4, 3, tau=0), "tau", id="apd-tau"),
    pytest.param(lambda: losses.AdaptivePerspectiveDistillation(4, 4, 3, align_weight=-1), "align_weight",
                 id="apd-weight"),
    pytest.param(lambda: losses.PairwiseAffinity(pool_scale=0), "pool_scale", id="skd-scale"),
    pytest.param(lambda: losses.ICKD(0, 0), "student_channels", id="ickd-channels"),
])
def test_bad_arguments_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_self_attention_needs_two_stages():
    with pytest.raises(ValueError, match="features"):
        losses.SelfAttentionDistillation()([_randn(1, 2, 3, 3)])


def test_paired_losses_need_as_many_features():
    with pytest.raises(ValueError, match="as many"):
        losses.LabelGuidedAttention()([_randn(1, 2, 3, 3)], [_randn(1, 2, 3, 3)] * 2)


def test_half_precision_teacher_is_cast_to_the_student_dtype():
    # Under autocast an adapter's float32 output meets a float16 teacher feature.
    module = losses.ICKD(4, 3)
    s = _randn(2, 4, 3, 3)
    t = _randn(2, 3, 3, 3).half()
    assert torch.isfinite(module(s, t))
