"""Fuzz: channel_correlation, channel_correlation_loss and pairwise_affinity_loss on every
backend against a float64 oracle written here.

Each example draws a shape (C = 1, L = 1, odd sizes), a dtype, the layouts of student and
teacher (independently), value magnitudes (offsets up to 1e4: features far from 0), for the
losses a teacher that is the student plus 1e-3 noise (the nearly cancelling case) or an
independent one, other channel counts (pairwise) or spatial sizes (channel_correlation_loss),
``norm`` / ``detach_norm``, and whether the teacher requires grad. It checks the output and
gradients with the tolerance rule of ``tests/fuzz/_strategies.py``, that the inputs are
unchanged after forward and backward, and that a second call is bitwise identical.

The oracle forms the L × L affinities and the normalised Grams outright, in float64 — the slow
obvious way, independent of the Gram identities the kernels use.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import kdops
from tests.fuzz import _strategies as fz

NORM_EPS = 1e-12


def gram_oracle(x, norm):
    """The (N, C, C) normalised Gram of x (float64, differentiable)."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    gram = flat @ flat.transpose(1, 2)
    if norm == "row":
        return gram / gram.norm(dim=2, keepdim=True).clamp_min(NORM_EPS)
    if norm == "l":
        return gram / flat.shape[2]
    return gram


def affinity_oracle(x, detach_norm):
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    norms = flat.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    hat = flat / (norms.detach() if detach_norm else norms)
    return hat.transpose(1, 2) @ hat


def oracle(op, s, t, option, weights):
    """(output, grad_s, grad_t) of ⟨op, weights⟩ in float64, on the values the backend saw."""
    a = s.detach().double().cpu().requires_grad_(True)
    b = None if t is None else t.detach().double().cpu().requires_grad_(True)
    if op == "channel_correlation":
        out = gram_oracle(a, option)
        total = (out * weights.double()).sum()
        (grad_a,) = torch.autograd.grad(total, (a,))
        return out.detach(), grad_a, None
    if op == "channel_correlation_loss":
        out = (gram_oracle(a, option) - gram_oracle(b, option)).square().sum() / (s.shape[0] * s.shape[1])
    else:
        length = s[0, 0].numel()
        out = (affinity_oracle(a, option) - affinity_oracle(b, option)).square().sum() / (s.shape[0] * length**2)
    grad_a, grad_b = torch.autograd.grad(out * float(weights), (a, b))
    return out.detach(), grad_a, grad_b


def normalisation_condition(x, option, weights):
    """κ of channel_correlation's gradient: the row normalisation's backward subtracts
    R⟨R, Y⟩/r from Y/r (Y the incoming gradient), equal where the row's direction cannot move
    (C = 1, a rank-1 Gram): κ is the size of those terms carried through (W + Wᵀ)|X|."""
    flat = x.detach().double().cpu().reshape(x.shape[0], x.shape[1], -1)
    y = weights.double().abs()
    if option == "row":
        gram = flat @ flat.transpose(1, 2)
        r = gram.norm(dim=2, keepdim=True).clamp_min(NORM_EPS)
        rows = gram / r
        w = (y + rows.abs() * (rows * weights.double()).sum(2, keepdim=True).abs()) / r
    elif option == "l":
        w = y / flat.shape[2]
    else:
        w = y
    return ((w + w.transpose(1, 2)) @ flat.abs()).norm().item()


U32 = 2.0**-24


def f64_in_u(dtype) -> float:
    """A float64 round-off in units of the rule's u for inputs of ``dtype``."""
    return 1.0 if dtype == torch.float64 else 2.0**-53 / 2.0**-24


