"""Fuzz: prototype_pool, prototype_kl and class_variation_loss on every backend against a float64
oracle written here.

Each example draws a shape (K up to 40 classes, label maps larger or smaller than the features),
a dtype, independent layouts, value magnitudes far from 0 included, label maps of any integer
dtype with any ignored fraction (all ignored included) and NaN/inf in ignored pixels, absent
classes, per-image or per-batch prototypes, which inputs require grad and a scale of the
incoming gradient. It checks outputs and gradients with the tolerance rule of
``tests/fuzz/_strategies.py``, that the inputs are unchanged, and that a second call is bitwise
identical. Bad inputs must raise errors that name the argument.

The condition κ of each quantity (in units of the round-off u, see _strategies) is the size of
what float32 round-off can move it by in the specified algorithm: a cosine x̂·P̂ is good to
u·(√C + 2) plus, for a prototype that is a mean of nearly cancelling features, u·Σ|x|/|Σx|; an
observation cos/τ is good to that over τ; the softmaxes, KL and squared differences propagate
those errors to first order and, where the exact differences vanish (s = t), to second order.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import kdops
from tests.fuzz import _strategies as fz

EPS = 1e-12
GRAD_OUTS = st.sampled_from([1.0, 0.37, -2.5])
# Examples per (op, backend) in CI's fast profile (the family's budget: ~40 s on two cores);
# KDOPS_FUZZ_EXAMPLES overrides it for the deep run.
EXAMPLES = {"reference": 15, "cpu": 40, "cuda": 60, "triton": 6}
TAUS = st.sampled_from([0.1, 0.1, 1.0, 0.05, 2.0])


# ---------------------------------------------------------------------------------------------
# float64 oracle, the slow obvious way


def nearest_rows(in_size: int, out_size: int) -> torch.Tensor:
    """F.interpolate(mode="nearest")'s source indices: floor(i · in/out) in float32, clamped."""
    scale = np.float32(in_size) / np.float32(out_size)
    index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return torch.from_numpy(np.minimum(index, in_size - 1))


def classes_at_features(labels, size, ignore_index):
    """(N, L) int64 classes of each feature pixel, -1 where ignored."""
    rows, cols = nearest_rows(labels.shape[1], size[0]), nearest_rows(labels.shape[2], size[1])
    resized = labels.long()[:, rows[:, None], cols[None, :]].reshape(labels.shape[0], -1)
    return torch.where(resized == ignore_index, -1, resized)


def normalize(x, dim):
    return x / x.norm(dim=dim, keepdim=True).clamp(min=EPS)


def pool_oracle(x, classes, num_classes, per_image, normalized=False):
    """(protos (N, K, C) or (K, C), counts, Σ|x| per prototype): explicit loops over classes."""
    n, c = x.shape[:2]
    feats = x.double().reshape(n, c, -1)
    if normalized:
        feats = normalize(feats, 1)
    sums = torch.zeros(n, num_classes, c, dtype=torch.float64)
    abs_sums = torch.zeros(n, num_classes, dtype=torch.float64)
    counts = torch.zeros(n, num_classes, dtype=torch.int64)
    for k in range(num_classes):
        mask = classes == k  # (N, L)
        counts[:, k] = mask.sum(1)
        selected = torch.where(mask[:, None, :], feats, 0.0)
        sums[:, k] = selected.sum(2)
        abs_sums[:, k] = selected.norm(dim=1).sum(1)
    if not per_image:
        sums, counts, abs_sums = sums.sum(0), counts.sum(0), abs_sums.sum(0)
    protos = sums / counts.clamp(min=1).unsqueeze(-1)
    return protos, counts, abs_sums / counts.clamp(min=1)


def cancellation(protos, abs_means):
    """Σ|x|/|Σx| per prototype (1 when nothing cancels; 0 for absent classes)."""
    return torch.where(abs_means > 0, abs_means / protos.norm(dim=-1).clamp(min=1e-300), 0.0)


