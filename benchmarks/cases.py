"""The benchmark cases: every op at the shapes users train with (DESIGN.md "Benchmarks").

GPU shapes are the real ones; on CPU each is scaled down (same channels, smaller batch and
spatial size) so a run fits two cores.
"""
from __future__ import annotations

import torch

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


def _nbytes(shape, dtype) -> int:
    numel = 1
    for v in shape:
        numel *= v
    return numel * torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------
# Upstream formulations, written plainly in float32 PyTorch as their users run them (the math of
# the papers' code; kdops' targets are stated against these, eager and torch.compile).


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
        for shape in LOGIT_SHAPES[device]:
            add("channel_kl", shape, dtype, _pair(shape),
                lambda s, t: ref_softmax_kl.channel_kl(s, t, 4.0),
                lambda s, t, backend: kdops.channel_kl(s, t, 4.0, backend=backend))
            add("pixel_kl", shape, dtype, _pair(shape),
                lambda s, t: ref_softmax_kl.pixel_kl(s, t, 1.0),
                lambda s, t, backend: kdops.pixel_kl(s, t, 1.0, backend=backend))
        for shape in FEATURE_SHAPES[device]:
            add("attention_loss", shape, dtype, _pair(shape),
                lambda s, t: ref_attention.attention_loss(s, t, 2.0, "sum", "softmax", None),
                lambda s, t, backend: kdops.attention_loss(s, t, backend=backend))
            add("class_attention_loss", shape, dtype, _pair(shape, weights=True),
                lambda s, t, ws, wt: ref_attention.class_attention_loss(s, t, ws, wt, None, None, "l2"),
                lambda s, t, ws, wt, backend: kdops.class_attention_loss(s, t, ws, wt, backend=backend))
            add("class_variation_loss", shape, dtype, _pair(shape, labels=True),
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
    return out