def gram_loss_condition(s, t, option, weights):
    """κ of channel_correlation_loss (loss, grad s, grad t).

    The kernels form ΔG = G_s − G_t as sym((X_s + X_t)(X_s − X_t)ᵀ) (equal L), each entry off by
    u·(|Σ||D|ᵀ) at most, and ΔR = ΔG/r_s − G_t (r_s − r_t)/(r_s r_t) ("row"), whose two terms
    cancel where a row's direction does not move (C = 1): κ_ΔR is the size of those terms. The
    loss Σ ΔR² then moves by 2|ΔR|·u κ_ΔR + (u κ_ΔR)²; the gradients by the weights' κ through
    (W + Wᵀ)|X| and the row normalisation's projection."""
    n, c = s.shape[:2]
    xs = s.detach().double().cpu().reshape(n, c, -1)
    xt = t.detach().double().cpu().reshape(n, c, -1)
    gs, gt = xs @ xs.transpose(1, 2), xt @ xt.transpose(1, 2)
    # A float32 product sums L terms: round-off up to ~√L·u of their magnitudes.
    sum_length = math.sqrt(max(xs.shape[2], xt.shape[2]))
    if xs.shape[2] == xt.shape[2]:
        k_dg = sum_length * ((xs + xt).abs() @ (xs - xt).abs().transpose(1, 2))
    else:
        k_dg = sum_length * (xs.abs() @ xs.abs().transpose(1, 2) + xt.abs() @ xt.abs().transpose(1, 2))
    rs = gs.norm(dim=2, keepdim=True).clamp_min(NORM_EPS)
    rt = gt.norm(dim=2, keepdim=True).clamp_min(NORM_EPS)
    if option == "row":
        rows_s, rows_t = gs / rs, gt / rt
        diff = rows_s - rows_t
        # … plus one round-off of R_s, R_t themselves (entries of size |G|/r): the row norms'
        # difference is formed without cancelling, but G_t·(r_s − r_t)/(r_s r_t) and ΔG/r_s are
        # each of the size of R where a row turns without changing length.
        k_diff = (k_dg + (gs - gt).abs() + gt.abs() * (rs - rt).abs() / rt) / rs + rows_s.abs() + rows_t.abs()
    elif option == "l":
        diff = gs / xs.shape[2] - gt / xt.shape[2]
        k_diff = k_dg / min(xs.shape[2], xt.shape[2])
    else:
        diff = gs - gt
        k_diff = k_dg
    # The oracle subtracts the two Grams in float64: its own round-off (what decides for float64
    # inputs; ~1e-9 of the float32 u otherwise).
    length_s = xs.shape[2] if option == "l" else 1.0
    length_t = xt.shape[2] if option == "l" else 1.0
    k_diff = k_diff + f64_in_u(s.dtype) * (gs.abs() / (rs if option == "row" else length_s)
                                          + gt.abs() / (rt if option == "row" else length_t))
    w = float(abs(weights))
    loss_k = (2 * diff.abs() * k_diff + U32 * k_diff.square()).sum().item() * w / (n * c)
    y, k_y = 2 * w * diff / (n * c), 2 * w * (k_diff + diff.abs()) / (n * c)

    def grad_k(x, g, r, length):
        if option == "row":
            rows = g / r
            k_w = (k_y + rows.abs() * (rows.abs() * k_y).sum(2, keepdim=True) + rows.abs() * (rows * y).sum(2, keepdim=True).abs()) / r
        elif option == "l":
            k_w = k_y / length
        else:
            k_w = k_y
        return ((k_w + k_w.transpose(1, 2)) @ x.abs()).norm().item()

    return [loss_k, grad_k(xs, gs, rs, xs.shape[2]), grad_k(xt, gt, rt, xt.shape[2])]