def kl_oracle(s, t, s_protos, t_protos, counts, tau):
    """(loss, κ loss, per-pixel Σ_k (p + q), per-class Σ_i (p + q)) of prototype_kl, float64."""
    n = s.shape[0]
    xs = normalize(s.double().reshape(n, s.shape[1], -1), 1)
    xt = normalize(t.double().reshape(n, t.shape[1], -1), 1)
    ps, pt = normalize(s_protos.double(), -1), normalize(t_protos.double(), -1)
    present = (counts > 0).reshape(-1, counts.shape[-1], 1)  # (N or 1, K, 1)
    os_ = torch.matmul(ps, xs) / tau
    ot = torch.matmul(pt, xt) / tau
    neg = torch.tensor(-math.inf, dtype=torch.float64)
    any_present = present.any(1, keepdim=True)
    log_q = torch.where(present, torch.log_softmax(torch.where(present, os_, neg), 1), 0.0)
    log_p = torch.where(present, torch.log_softmax(torch.where(present, ot, neg), 1), 0.0)
    log_q = torch.where(any_present, log_q, 0.0)
    log_p = torch.where(any_present, log_p, 0.0)
    p = log_p.exp() * present
    q = log_q.exp() * present
    pixel_kl = (p * (log_p - log_q)).sum(1)  # (N, L)
    loss = pixel_kl.mean()
    c = max(s.shape[1], t.shape[1])
    observation_error = (math.sqrt(c) + 2) / tau  # per u
    # Sensitivity to the observations' error, plus the rounding of the log-probabilities that
    # the KL takes the difference of (each good to u·(|log| + the shifted observations)).
    first_order = ((q - p).abs() + (p * (log_p - log_q - pixel_kl[:, None])).abs()).sum(1)
    rounding = (p * (log_p.abs() + log_q.abs() + 2.0 / tau)).sum(1)
    weights = (p + q).sum(1)
    kappa = (observation_error * first_order + rounding + 1e-7 * observation_error**2 * weights).mean()
    kappa = kappa + math.sqrt(pixel_kl.numel()) * loss.abs()
    return loss, kappa, weights, (p + q).sum(-1)


def variation_oracle(s, t, classes, num_classes):
    """(loss, κ loss, per-pixel κ of the gradient's size) of class_variation_loss, float64."""
    n = s.shape[0]
    labelled = classes >= 0
    cls = classes.clamp(min=0)
    ms, bs = [], []
    for x in (s, t):
        protos, _, abs_means = pool_oracle(x, classes, num_classes, True)
        feats = normalize(x.double().reshape(n, x.shape[1], -1), 1)
        own = normalize(protos, -1).gather(1, cls[:, :, None].expand(-1, -1, x.shape[1]))  # (N, L, C)
        ms.append(torch.where(labelled, (own.transpose(1, 2) * feats).sum(1), 1.0))
        bound = math.sqrt(x.shape[1]) + 2 + cancellation(protos, abs_means)
        bs.append(torch.where(labelled, bound.gather(1, cls), 0.0))
    diff = ms[0] - ms[1]
    loss = diff.square().mean()
    cos_error = bs[0] + bs[1]  # per u
    kappa = (2 * diff.abs() * cos_error + 1e-7 * cos_error**2).mean() + math.sqrt(diff.numel()) * loss
    grad_scale = (2.0 / diff.numel()) * (diff.abs() + 1e-7 * cos_error) * cos_error  # per pixel, per u
    return loss, kappa, grad_scale


def grad_condition(pixel_scale, x, extra=0.0):
    """‖per-pixel scale / ‖x_i‖‖ over the pixels (the gradient's possible float32 error, per u)."""
    n = x.shape[0]
    norms = x.double().reshape(n, x.shape[1], -1).norm(dim=1).clamp(min=EPS)
    return (pixel_scale / norms).norm().item() + extra


