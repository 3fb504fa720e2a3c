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


def cases(device: str, dtypes: list[torch.dtype]) -> list[Case]:
    out: list[Case] = []

    def add(op, shape, dtype, make, ref, public):
        tensor_bytes = _nbytes(shape, dtype)
        # Minimal traffic of a fused loss of two same-shape inputs: forward reads both;
        # forward+backward reads both twice and writes the student's gradient once.
        out.append(Case(
            name=f"{op}[{_shape_name(shape)},{str(dtype).removeprefix('torch.')}]",
            op=op, shape=_shape_name(shape), dtype=dtype, make_inputs=make,
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
            op="attention_loss", shape=f"{_shape_name(shallow)}+{_shape_name(deep)}", dtype=dtype,
            make_inputs=_two_shapes(shallow, deep), reference=enet_sad_at_gen,
            public=lambda a, b, backend: kdops.attention_loss(a, b, backend=backend),
            bytes_fwd=sad_bytes, bytes_fwd_bwd=3 * sad_bytes, grad_inputs=2,
        ))
        at_shape = AT_SHAPES[device]
        at_bytes = _nbytes(at_shape, dtype)
        out.append(Case(
            name=f"attention_loss[at-zagoruyko {_shape_name(at_shape)},{str(dtype).removeprefix('torch.')}]",
            op="attention_loss", shape=_shape_name(at_shape), dtype=dtype, make_inputs=_pair(at_shape),
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
    return out