def affinity_condition(s, t, weights):
    """κ of pairwise_affinity_loss: Δ = A_s − A_t = sym(Σ̂ᵀD̂) from float32 operands, each entry
    off by u·(|Σ̂|ᵀ|D̂|) at most (where A_s = A_t exactly, e.g. L = 1, that is all there is);
    the loss Σ Δ²/(N·L²) moves by 2|Δ|·uκ_Δ + (uκ_Δ)², the gradients 4X̂Δ by 4|X̂|κ_Δ and the
    projection's |x̂||⟨x̂, ĝ⟩| through ÷ r."""
    n = s.shape[0]
    length = s[0, 0].numel()
    f64 = f64_in_u(s.dtype)
    # A float32 product sums C (or L) terms: round-off up to ~√K·u of their magnitudes.
    sum_length = math.sqrt(max(s.shape[1], t.shape[1], length))

    def hat(x):
        flat = x.detach().double().cpu().reshape(n, x.shape[1], -1)
        r = flat.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        return flat / r, r

    hs, rs = hat(s)
    ht, rt = hat(t)
    c = max(hs.shape[1], ht.shape[1])
    pad = lambda h: torch.nn.functional.pad(h, (0, 0, 0, c - h.shape[1]))  # noqa: E731
    sigma, diff = pad(hs) + pad(ht), pad(hs) - pad(ht)
    delta = hs.transpose(1, 2) @ hs - ht.transpose(1, 2) @ ht
    # D̂ and Σ̂ are formed in float64 (off by a float64 round-off of |x̂|), then their products in
    # float32.
    k_delta = (sum_length * (sigma.abs().transpose(1, 2) @ diff.abs()) + delta.abs()
               + f64 * sigma.abs().transpose(1, 2) @ sigma.abs())
    w = float(abs(weights))
    scale = w / (n * length * length)
    loss_k = (2 * delta.abs() * k_delta + U32 * k_delta.square()).sum().item() * scale
    k_grad_c = None
    if length > c:
        # The C × C form (L > C): ½(⟨K, E⟩ + ⟨Q, Qᵀ⟩) of float32 products, K = Σ̂Σ̂ᵀ, E = D̂D̂ᵀ,
        # Q = D̂Σ̂ᵀ, each entry off by √L·u of its magnitudes. Where D̂ is large while the
        # affinities agree (a rotated or zero-padded student) the two terms are much larger than
        # the loss; κ holds their size.
        mag_s, mag_d = sigma.abs(), diff.abs()
        k, e, q = sigma @ sigma.transpose(1, 2), diff @ diff.transpose(1, 2), diff @ sigma.transpose(1, 2)
        k_k, k_e, k_q = (sum_length * (a @ b.transpose(1, 2)) for a, b in ((mag_s, mag_s), (mag_d, mag_d), (mag_d, mag_s)))
        loss_k += 0.5 * scale * (k.abs() * k_e + e.abs() * k_k + 2 * q.abs() * k_q.transpose(1, 2)).sum().item()
        k_grad_c = (k.abs() + k_k + q.abs() + k_q) @ mag_d + (q.abs().transpose(1, 2) + k_q.transpose(1, 2) + e.abs() + k_e) @ mag_s
    # The reference backend sums the three Frobenius terms of the Gram identity in float64.
    frobenius = sum(((a @ b.transpose(1, 2)).square().sum().item())
                    for a, b in ((hs, hs), (ht, hs), (ht, hs), (ht, ht)))
    loss_k += f64 * frobenius * scale

    def grad_k(h, r):
        g = 4 * scale * (h.abs() @ (k_delta + delta.abs()))
        if k_grad_c is not None:
            g = g + scale * k_grad_c[:, : h.shape[1]]
        radial = (h.abs() * g).sum(1, keepdim=True)
        return ((g + h.abs() * radial) / r).norm().item()

    return [loss_k, grad_k(hs, rs), grad_k(ht, rt)]


def condition(op, s, t, option, weights):
    """κ of the tolerance rule for (output, grad student, grad teacher): the size of what the
    float32 products (the only float32 arithmetic of the kernels) can move each result by,
    computed from the formulas in float64. It is small relative to the result unless the
    result is itself a cancellation the math cannot avoid (an exactly 0 gradient of a row
    normalisation, equal affinities)."""
    if op == "channel_correlation":
        return [0.0, normalisation_condition(s, option, weights), 0.0]
    if op == "channel_correlation_loss":
        return gram_loss_condition(s, t, option, weights)
    return affinity_condition(s, t, weights)


def representable(grads, dtype) -> bool:
    """The exact gradients fit the input's dtype (float16 tops out at 65504)."""
    limit = torch.finfo(dtype).max
    return all(g is None or g.abs().max().item() < limit for g in grads)


