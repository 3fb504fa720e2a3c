"""The benchmark cases: every op at the shapes users train with (DESIGN.md "Benchmarks").

GPU shapes are the real ones; on CPU each is scaled down (same channels, smaller batch and
spatial size) so a run fits two cores.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

import kdops
from benchmarks.harness import Case
from kdops.reference import attention as ref_attention
from kdops.reference import correlation as ref_correlation
from kdops.reference import prototypes as ref_prototypes
from kdops.reference import softmax_kl as ref_softmax_kl

LOGIT_SHAPES = {
    "cuda": [(8, 19, 512, 1024), (16, 21, 512, 512)],
    "cpu": [(2, 19, 128, 256), (2, 21, 128, 128)],
}
FEATURE_SHAPES = {
    "cuda": [(8, 512, 64, 128), (8, 256, 128, 256)],
    "cpu": [(2, 512, 16, 32), (2, 256, 32, 64)],
}
NUM_CLASSES = 19
# APD's logit KD: logits at stride 8 resized bilinearly (align_corners=True) to the labels.
RESIZED_LOGIT_SHAPES = {
    "cuda": [((8, 19, 64, 128), (512, 1024))],
    "cpu": [((2, 19, 16, 32), (128, 256))],
}
# Attention baselines against the upstream code users run: SAD on two consecutive stages
# (shallow, deep) and AT on one student/teacher pair.
SAD_STAGE_SHAPES = {
    "cuda": ((8, 256, 128, 256), (8, 512, 64, 128)),
    "cpu": ((2, 128, 32, 64), (2, 256, 16, 32)),
}
AT_SHAPES = {"cuda": (8, 512, 64, 128), "cpu": (2, 512, 16, 32)}


def _shape_name(shape) -> str:
    return "x".join(str(v) for v in shape)


def _pair(shape, *, labels: bool = False, weights: bool = False):
    """Inputs (student, teacher[, ...]) of one shape, seeded; the student gets gradients."""

    def make(device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        s = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
        t = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
        tensors = [s, t]
        if weights:
            c = shape[1]
            tensors += [torch.randn(NUM_CLASSES, c, generator=g).to(device=device, dtype=dtype) / c**0.5,
                        torch.randn(NUM_CLASSES, c, generator=g).to(device=device, dtype=dtype) / c**0.5]
        kwargs = {}
        if labels:
            n, _, h, w = shape
            kwargs["labels"] = torch.randint(0, NUM_CLASSES, (n, h, w), generator=g).to(device)
        return tensors, kwargs

    return make


def _two_shapes(first, second):
    """Inputs of two shapes (e.g. consecutive stages), seeded."""

    def make(device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        return [torch.randn(first, generator=g).to(device=device, dtype=dtype),
                torch.randn(second, generator=g).to(device=device, dtype=dtype)], {}

    return make


def enet_sad_at_gen(shallow: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
    """ENet-SAD's ``at_gen`` loss on two consecutive stages, as its training code runs it: the
    channel sum of squares of each stage, the deeper map bilinearly upsampled to the shallower's
    size, a softmax over the positions of each, and the MSE of the two."""
    a = shallow.pow(2).sum(dim=1, keepdim=True)
    b = deep.pow(2).sum(dim=1, keepdim=True)
    b = torch.nn.functional.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=False)
    a = torch.softmax(a.view(a.size(0), -1), dim=1)
    b = torch.softmax(b.view(b.size(0), -1), dim=1)
    return torch.nn.functional.mse_loss(a, b)


def zagoruyko_at_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Attention transfer as the paper's code computes it: at(x) = the L2-normalised channel mean
    of x², flattened; loss = mean of (at(s) − at(t))²."""

    def at(x):
        return torch.nn.functional.normalize(x.pow(2).mean(1).view(x.size(0), -1))

    return (at(student) - at(teacher)).pow(2).mean()


def _nbytes(shape, dtype) -> int:
    numel = 1
    for v in shape:
        numel *= v
    return numel * torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------
# Prototypes (APD, IFVD): the upstream formulations users run, written plainly, as baselines.
# Their "eager" and "compile" rows are these functions; the kdops row is the fused ops.

APD_TAU = 0.1  # APD's kmeans_temp 10