# ---------------------------------------------------------------------------------------------
# draws


@st.composite
def features(draw, backend, *, pair: bool):
    """(dtype, student[, teacher]) contiguous CPU tensors of one N, H, W (C may differ)."""
    dtype = draw(fz.dtypes(backend))
    budget = 300 if backend == "triton" else (20000 if fz.deep() else 1500)
    n, c, h, w = draw(fz.nchw(max_numel=budget, max_channels=48, max_side=24))
    scale, offset = draw(st.sampled_from([(1.0, 0.0), (1.0, 0.0), (0.1, 0.0), (30.0, 0.0), (1.0, 5.0),
                                          (1e-3, 1e3)]))
    s = fz.random_tensor((n, c, h, w), dtype, draw(fz.seeds()), scale=scale, offset=offset)
    if not pair:
        return dtype, s
    ct = draw(st.integers(1, max(1, min(48, budget // (n * h * w)))))
    t = fz.random_tensor((n, ct, h, w), dtype, draw(fz.seeds()), scale=scale, offset=offset)
    return dtype, s, t


@st.composite
def label_map(draw, n, h, w):
    """(labels (N, H_l, W_l) at another resolution, K, ignore_index)."""
    num_classes = draw(st.sampled_from([1, 2, 5, 19, 40]))
    h_l = draw(st.sampled_from([h, 2 * h, max(1, h // 2), h + 3, max(1, h - 1)]))
    w_l = draw(st.sampled_from([w, 2 * w, max(1, w // 2), w + 5, max(1, w - 1)]))
    labels, ignore_index = draw(fz.label_maps((n, h_l, w_l), num_classes))
    return labels, num_classes, ignore_index


def laid_out(draw, x):
    name = draw(st.sampled_from(fz.LAYOUTS))
    assume(name != "expanded")  # expanded changes the values (and would copy NaN around)
    return fz.with_layout(x, name, dim=draw(st.integers(0, 3)))


def poison_ignored(x, classes):
    """NaN at the ignored pixels of x (they must reach nothing)."""
    ignored = (classes < 0).reshape(x.shape[0], 1, *x.shape[2:])
    return x.masked_fill(ignored, math.nan)


# ---------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("device,backend", fz.backends("prototype_pool"))
def test_prototype_pool(device, backend):
    @fz.examples(backend, EXAMPLES[backend])
    @given(data=st.data())
    def check(data):
        dtype, x = data.draw(features(backend, pair=False))
        labels, num_classes, ignore_index = data.draw(label_map(x.shape[0], *x.shape[2:]))
        per_image = data.draw(st.booleans())
        normalized = data.draw(st.booleans())
        grad_out = data.draw(GRAD_OUTS)
        classes = classes_at_features(labels, x.shape[2:], ignore_index)
        if data.draw(st.booleans()):
            x = poison_ignored(x, classes)
        x = laid_out(data.draw, x).to(device)
        labels = labels.to(device)
        before = fz.snapshot(x, labels)

        def run():
            a = x.detach().requires_grad_(True)
            protos, counts = kdops.prototype_pool(a, labels, num_classes, ignore_index, per_image,
                                                  normalized, backend=backend)
            weights = torch.linspace(-1, 1, protos.numel(), dtype=protos.dtype,
                                     device=protos.device).reshape(protos.shape)
            (grad,) = torch.autograd.grad((protos * weights).sum() * grad_out, a)
            return protos.detach(), counts, grad, weights

        protos, counts, grad, weights = run()
        fz.assert_unchanged(("x", "labels"), (x, labels), before)
        clean = torch.where(torch.isnan(x.cpu()), 0.0, x.cpu().double()).requires_grad_(True)
        exact, exact_counts, abs_means = pool_oracle(clean, classes, num_classes, per_image, normalized)
        assert protos.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert torch.equal(counts.cpu(), exact_counts)
        assert not protos[counts == 0].any(), "an absent class has a non-zero prototype"
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        # Normalised features: each unit vector is good to u·(√C + 2).
        unit_error = (math.sqrt(x.shape[1]) + 2) if normalized else 1.0
        fz.assert_close("protos", protos, exact.detach(), tol=fz.LOSS_TOL[dtype], dtype=compute,
                        condition=unit_error * abs_means.norm().item())
        (exact_grad,) = torch.autograd.grad((exact * weights.double().cpu()).sum() * grad_out, clean)
        assert grad.dtype == dtype
        n = x.shape[0]
        norms = clean.detach().reshape(n, x.shape[1], -1).norm(dim=1).clamp(min=1e-12)
        grad_condition = 0.0
        if normalized:
            # ∂x = (r − x̂(x̂·r))/‖x‖: r good to u, x̂ to u·(√C + 2).
            rows = weights.double().cpu().abs().reshape(-1, num_classes, x.shape[1]).sum(-1)
            per_count = rows / exact_counts.reshape(rows.shape).clamp(min=1)
            per_pixel = per_count.expand(n, -1).gather(1, classes.clamp(min=0)) * (classes >= 0)
            grad_condition = unit_error * abs(grad_out) * (per_pixel / norms).norm().item()
        fz.assert_close("grad x", grad, exact_grad, tol=fz.GRAD_TOL[dtype], dtype=dtype,
                        condition=grad_condition)
        assert (grad.cpu()[(classes < 0).reshape(n, 1, *x.shape[2:]).expand(x.shape)] == 0).all()
        again = run()
        for first, second in zip((protos, counts, grad), again[:3]):
            fz.assert_bitwise_equal("prototype_pool", first, second)

    check()


@pytest.mark.parametrize("device,backend", fz.backends("prototype_kl"))
def test_prototype_kl(device, backend):
    @fz.examples(backend, EXAMPLES[backend])
    @given(data=st.data())
    def check(data):
        dtype, s, t = data.draw(features(backend, pair=True))
        labels, num_classes, ignore_index = data.draw(label_map(s.shape[0], *s.shape[2:]))
        per_image = data.draw(st.booleans())
        tau = data.draw(TAUS)
        classes = classes_at_features(labels, s.shape[2:], ignore_index)
        s_protos, counts, _ = pool_oracle(s, classes, num_classes, per_image)
        t_protos, _, _ = pool_oracle(t, classes, num_classes, per_image)
        protos_dtype = data.draw(st.sampled_from([torch.float32, dtype]))
        s_protos, t_protos = s_protos.to(protos_dtype), t_protos.to(protos_dtype)
        needs = data.draw(st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()))
        assume(any(needs))
        grad_out = data.draw(GRAD_OUTS)
        s, t = laid_out(data.draw, s), laid_out(data.draw, t)
        inputs = [v.to(device) for v in (s, t, s_protos, t_protos)]
        counts = counts.to(device)
        before = fz.snapshot(*inputs, counts)

        def run():
            tensors = [v.detach().requires_grad_(need) for v, need in zip(inputs, needs)]
            loss = kdops.prototype_kl(*tensors, counts, tau, backend=backend)
            wanted = [v for v, need in zip(tensors, needs) if need]
            return loss.detach(), torch.autograd.grad(loss * grad_out, wanted)

        loss, grads = run()
        fz.assert_unchanged(("student", "teacher", "student_protos", "teacher_protos", "counts"),
                            (*inputs, counts), before)
        exact64 = [v.detach().cpu().double().requires_grad_(need) for v, need in zip(inputs, needs)]
        exact, kappa, pixel_weights, class_weights = kl_oracle(*exact64, counts.cpu(), tau)
        exact_grads = torch.autograd.grad(exact * grad_out, [v for v in exact64 if v.requires_grad])
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        fz.assert_close("loss", loss, exact, tol=fz.LOSS_TOL[dtype], dtype=compute, condition=float(kappa.detach()))
        c = max(s.shape[1], t.shape[1])
        a = (math.sqrt(c) + 2) / tau
        n_pixels = s.shape[0] * s.shape[2] * s.shape[3]
        scale = abs(grad_out) / (n_pixels * tau)
        names = ("student", "teacher", "student_protos", "teacher_protos")
        wanted = [i for i in range(4) if needs[i]]
        for i, grad, exact_grad in zip(wanted, grads, exact_grads):
            assert grad.dtype == inputs[i].dtype, names[i]
            if i < 2:
                condition = grad_condition(scale * a * pixel_weights.detach(), exact64[i].detach(),
                                           math.sqrt(c) * exact_grad.norm().item())
            else:
                protos_norm = exact64[i].detach().norm(dim=-1).clamp(min=EPS)
                condition = (scale * a * class_weights.detach() / protos_norm).norm().item()
                condition += math.sqrt(c) * exact_grad.norm().item()
            fz.assert_close(f"grad {names[i]}", grad, exact_grad, tol=fz.GRAD_TOL[inputs[i].dtype],
                            dtype=inputs[i].dtype, condition=condition)
        again_loss, again_grads = run()
        fz.assert_bitwise_equal("loss", loss, again_loss)
        for first, second in zip(grads, again_grads):
            fz.assert_bitwise_equal("gradient", first, second)

    check()


@pytest.mark.parametrize("device,backend", fz.backends("class_variation_loss"))
def test_class_variation_loss(device, backend):
    @fz.examples(backend, EXAMPLES[backend])
    @given(data=st.data())
    def check(data):
        dtype, s, t = data.draw(features(backend, pair=True))
        labels, num_classes, ignore_index = data.draw(label_map(s.shape[0], *s.shape[2:]))
        classes = classes_at_features(labels, s.shape[2:], ignore_index)
        poisoned = data.draw(st.booleans())
        if poisoned:
            s, t = poison_ignored(s, classes), poison_ignored(t, classes)
        teacher_grad = data.draw(st.booleans())
        grad_out = data.draw(GRAD_OUTS)
        s, t = laid_out(data.draw, s).to(device), laid_out(data.draw, t).to(device)
        labels = labels.to(device)
        before = fz.snapshot(s, t, labels)

        def run():
            a = s.detach().requires_grad_(True)
            b = t.detach().requires_grad_(teacher_grad)
            loss = kdops.class_variation_loss(a, b, labels, num_classes, ignore_index, backend=backend)
            grads = torch.autograd.grad(loss * grad_out, (a, b) if teacher_grad else (a,))
            return loss.detach(), grads

        loss, grads = run()
        fz.assert_unchanged(("student", "teacher", "labels"), (s, t, labels), before)
        clean = [torch.where(torch.isnan(v.cpu()), 0.0, v.cpu().double()).requires_grad_(True) for v in (s, t)]
        exact, kappa, grad_scale = variation_oracle(*clean, classes, num_classes)
        exact_grads = torch.autograd.grad(exact * grad_out, clean)
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        fz.assert_close("loss", loss, exact, tol=fz.LOSS_TOL[dtype], dtype=compute, condition=float(kappa))
        ignored = (classes < 0).reshape(s.shape[0], 1, *s.shape[2:])
        for name, x, grad, exact_grad in zip(("student", "teacher"), clean, grads, exact_grads):
            assert grad.dtype == dtype
            condition = grad_condition(abs(grad_out) * 2 * grad_scale.detach(), x.detach(),
                                       (math.sqrt(x.shape[1]) + 2) * exact_grad.norm().item())
            fz.assert_close(f"grad {name}", grad, exact_grad, tol=fz.GRAD_TOL[dtype], dtype=dtype,
                            condition=condition)
            assert (grad.cpu()[ignored.expand(grad.shape)] == 0).all(), f"{name}: gradient at ignored pixels"
        again_loss, again_grads = run()
        fz.assert_bitwise_equal("loss", loss, again_loss)
        for first, second in zip(grads, again_grads):
            fz.assert_bitwise_equal("gradient", first, second)

    check()


# ---------------------------------------------------------------------------------------------
# bad inputs: every one raises an error that names the argument, on every backend


@st.composite
def bad_call(draw):
    """(op, kwargs, the argument the error must name) for one kind of bad input."""
    x = torch.randn(2, 3, 4, 5)
    t = torch.randn(2, 2, 4, 5)
    labels = torch.randint(0, 3, (2, 6, 7))
    protos, counts = torch.randn(2, 3, 3), torch.tensor([[1, 0, 2], [3, 1, 0]])
    t_protos = torch.randn(2, 3, 2)
    kind = draw(st.sampled_from([
        "labels_range", "labels_dtype", "labels_shape", "num_classes", "ignore_index", "x_dtype",
        "teacher_shape", "protos_channels", "counts_shape", "counts_dtype", "tau",
    ]))
    pool = lambda **kw: ("prototype_pool", {"x": x, "labels": labels, "num_classes": 3} | kw)  # noqa: E731
    variation = lambda **kw: ("class_variation_loss", {"student": x, "teacher": t, "labels": labels,  # noqa: E731
                                                       "num_classes": 3} | kw)
    kl = lambda **kw: ("prototype_kl", {"student": x, "teacher": t, "student_protos": protos,  # noqa: E731
                                        "teacher_protos": t_protos, "counts": counts} | kw)
    pick = draw(st.sampled_from([pool, variation]))
    if kind == "labels_range":
        bad = labels.clone()
        bad[1, 2, 3] = draw(st.sampled_from([3, 1000, -2]))
        return (*pick(labels=bad), "labels")
    if kind == "labels_dtype":
        return (*pick(labels=labels.to(draw(st.sampled_from([torch.float32, torch.bool])))), "labels")
    if kind == "labels_shape":
        return (*pick(labels=labels[:1]), "labels")
    if kind == "num_classes":
        return (*pick(num_classes=draw(st.sampled_from([0, -1, 3.0, None]))), "num_classes")
    if kind == "ignore_index":
        return (*pick(ignore_index=draw(st.sampled_from([255.0, "255", 2**70]))), "ignore_index")
    if kind == "x_dtype":
        op, kwargs = pick()
        key = "x" if op == "prototype_pool" else "student"
        return op, kwargs | {key: x.to(torch.int32)}, key
    if kind == "teacher_shape":
        op, kwargs = draw(st.sampled_from([variation, kl]))()
        return op, kwargs | {"teacher": torch.randn(2, 2, 4, draw(st.integers(1, 4)))}, "teacher"
    if kind == "protos_channels":
        return (*kl(student_protos=protos[..., :2]), "student_protos")
    if kind == "counts_shape":
        return (*kl(counts=counts[:, :2]), "counts")
    if kind == "counts_dtype":
        return (*kl(counts=counts.float()), "counts")
    return (*kl(tau=draw(st.sampled_from([0.0, -1.0, math.inf, math.nan]))), "tau")


@pytest.mark.parametrize("device,backend", fz.backends("prototype_pool"))
def test_bad_inputs_name_the_argument(device, backend):
    @fz.examples(backend, default=EXAMPLES[backend])
    @given(call=bad_call())
    def check(call):
        op, kwargs, argument = call
        # On CUDA a label out of range is a device-side assert, which ends the CUDA context:
        # tests/ops check it in a subprocess.
        assume(not (device == "cuda" and argument == "labels" and kwargs["labels"].dtype == torch.int64
                    and kwargs["labels"].shape[0] == 2))
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        with pytest.raises((ValueError, TypeError)) as info:
            getattr(kdops, op)(**kwargs, backend=backend)
        assert argument in str(info.value), f"{op}: the error does not name {argument}: {info.value}"

    check()