@st.composite
def features(draw, backend, *, op):
    dtype = draw(fz.dtypes(backend))
    budget = 240 if backend == "triton" else (8000 if fz.deep() else 800)
    shape = draw(fz.nchw(max_numel=budget, max_channels=24 if backend == "triton" else 48))
    scale, offset = draw(fz.magnitudes())
    s = fz.random_tensor(shape, dtype, draw(fz.seeds()), scale=scale, offset=offset)
    if op == "channel_correlation":
        return dtype, s, None
    kind = draw(st.sampled_from(["independent", "near", "other-size"]))
    if kind == "near":
        noise = fz.random_tensor(shape, torch.float64, draw(fz.seeds()), scale=1e-3 * scale)
        t = (s.double() + noise).to(dtype)
    elif kind == "other-size" and op == "pairwise_affinity_loss":
        other = (shape[0], draw(st.integers(1, 24)), *shape[2:])
        t = fz.random_tensor(other, dtype, draw(fz.seeds()), scale=draw(fz.magnitudes())[0], offset=offset)
    elif kind == "other-size":
        other = (shape[0], shape[1], draw(st.integers(1, 6)), draw(st.integers(1, 6)))
        t = fz.random_tensor(other, dtype, draw(fz.seeds()), scale=scale, offset=offset)
    else:
        t = fz.random_tensor(shape, dtype, draw(fz.seeds()), scale=draw(fz.magnitudes())[0], offset=offset)
    return dtype, s, t


def layouts():
    # "expanded" changes the values (a broadcast copy) and is drawn like any other layout.
    return st.tuples(st.sampled_from(fz.LAYOUTS), st.integers(0, 3))


def laid_out(x, layout):
    name, dim = layout
    return fz.with_layout(x, name, dim=dim)


def call(op, option, backend):
    if op == "channel_correlation":
        return lambda a, b: kdops.channel_correlation(a, option, backend=backend)
    if op == "channel_correlation_loss":
        return lambda a, b: kdops.channel_correlation_loss(a, b, option, backend=backend)
    return lambda a, b: kdops.pairwise_affinity_loss(a, b, option, backend=backend)


def run(fn, s, t, teacher_grad, weights):
    s = s.detach().requires_grad_(True)
    t = None if t is None else t.detach().requires_grad_(teacher_grad)
    out = fn(s, t)
    (out * weights.to(out)).sum().backward()
    return out.detach(), s.grad, (t.grad if t is not None and teacher_grad else None)


def fuzz(op, device, backend):
    options = {"channel_correlation": ["row", "l", "none"], "channel_correlation_loss": ["row", "l", "none"],
               "pairwise_affinity_loss": [False, True]}[op]

    # CI profile: each example runs forward and backward twice plus a float64 oracle; the CPU
    # kernels' examples cost ~0.1 s, the interpreted Triton ones ~1 s.
    @fz.examples(backend, default={"reference": 20, "cpu": 25, "cuda": 40, "triton": 6}[backend])
    @given(data=st.data())
    def check(data):
        dtype, s, t = data.draw(features(backend, op=op))
        s = laid_out(s, data.draw(layouts())).to(device)
        t = None if t is None else laid_out(t, data.draw(layouts())).to(device)
        option = data.draw(st.sampled_from(options))
        teacher_grad = t is not None and data.draw(st.booleans())
        if op == "channel_correlation":
            c = s.shape[1]
            weights = fz.random_tensor((s.shape[0], c, c), torch.float32, data.draw(fz.seeds()))
        else:
            weights = torch.tensor(data.draw(st.sampled_from([1.0, 0.37, -2.5])))
        before = fz.snapshot(s, t)
        fn = call(op, option, backend)
        out, grad_s, grad_t = run(fn, s, t, teacher_grad, weights)
        fz.assert_unchanged(("student", "teacher"), (s, t), before)
        exact, exact_s, exact_t = oracle(op, s.cpu(), None if t is None else t.cpu(), option, weights)
        assume(representable((exact_s, exact_t), dtype))
        out_k, s_k, t_k = condition(op, s, t, option, weights)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        fz.assert_close("output", out, exact, tol=fz.LOSS_TOL[dtype], dtype=dtype, condition=out_k)
        assert grad_s.dtype == dtype
        fz.assert_close("grad student", grad_s, exact_s, tol=fz.GRAD_TOL[dtype], dtype=dtype, condition=s_k)
        if grad_t is not None:
            fz.assert_close("grad teacher", grad_t, exact_t, tol=fz.GRAD_TOL[dtype], dtype=dtype, condition=t_k)
        again, *grads_again = run(fn, s, t, teacher_grad, weights)
        fz.assert_bitwise_equal("output", out, again)
        for a, b in zip((grad_s, grad_t), grads_again):
            if a is not None:
                fz.assert_bitwise_equal("gradient", a, b)

    check()