def _segmentation_labels(shape, scale: int = 8, ignored: float = 0.1):
    """Labels at `scale`× the feature resolution (the image's), in blocks of 16 pixels as
    segments are, some ignored: read by nearest neighbour at the feature size."""

    def make(device, g):
        n, _, h, w = shape
        coarse = torch.randint(0, NUM_CLASSES, (n, (h * scale + 15) // 16, (w * scale + 15) // 16), generator=g)
        labels = coarse.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, : h * scale, : w * scale]
        labels = labels.masked_fill(torch.rand(labels.shape, generator=g) < ignored, 255)
        return labels.contiguous().to(device)

    return make


def _feature_pair_with_labels(shape, extra=None):
    def make(device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        s = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
        t = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
        labels = _segmentation_labels(shape)(device, g)
        # The labels are passed positionally, last: the harness counts them as an input (the
        # ops save them for backward, as they save the features).
        tensors = [s, t] + (extra(s, t, labels) if extra else []) + [labels]
        return tensors, {}

    return make


def upstream_ifvd_criterion_ifv(student, teacher, labels, num_classes=NUM_CLASSES):
    """IFVD's ``CriterionIFV`` as its repository (and CIRKD) computes it: a nearest-resized
    float label map, one masked mean per class written into a "centre" map (pixels of no class
    keep their own feature), cosine of each pixel to its centre, MSE between student and teacher."""
    size = student.shape[-2:]
    label_map = F.interpolate(labels.unsqueeze(1).float(), size=size, mode="nearest")
    teacher = teacher.detach()
    centre_s, centre_t = student.clone(), teacher.clone()
    for k in range(num_classes):
        mask = (label_map == k).float()
        denom = mask.sum(dim=(-2, -1)) + 1e-6
        mean_s = (mask * student).sum(dim=(-2, -1)) / denom
        mean_t = (mask * teacher).sum(dim=(-2, -1)) / denom
        centre_s = (1 - mask) * centre_s + mask * mean_s[..., None, None]
        centre_t = (1 - mask) * centre_t + mask * mean_t[..., None, None]
    cos_s = F.cosine_similarity(student, centre_s, dim=1)
    cos_t = F.cosine_similarity(teacher, centre_t, dim=1)
    return F.mse_loss(cos_s, cos_t)


def upstream_apd_observation_and_align(student, teacher, labels, tau=APD_TAU, ignore_index=255):
    """APD's ``CriterionKmeansInterWhole`` (kmeans_norm): both features L2-normalised per pixel;
    for each class present in the (nearest-resized) batch labels, its pixels gathered by
    ``nonzero`` and averaged into a batch prototype, normalised; observations = 1×1 convolution
    with the prototypes / τ; ``KLDivLoss()`` (mean over all elements) between the softmaxes;
    prototype alignment ½(1 − cos) averaged over the classes. (Upstream also forms an unused
    n×n Gram matrix of each class's raw teacher vectors; it is left out here.)"""
    teacher = teacher.detach()
    size = student.shape[-2:]
    label_map = F.interpolate(labels.unsqueeze(1).float(), size=size, mode="nearest").squeeze(1)
    student = F.normalize(student, 2, 1)
    teacher = F.normalize(teacher, 2, 1)
    centres_s, centres_t = [], []
    for k in label_map.unique():
        if k == ignore_index:
            continue
        where = (label_map == k).nonzero()
        vec_s = student[where[:, 0], :, where[:, 1], where[:, 2]]
        vec_t = teacher[where[:, 0], :, where[:, 1], where[:, 2]]
        centres_s.append(F.normalize(vec_s.mean(0, keepdim=True), 2, 1))
        centres_t.append(F.normalize(vec_t.mean(0, keepdim=True), 2, 1))
    centres_s, centres_t = torch.cat(centres_s), torch.cat(centres_t)
    obs_s = F.conv2d(student, centres_s[..., None, None]) / tau
    obs_t = F.conv2d(teacher, centres_t[..., None, None]) / tau
    with warnings.catch_warnings():  # KLDivLoss()'s default "mean", as upstream: a known warning
        warnings.simplefilter("ignore", UserWarning)
        kl = F.kl_div(F.log_softmax(obs_s, dim=1), F.softmax(obs_t.detach(), dim=1), reduction="mean")
    align = 0.5 * (1 - (centres_s * centres_t.detach()).sum(1)).mean()
    return kl + align


def kdops_apd_observation_and_align(student, teacher, labels, tau=APD_TAU, ignore_index=255, *,
                                    backend=None):
    """The same two terms from kdops ops: batch prototypes (prototype_pool of the normalised
    features, normalize_features=True), prototype_kl (its mean over N·h·w divided by the P present classes: KLDivLoss's
    mean over N·P·h·w), the alignment over the present classes."""
    teacher = teacher.detach()
    # Normalised inside the ops: prototypes of the unit features, cosines in prototype_kl.
    s_protos, counts = kdops.prototype_pool(student, labels, NUM_CLASSES, ignore_index, per_image=False,
                                            normalize_features=True, backend=backend)
    t_protos, _ = kdops.prototype_pool(teacher, labels, NUM_CLASSES, ignore_index, per_image=False,
                                       normalize_features=True, backend=backend)
    present = counts > 0
    num_present = present.sum()
    kl = kdops.prototype_kl(student, teacher, s_protos, t_protos, counts, tau, backend=backend) / num_present
    cosines = (F.normalize(s_protos, dim=1) * F.normalize(t_protos, dim=1)).sum(1)
    align = (0.5 * (1.0 - cosines) * present).sum() / num_present
    return kl + align


def _protos_of_pair(per_image: bool):
    def extra(s, t, labels):
        s_protos, counts = ref_prototypes.prototype_pool(s.float(), labels, NUM_CLASSES, 255, per_image)
        t_protos, _ = ref_prototypes.prototype_pool(t.float(), labels, NUM_CLASSES, 255, per_image)
        return [s_protos, t_protos, counts]

    return extra


def prototype_cases(device: str, dtype: torch.dtype) -> list[Case]:
    """prototype_pool, prototype_kl and class_variation_loss at the feature shapes, and the
    upstream IFVD and APD baselines (the op column names the kdops op the kdops row runs)."""
    out = []
    for shape in FEATURE_SHAPES[device]:
        name, nbytes = _shape_name(shape), _nbytes(shape, dtype)
        dtype_name = str(dtype).removeprefix("torch.")

        def case(op, label, make, reference, public, reads_fwd, moved_fwd_bwd):
            return Case(name=f"{label}[{name},{dtype_name}]", op=op,
                        shape=name if label == op else f"{name} ({label})", dtype=dtype,
                        make_inputs=make, reference=reference, public=public,
                        bytes_fwd=reads_fwd * nbytes, bytes_fwd_bwd=moved_fwd_bwd * nbytes)

        # pool (batch prototypes, reduced to a scalar so every variant ends in a loss): forward
        # reads x; backward writes its gradient.
        out.append(case(
            "prototype_pool", "prototype_pool", _feature_pair_with_labels(shape),
            lambda x, t, labels: ref_prototypes.prototype_pool(x, labels, NUM_CLASSES, 255, False)[0]
            .square().sum(),
            lambda x, t, labels, backend: kdops.prototype_pool(x, labels, NUM_CLASSES, 255, False,
                                                               backend=backend)[0].square().sum(),
            1, 2))
        # prototype_kl with fixed batch prototypes: forward reads s, t; backward reads them
        # again and writes the student's gradient.
        out.append(case(
            "prototype_kl", "prototype_kl", _feature_pair_with_labels(shape, _protos_of_pair(False)),
            lambda s, t, ps, pt, counts, labels: ref_prototypes.prototype_kl(s, t, ps, pt, counts, APD_TAU),
            lambda s, t, ps, pt, counts, labels, backend: kdops.prototype_kl(s, t, ps, pt, counts, APD_TAU,
                                                                             backend=backend),
            2, 5))
        out.append(case(
            "class_variation_loss", "upstream CriterionIFV", _feature_pair_with_labels(shape),
            lambda s, t, labels: upstream_ifvd_criterion_ifv(s, t, labels),
            lambda s, t, labels, backend: kdops.class_variation_loss(s, t, labels, NUM_CLASSES,
                                                                     backend=backend),
            2, 5))
        out.append(case(
            "prototype_kl", "upstream APD KL+align", _feature_pair_with_labels(shape),
            lambda s, t, labels: upstream_apd_observation_and_align(s, t, labels),
            lambda s, t, labels, backend: kdops_apd_observation_and_align(s, t, labels, backend=backend),
            2, 5))
    return out


# ---------------------------------------------------------------------------------------------
# Upstream formulations, written plainly in float32 PyTorch as their users run them (the math of
# the papers' code; kdops' targets are stated against these, eager and torch.compile).


def upstream_apd_logit_kd(s: torch.Tensor, t: torch.Tensor, size, temperature: float = 1.0) -> torch.Tensor:
    """APD ``CriterionKD``: both logits resized bilinearly (align_corners=True) to the labels,
    then T²·``nn.KLDivLoss()`` (mean over N·C·H·W) of log_softmax(s/T) against softmax(t/T)."""
    s = F.interpolate(s, size=size, mode="bilinear", align_corners=True)
    t = F.interpolate(t, size=size, mode="bilinear", align_corners=True)
    return F.kl_div(F.log_softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1),
                    reduction="mean") * temperature**2


def ickd_batch_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """ICKD ``batch_loss``: row-normalised channel Grams (bmm), Σ (G_s − G_t)² / (C·N)."""
    bsz, ch = f_s.shape[0], f_s.shape[1]
    f_s = f_s.view(bsz, ch, -1)
    f_t = f_t.view(bsz, ch, -1)
    gram_s = torch.nn.functional.normalize(torch.bmm(f_s, f_s.permute(0, 2, 1)), dim=2)
    gram_t = torch.nn.functional.normalize(torch.bmm(f_t, f_t.permute(0, 2, 1)), dim=2)
    diff = gram_s - gram_t
    return (diff * diff).view(bsz, -1).sum() / (ch * bsz)


def _skd_similarity(feat: torch.Tensor) -> torch.Tensor:
    feat = feat.float()
    norm = (feat.pow(2).sum(dim=1, keepdim=True)).sqrt().detach() + 1e-8
    feat = (feat / norm).reshape(feat.shape[0], feat.shape[1], -1)
    return torch.einsum("icm,icn->imn", feat, feat)


def skd_sim_dis_compute(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """SKD ``sim_dis_compute`` at full resolution: the L × L affinities of both, per-pixel norm
    detached, Σ (A_t − A_s)² / L² / N."""
    length = f_t.shape[-1] * f_t.shape[-2]
    err = (_skd_similarity(f_t) - _skd_similarity(f_s)).pow(2) / length**2 / f_t.shape[0]
    return err.sum()


def cases(device: str, dtypes: list[torch.dtype]) -> list[Case]:
    out: list[Case] = []

    def add(op, shape, dtype, make, ref, public, baseline=None):
        tensor_bytes = _nbytes(shape, dtype)
        # A case against an upstream formulation (its "eager" and "compile" variants run the
        # upstream code) says so in its name and shape column; op stays the kdops op it measures.
        shape_label = _shape_name(shape) + (f" vs {baseline}" if baseline else "")
        # Minimal traffic of a fused loss of two same-shape inputs: forward reads both;
        # forward+backward reads both twice and writes the student's gradient once.
        out.append(Case(
            name=f"{op}[{shape_label},{str(dtype).removeprefix('torch.')}]",
            op=op, shape=shape_label, dtype=dtype, make_inputs=make,
            reference=ref, public=public,
            bytes_fwd=2 * tensor_bytes, bytes_fwd_bwd=5 * tensor_bytes,
        ))

    for dtype in dtypes:
        # Upstream baselines of the attention losses ("eager"/"compile" run the upstream code).
        shallow, deep = SAD_STAGE_SHAPES[device]
        sad_bytes = _nbytes(shallow, dtype) + _nbytes(deep, dtype)
        out.append(Case(
            name=f"attention_loss[sad-at_gen {_shape_name(shallow)}+{_shape_name(deep)},"
                 f"{str(dtype).removeprefix('torch.')}]",
            op="attention_loss", shape=f"{_shape_name(shallow)}+{_shape_name(deep)} vs ENet-SAD at_gen",
            dtype=dtype,
            make_inputs=_two_shapes(shallow, deep), reference=enet_sad_at_gen,
            public=lambda a, b, backend: kdops.attention_loss(a, b, backend=backend),
            bytes_fwd=sad_bytes, bytes_fwd_bwd=3 * sad_bytes, grad_inputs=2,
        ))
        at_shape = AT_SHAPES[device]
        at_bytes = _nbytes(at_shape, dtype)
        out.append(Case(
            name=f"attention_loss[at-zagoruyko {_shape_name(at_shape)},{str(dtype).removeprefix('torch.')}]",
            op="attention_loss", shape=f"{_shape_name(at_shape)} vs AT at_loss", dtype=dtype,
            make_inputs=_pair(at_shape),
            reference=zagoruyko_at_loss,
            public=lambda s, t, backend: kdops.attention_loss(s, t, 2.0, "mean", "l2", backend=backend),
            bytes_fwd=2 * at_bytes, bytes_fwd_bwd=4 * at_bytes,
        ))
        for shape in LOGIT_SHAPES[device]:
            add("channel_kl", shape, dtype, _pair(shape),
                lambda s, t: ref_softmax_kl.channel_kl(s, t, 4.0),
                lambda s, t, backend: kdops.channel_kl(s, t, 4.0, backend=backend))
            add("pixel_kl", shape, dtype, _pair(shape),
                lambda s, t: ref_softmax_kl.pixel_kl(s, t, 1.0),
                lambda s, t, backend: kdops.pixel_kl(s, t, 1.0, backend=backend))
        for shape, size in RESIZED_LOGIT_SHAPES[device]:
            # Minimal traffic: the low-resolution logits only (the resized ones are never stored).
            out.append(Case(
                name=f"pixel_kl[apd-resized {_shape_name(shape)}->{_shape_name(size)},"
                     f"{str(dtype).removeprefix('torch.')}]",
                op="pixel_kl", shape=f"{_shape_name(shape)}→{_shape_name(size)} vs APD CriterionKD",
                dtype=dtype, make_inputs=_pair(shape),
                reference=lambda s, t, size=size: upstream_apd_logit_kd(s, t, size),
                public=lambda s, t, backend, size=size: kdops.pixel_kl(
                    s, t, 1.0, size=size, align_corners=True, backend=backend) / s.shape[1],
                bytes_fwd=2 * _nbytes(shape, dtype), bytes_fwd_bwd=5 * _nbytes(shape, dtype),
            ))
        for shape in FEATURE_SHAPES[device]:
            add("attention_loss", shape, dtype, _pair(shape),
                lambda s, t: ref_attention.attention_loss(s, t, 2.0, "sum", "softmax", None),
                lambda s, t, backend: kdops.attention_loss(s, t, backend=backend))
            add("class_attention_loss", shape, dtype, _pair(shape, weights=True),
                lambda s, t, ws, wt: ref_attention.class_attention_loss(s, t, ws, wt, None, None, "l2"),
                lambda s, t, ws, wt, backend: kdops.class_attention_loss(s, t, ws, wt, backend=backend))
            add("class_variation_loss", shape, dtype, _feature_pair_with_labels(shape),
                lambda s, t, labels: ref_prototypes.class_variation_loss(s, t, labels, NUM_CLASSES, 255),
                lambda s, t, labels, backend: kdops.class_variation_loss(
                    s, t, labels, NUM_CLASSES, backend=backend))
            add("channel_correlation_loss", shape, dtype, _pair(shape),
                lambda s, t: ref_correlation.channel_correlation_loss(s, t, "row"),
                lambda s, t, backend: kdops.channel_correlation_loss(s, t, backend=backend))
            add("pairwise_affinity_loss", shape, dtype, _pair(shape),
                lambda s, t: ref_correlation.pairwise_affinity_loss(s, t),
                lambda s, t, backend: kdops.pairwise_affinity_loss(s, t, backend=backend))
            # The upstream formulations against the matching kdops calls: "eager"/"compile" run
            # the upstream code here, not kdops' reference.
            add("channel_correlation_loss", shape, dtype, _pair(shape), ickd_batch_loss,
                lambda s, t, backend: kdops.channel_correlation_loss(s, t, "row", backend=backend),
                baseline="ICKD batch_loss")
            add("pairwise_affinity_loss", shape, dtype, _pair(shape), skd_sim_dis_compute,
                lambda s, t, backend: kdops.pairwise_affinity_loss(s, t, True, backend=backend),
                baseline="SKD sim_dis_compute")
        out += prototype_cases(device, dtype)
    return out