@pytest.mark.parametrize("device,backend", fz.backends("channel_correlation"))
def test_channel_correlation(device, backend):
    fuzz("channel_correlation", device, backend)


@pytest.mark.parametrize("device,backend", fz.backends("channel_correlation_loss"))
def test_channel_correlation_loss(device, backend):
    fuzz("channel_correlation_loss", device, backend)


@pytest.mark.parametrize("device,backend", fz.backends("pairwise_affinity_loss"))
def test_pairwise_affinity_loss(device, backend):
    fuzz("pairwise_affinity_loss", device, backend)


# ---------------------------------------------------------------------------------------------
# bad inputs: every one raises an error that names the argument, on every backend


@st.composite
def bad_call(draw):
    """(op, args, kwargs, the argument the error must name)."""
    s = torch.randn(2, 3, 4, 5)
    kind = draw(st.sampled_from(["teacher_batch", "teacher_dtype", "student_int", "student_empty",
                                 "student_2d", "norm", "ccl_channels", "pairwise_spatial", "detach_norm"]))
    if kind == "teacher_batch":
        op = draw(st.sampled_from(["channel_correlation_loss", "pairwise_affinity_loss"]))
        return op, (s, torch.randn(1, 3, 4, 5)), {}, "teacher"
    if kind == "teacher_dtype":
        op = draw(st.sampled_from(["channel_correlation_loss", "pairwise_affinity_loss"]))
        return op, (s, s.to(draw(st.sampled_from([torch.float16, torch.float64])))), {}, "teacher"
    if kind == "student_int":
        return "pairwise_affinity_loss", (s.to(torch.int32), s), {}, "student"
    if kind == "student_empty":
        return "channel_correlation_loss", (torch.randn(2, 0, 4, 5), torch.randn(2, 0, 4, 5)), {}, "student"
    if kind == "student_2d":
        return "pairwise_affinity_loss", (s[0, 0], s[0, 0]), {}, "student"
    if kind == "norm":
        op = draw(st.sampled_from(["channel_correlation", "channel_correlation_loss"]))
        args = (s,) if op == "channel_correlation" else (s, s)
        return op, args, {"norm": draw(st.sampled_from(["L2", "ROW", None, 1]))}, "norm"
    if kind == "ccl_channels":
        return "channel_correlation_loss", (s, torch.randn(2, draw(st.integers(1, 2)), 4, 5)), {}, "teacher"
    if kind == "pairwise_spatial":
        return "pairwise_affinity_loss", (s, torch.randn(2, 3, 4, draw(st.integers(1, 4)))), {}, "teacher"
    return "pairwise_affinity_loss", (s, s), {"detach_norm": draw(st.sampled_from([1, "no", None]))}, "detach_norm"


@pytest.mark.parametrize("device,backend", fz.backends("pairwise_affinity_loss"))
def test_bad_inputs_name_the_argument(device, backend):
    @fz.examples(backend, default=40)
    @given(case=bad_call())
    def check(case):
        op, args, kwargs, argument = case
        args = [a.to(device) for a in args]
        with pytest.raises((ValueError, TypeError)) as info:
            getattr(kdops, op)(*args, **kwargs, backend=backend)
        assert argument in str(info.value), f"{op}: the error does not name {argument}: {info.value}"

    check()
