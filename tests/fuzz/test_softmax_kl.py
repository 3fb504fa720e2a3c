"""Fuzz: channel_kl and pixel_kl on every backend against a float64 oracle written here.

Each example draws a shape, dtype, the layouts of student and teacher (independently), value
magnitudes far from 0 included (logits around ±1e3, 1e4), τ over [1e-6, 1e6], teacher entries
of −inf (probability 0), a target of any integer dtype with any ignored fraction and NaN in
the ignored pixels, and whether the teacher requires grad. It checks the loss and gradients
with the tolerance rule of ``tests/fuzz/_strategies.py``, that the inputs are unchanged after
forward and backward, and that a second call is bitwise identical.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import kdops
from kdops.reference import softmax_kl as ref_softmax_kl
from tests.fuzz import _strategies as fz

TAUS = st.one_of(
    st.sampled_from([1.0, 1.0, 4.0, 0.1, 1e-6, 1e6]),
    st.floats(1e-6, 1e6).filter(lambda v: 1e-6 <= v <= 1e6),
)


def oracle_rows(s: torch.Tensor, t: torch.Tensor, tau: float, input_errors=None):
    """Softmax KL of rows, exactly (float64), from the formulas of DESIGN.md.

    s, t: (R, L) float64 rows (a softmax runs along L). Returns per-row KL, ∂(Σ_r KL_r)/∂s and
    /∂t (R, L), and the condition terms of the tolerance rule: per-row κ of the KL and per-
    element κ of each gradient (what float32 round-off in the shift-safe algorithm can move).
    input_errors: None, or bounds (e_s, e_t), (R, L) each, in units of u and of the logits, on
    how far the kernels' own values of s and t may be off (resized logits: the interpolation's
    round-off); propagated to first order through the exact derivatives: the KL moves by
    Σ|∂KL/∂s|e_s + |∂KL/∂t|e_t, q and p by q(e_s + Σq·e_s)/τ and p(e_t + Σp·e_t)/τ, the gradients
    by what those moves make of them (the teacher's through |log p − log q − KL|, which can be
    ~1/τ large at a near tie).
    """
    ds = (s - s.amax(dim=1, keepdim=True)) / tau
    dt = (t - t.amax(dim=1, keepdim=True)) / tau
    log_zs = torch.logsumexp(ds, dim=1, keepdim=True)
    log_zt = torch.logsumexp(dt, dim=1, keepdim=True)
    log_q, log_p = ds - log_zs, dt - log_zt
    q, p = log_q.exp(), log_p.exp()
    present = p > 0
    difference = torch.where(present, log_p - log_q, torch.zeros_like(p))
    terms = p * difference
    kl = terms.sum(dim=1)
    grad_s = (q - p) / tau
    grad_t = p * (difference - kl[:, None]) / tau
    finite_dt = torch.where(present, dt.abs(), torch.zeros_like(dt))
    kappa = ds.abs() + finite_dt + log_zs + log_zt + 1.0
    mean_kappa = (p * kappa).sum(dim=1, keepdim=True)
    length = s.shape[1]
    kl_condition = mean_kappa.squeeze(1) + math.sqrt(length) * terms.abs().sum(dim=1)
    grad_s_condition = (q + p) * kappa / tau
    grad_t_condition = p * (kappa + (difference - kl[:, None]).abs() + mean_kappa) / tau
    if input_errors is not None:
        e_s, e_t = input_errors
        moved_kl = (grad_s.abs() * e_s + grad_t.abs() * e_t).sum(dim=1, keepdim=True)
        kl_condition = kl_condition + moved_kl.squeeze(1)
        moved_q = q * (e_s + (q * e_s).sum(dim=1, keepdim=True)) / tau
        moved_p = p * (e_t + (p * e_t).sum(dim=1, keepdim=True)) / tau
        grad_s_condition = grad_s_condition + (moved_q + moved_p) / tau
        moved_difference = (moved_q / q.clamp(min=1e-300) + moved_p / p.clamp(min=1e-300))
        grad_t_condition = grad_t_condition + (
            moved_p * (difference - kl[:, None]).abs() + p * (moved_difference + moved_kl)) / tau
    return kl, grad_s, grad_t, kl_condition, grad_s_condition, grad_t_condition


def channel_kl_oracle(s, t, tau):
    """(loss, grad_s, grad_t, loss κ, grad_s κ, grad_t κ) of channel_kl, float64."""
    n, c = s.shape[:2]
    rows = lambda x: x.double().reshape(n * c, -1)  # noqa: E731
    kl, gs, gt, kc, gsc, gtc = oracle_rows(rows(s), rows(t), tau)
    scale = tau * tau / (n * c)
    loss = kl.sum() * scale
    loss_condition = (kc.sum() + math.sqrt(n * c) * kl.abs().sum()) * scale
    shaped = lambda x: (x * scale).reshape(s.shape)  # noqa: E731
    return loss, shaped(gs), shaped(gt), loss_condition, shaped(gsc), shaped(gtc)


def pixel_kl_oracle(s, t, tau, target, ignore_index, input_errors=None):
    """(loss, grad_s, grad_t, loss κ, grad_s κ, grad_t κ) of pixel_kl, float64.

    Ignored pixels take no part: their rows are dropped before any arithmetic, so whatever they
    hold (NaN included), their gradients are exactly 0. input_errors: as for oracle_rows, each
    shaped like s.
    """
    n, c = s.shape[:2]
    pixels = lambda x: x.double().reshape(n, c, -1).transpose(1, 2).reshape(-1, c)  # noqa: E731
    valid = torch.ones(s.numel() // c, dtype=torch.bool) if target is None else (
        (target != ignore_index).reshape(n, -1).reshape(-1))
    count = int(valid.sum())
    zeros = torch.zeros(s.shape, dtype=torch.float64)
    if count == 0:
        return torch.zeros((), dtype=torch.float64), zeros, zeros.clone(), 0.0, zeros.clone(), zeros.clone()
    errors = None if input_errors is None else tuple(pixels(e)[valid] for e in input_errors)
    kl, gs, gt, kc, gsc, gtc = oracle_rows(pixels(s)[valid], pixels(t)[valid], tau, errors)
    scale = tau * tau / count
    loss = kl.sum() * scale
    loss_condition = (kc.sum() + math.sqrt(count) * kl.abs().sum()) * scale

    def shaped(rows):
        full = torch.zeros(n * (s.numel() // (n * c)), c, dtype=torch.float64)
        full[valid] = rows * scale
        return full.reshape(n, -1, c).transpose(1, 2).reshape(s.shape)

    return loss, shaped(gs), shaped(gt), loss_condition, shaped(gsc), shaped(gtc)


def anchored_spread(x, size, align_corners):
    """(N, C, H, W): per output pixel (the same over C), D = the largest finite |x_k − a_k| over its
    corners k of positive weight and the channels, plus the largest |a_k − a_k'| between them
    (a_k: corner k's pixel anchor, the reference's pixel_anchors): what the kernels' terms can be
    in magnitude, whichever corner's anchor they subtract."""
    (h, w), (out_h, out_w) = x.shape[-2:], size
    y0, y1, wy = ref_softmax_kl.bilinear_source(h, out_h, align_corners, torch.float64, x.device)
    x0, x1, wx = ref_softmax_kl.bilinear_source(w, out_w, align_corners, torch.float64, x.device)
    anchors = ref_softmax_kl.pixel_anchors(x)
    deviation = torch.zeros(x.shape[0], 1, out_h, out_w, dtype=torch.float64)
    low = torch.full_like(deviation, math.inf)
    high = torch.full_like(deviation, -math.inf)
    for rows, row_weight in ((y0, None), (y1, wy)):
        for cols, col_weight in ((x0, None), (x1, wx)):
            corner = x[:, :, rows][:, :, :, cols]
            anchor = anchors[:, :, rows][:, :, :, cols]
            read = torch.ones(out_h, out_w, dtype=torch.bool)
            if row_weight is not None:
                read = read & (row_weight > 0)[:, None]
            if col_weight is not None:
                read = read & (col_weight > 0)[None, :]
            off = torch.where(torch.isfinite(corner), (corner - anchor).abs(), torch.zeros_like(corner))
            deviation = torch.maximum(deviation, torch.where(read, off, 0).amax(dim=1, keepdim=True))
            low = torch.where(read, torch.minimum(low, anchor), low)
            high = torch.where(read, torch.maximum(high, anchor), high)
    return (deviation + (high - low)).expand(x.shape[0], x.shape[1], out_h, out_w)


def resized_pixel_kl_oracle(s, t, tau, target, ignore_index, size, align_corners):
    """pixel_kl of the logits resized to ``size`` (float64, the reference's bilinear_resize),
    with the gradients taken back through the resize (its transpose, R ≥ 0 elementwise).

    Condition: each resized logit is a two-step lerp of ≤ 4 corner values, each taken less an
    anchor (its own pixel's, the reference's; CUDA subtracts one corner's for all four), whose
    weights carry one rounding each (λ = (a mod b)/b): off by ≤ 24·u·D (anchored_spread). The
    transposed
    resize sums ≤ (2⌈H/h⌉ + 2)(2⌈W/w⌉ + 2) terms per input element: its round-off is that many u
    of Rᵀ|g|.
    """
    s, t = s.double(), t.double()
    resize = lambda x: ref_softmax_kl.bilinear_resize(x, size, align_corners)  # noqa: E731
    # The values anchored too: float64 logits of 1e4 resized raw would round at 1e-12, more than
    # a float64 kernel may be off.
    anchored = lambda x: ref_softmax_kl.bilinear_resize(x, size, align_corners, anchored=True)  # noqa: E731
    errors = (24 * anchored_spread(s, size, align_corners), 24 * anchored_spread(t, size, align_corners))
    loss, gs, gt, loss_k, gs_k, gt_k = pixel_kl_oracle(anchored(s), anchored(t), tau, target, ignore_index, errors)
    terms = math.prod(2 * math.ceil(out / inp) + 2 for out, inp in zip(size, s.shape[2:]))
    _, transpose = torch.func.vjp(resize, torch.zeros_like(s))
    back = lambda g: transpose(g)[0]  # noqa: E731
    return (loss, back(gs), back(gt), loss_k,
            back(gs_k) + terms * back(gs.abs()), back(gt_k) + terms * back(gt.abs()))


@st.composite
def logit_pair(draw, backend, *, softmax_dim):
    """Student and teacher logits (device CPU, layouts applied) and the dtype.

    softmax_dim: the dim a softmax runs over after flattening H, W ("spatial" or "channel"),
    used to keep at least one finite teacher entry per row when −inf entries are drawn.
    """
    dtype = draw(fz.dtypes(backend))
    budget = 600 if backend == "triton" else (20000 if fz.deep() else 4096)
    shape = draw(fz.nchw(max_numel=budget))
    scale, offset = draw(fz.magnitudes())
    s = fz.random_tensor(shape, dtype, draw(fz.seeds()), scale=scale, offset=offset)
    t = fz.random_tensor(shape, dtype, draw(fz.seeds()), scale=draw(fz.magnitudes())[0], offset=offset)
    if draw(st.booleans()) and draw(st.booleans()):
        g = torch.Generator().manual_seed(draw(fz.seeds()))
        t[torch.rand(shape, generator=g) < draw(st.sampled_from([0.05, 0.3]))] = -math.inf
    return dtype, shape, s, t


def layouts():
    return st.tuples(st.sampled_from(fz.LAYOUTS), st.integers(0, 3))


def laid_out(x, layout):
    name, dim = layout
    return fz.with_layout(x, name, dim=dim)


def rows_have_finite_teacher(t, softmax_dim: int) -> bool:
    """Every softmax row of the teacher holds a finite entry (an all −inf row has no softmax)."""
    n, c = t.shape[:2]
    flat = t.reshape(n, c, -1)
    return bool(torch.isfinite(flat).any(dim=softmax_dim).all())


def run(fn, s, t, teacher_grad, grad_out):
    s = s.detach().requires_grad_(True)
    t = t.detach().requires_grad_(teacher_grad)
    loss = fn(s, t)
    (loss * grad_out).backward()
    return loss.detach(), s.grad, (t.grad if teacher_grad else None)


def check_against_oracle(dtype, loss, grads, oracle, grad_out):
    exact_loss, exact_gs, exact_gt, loss_k, gs_k, gt_k = oracle
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    fz.assert_close("loss", loss, exact_loss, tol=fz.LOSS_TOL[dtype], dtype=dtype, condition=float(loss_k))
    grad_s, grad_t = grads
    assert grad_s.dtype == dtype
    fz.assert_close("grad student", grad_s, exact_gs * grad_out, tol=fz.GRAD_TOL[dtype], dtype=dtype,
                    condition=abs(grad_out) * gs_k.norm().item())
    if grad_t is not None:
        assert grad_t.dtype == dtype
        fz.assert_close("grad teacher", grad_t, exact_gt * grad_out, tol=fz.GRAD_TOL[dtype], dtype=dtype,
                        condition=abs(grad_out) * gt_k.norm().item())


def _device_inputs(device, *tensors):
    return [None if x is None else x.to(device) if x.device.type != device else x for x in tensors]


@pytest.mark.parametrize("device,backend", fz.backends("channel_kl"))
def test_channel_kl(device, backend):
    @fz.examples(backend)
    @given(data=st.data())
    def check(data):
        dtype, shape, s, t = data.draw(logit_pair(backend, softmax_dim=2))
        s = laid_out(s, data.draw(layouts()))
        t = laid_out(t, data.draw(layouts()))
        assume(rows_have_finite_teacher(t, softmax_dim=2))
        tau = data.draw(TAUS)
        teacher_grad = data.draw(st.booleans())
        grad_out = data.draw(st.sampled_from([1.0, 0.37, -2.5]))
        s, t = _device_inputs(device, s, t)
        before = fz.snapshot(s, t)
        fn = lambda a, b: kdops.channel_kl(a, b, tau, backend=backend)  # noqa: E731
        loss, *grads = run(fn, s, t, teacher_grad, grad_out)
        fz.assert_unchanged(("student", "teacher"), (s, t), before)
        check_against_oracle(dtype, loss, grads, channel_kl_oracle(s.cpu(), t.cpu(), tau), grad_out)
        again, *grads_again = run(fn, s, t, teacher_grad, grad_out)
        fz.assert_bitwise_equal("loss", loss, again)
        for a, b in zip(grads, grads_again):
            if a is not None:
                fz.assert_bitwise_equal("gradient", a, b)

    check()


@pytest.mark.parametrize("device,backend", fz.backends("pixel_kl"))
def test_pixel_kl(device, backend):
    @fz.examples(backend)
    @given(data=st.data())
    def check(data):
        dtype, shape, s, t = data.draw(logit_pair(backend, softmax_dim=1))
        target, ignore_index = None, 255
        if data.draw(st.booleans()):
            target, ignore_index = data.draw(fz.label_maps((shape[0], *shape[2:]), shape[1]))
        layout_s, layout_t = data.draw(layouts()), data.draw(layouts())
        poison = target is not None and data.draw(st.booleans())
        if poison:
            # NaN and inf in the ignored pixels must reach neither the loss nor the gradients;
            # an expanded layout would copy them into valid pixels, so it is not drawn here.
            assume("expanded" not in (layout_s[0], layout_t[0]))
            ignored = (target == ignore_index).unsqueeze(1).expand(shape)
            s = s.masked_fill(ignored, math.nan)
            t = t.masked_fill(ignored, math.inf)
        s, t = laid_out(s, layout_s), laid_out(t, layout_t)
        valid_t = t if target is None else t.masked_fill((target == ignore_index).unsqueeze(1), 0)
        assume(rows_have_finite_teacher(valid_t, softmax_dim=1))
        tau = data.draw(TAUS)
        teacher_grad = data.draw(st.booleans())
        grad_out = data.draw(st.sampled_from([1.0, 0.37, -2.5]))
        s, t, target = _device_inputs(device, s, t, target)
        before = fz.snapshot(s, t, target)
        fn = lambda a, b: kdops.pixel_kl(a, b, tau, target, ignore_index, backend=backend)  # noqa: E731
        loss, *grads = run(fn, s, t, teacher_grad, grad_out)
        fz.assert_unchanged(("student", "teacher", "target"), (s, t, target), before)
        oracle = pixel_kl_oracle(s.cpu(), t.cpu(), tau, None if target is None else target.cpu(), ignore_index)
        check_against_oracle(dtype, loss, grads, oracle, grad_out)
        if target is not None:
            ignored = (target == ignore_index).unsqueeze(1).expand(shape)
            for name, grad in zip(("student", "teacher"), grads):
                if grad is not None:
                    assert (grad[ignored] == 0).all(), f"gradient of the {name} at ignored pixels is not 0"
        again, *grads_again = run(fn, s, t, teacher_grad, grad_out)
        fz.assert_bitwise_equal("loss", loss, again)
        for a, b in zip(grads, grads_again):
            if a is not None:
                fz.assert_bitwise_equal("gradient", a, b)

    check()


@pytest.mark.parametrize("device,backend", fz.backends("pixel_kl"))
def test_resized_pixel_kl(device, backend):
    """pixel_kl(size=...): the logits resized bilinearly (up, down, odd factors, to and from one
    pixel, either align_corners) inside the op."""
    @fz.examples(backend)
    @given(data=st.data())
    def check(data):
        dtype, shape, s, t = data.draw(logit_pair(backend, softmax_dim=1))
        cap = 600 if backend == "triton" else 8000
        out_h = data.draw(st.integers(1, max(1, min(4 * shape[2] + 3, cap // (shape[0] * shape[1])))))
        out_w = data.draw(st.integers(1, max(1, min(4 * shape[3] + 3, cap // (shape[0] * shape[1] * out_h)))))
        size, align_corners = (out_h, out_w), data.draw(st.booleans())
        assume(size != tuple(shape[2:]))
        target, ignore_index = None, 255
        if data.draw(st.booleans()):
            target, ignore_index = data.draw(fz.label_maps((shape[0], *size), shape[1]))
        resize = lambda x: ref_softmax_kl.bilinear_resize(x, size, align_corners)  # noqa: E731
        layout_s, layout_t = data.draw(layouts()), data.draw(layouts())
        if target is not None and data.draw(st.booleans()):
            # NaN and inf in input pixels that only ignored output pixels read must reach
            # nothing (not drawn with expanded layouts, which would copy them elsewhere).
            assume("expanded" not in (layout_s[0], layout_t[0]))
            valid = (target != ignore_index).double().unsqueeze(1).expand(shape[0], shape[1], *size)
            _, transpose = torch.func.vjp(resize, torch.zeros(shape, dtype=torch.float64))
            unread = (transpose(valid)[0] == 0)
            s = s.masked_fill(unread, math.nan)
            t = t.masked_fill(unread, math.inf)
        s, t = laid_out(s, layout_s), laid_out(t, layout_t)
        resized_t = resize(t.double())
        if target is not None:
            resized_t = resized_t.masked_fill((target == ignore_index).unsqueeze(1), 0)
        assume(rows_have_finite_teacher(resized_t, softmax_dim=1))
        tau = data.draw(TAUS)
        teacher_grad = data.draw(st.booleans())
        grad_out = data.draw(st.sampled_from([1.0, 0.37, -2.5]))
        s, t, target = _device_inputs(device, s, t, target)
        before = fz.snapshot(s, t, target)
        fn = lambda a, b: kdops.pixel_kl(a, b, tau, target, ignore_index, size=size,  # noqa: E731
                                         align_corners=align_corners, backend=backend)
        loss, *grads = run(fn, s, t, teacher_grad, grad_out)
        fz.assert_unchanged(("student", "teacher", "target"), (s, t, target), before)
        oracle = resized_pixel_kl_oracle(s.cpu(), t.cpu(), tau, None if target is None else target.cpu(),
                                         ignore_index, size, align_corners)
        check_against_oracle(dtype, loss, grads, oracle, grad_out)
        again, *grads_again = run(fn, s, t, teacher_grad, grad_out)
        fz.assert_bitwise_equal("loss", loss, again)
        for a, b in zip(grads, grads_again):
            if a is not None:
                fz.assert_bitwise_equal("gradient", a, b)

    check()


# ---------------------------------------------------------------------------------------------
# bad inputs: every one raises an error that names the argument, on every backend


@st.composite
def bad_call(draw):
    """(op, kwargs, the argument the error must name) for one kind of bad input."""
    s = torch.randn(2, 3, 4, 5)
    t = torch.randn(2, 3, 4, 5)
    kind = draw(st.sampled_from([
        "tau_small", "tau_large", "tau_nan", "tau_type", "teacher_shape", "teacher_dtype",
        "student_int", "student_empty", "target_range", "target_dtype", "target_shape",
        "ignore_index_range", "ignore_index_type",
    ]))
    op = draw(st.sampled_from(["channel_kl", "pixel_kl"])) if kind.startswith(("tau", "teacher", "student")) else "pixel_kl"
    kwargs = {"student": s, "teacher": t}
    labels = torch.randint(0, 3, (2, 4, 5))
    if kind == "tau_small":
        return op, {**kwargs, "tau": draw(st.sampled_from([0.0, -1.0, 1e-7, 1e-200, 5e-324]))}, "tau"
    if kind == "tau_large":
        return op, {**kwargs, "tau": draw(st.sampled_from([1.1e6, 1e200, math.inf]))}, "tau"
    if kind == "tau_nan":
        return op, {**kwargs, "tau": math.nan}, "tau"
    if kind == "tau_type":
        return op, {**kwargs, "tau": draw(st.sampled_from(["1", None, True, torch.tensor(1.0)]))}, "tau"
    if kind == "teacher_shape":
        return op, {**kwargs, "teacher": torch.randn(2, 3, 4, draw(st.integers(1, 4)))}, "teacher"
    if kind == "teacher_dtype":
        return op, {**kwargs, "teacher": t.to(draw(st.sampled_from([torch.float16, torch.float64])))}, "teacher"
    if kind == "student_int":
        return op, {**kwargs, "student": s.to(torch.int32)}, "student"
    if kind == "student_empty":
        return op, {"student": torch.randn(2, 0, 4, 5), "teacher": torch.randn(2, 0, 4, 5)}, "student"
    if kind == "target_range":
        value = draw(st.sampled_from([3, 1000, -2, -1]))
        labels[1, 2, 3] = value
        return op, {**kwargs, "target": labels, "ignore_index": 255 if value != 255 else -1}, "target"
    if kind == "target_dtype":
        return op, {**kwargs, "target": labels.to(draw(st.sampled_from([torch.float32, torch.bool])))}, "target"
    if kind == "target_shape":
        return op, {**kwargs, "target": torch.randint(0, 3, (2, 4, 4))}, "target"
    if kind == "ignore_index_range":
        dtype = draw(st.sampled_from([torch.uint8, torch.int8, torch.int16, torch.int64]))
        info = torch.iinfo(dtype)
        value = draw(st.sampled_from([info.max + 1, info.min - 1, 2**70]))
        return op, {**kwargs, "target": labels.to(dtype), "ignore_index": value}, "ignore_index"
    return op, {**kwargs, "target": labels, "ignore_index": draw(st.sampled_from([255.0, "255", None]))}, "ignore_index"


@pytest.mark.parametrize("device,backend", fz.backends("pixel_kl"))
def test_bad_inputs_name_the_argument(device, backend):
    @fz.examples(backend, default=60)
    @given(call=bad_call())
    def check(call):
        op, kwargs, argument = call
        # On CUDA a label out of range is a device-side assert, which ends the CUDA context:
        # tests/ops check it in a subprocess.
        assume(not (device == "cuda" and argument == "target" and "target" in kwargs
                    and kwargs["target"].dtype not in (torch.float32, torch.bool)
                    and kwargs["target"].shape == (2, 4, 5)))
        kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        if op == "channel_kl":
            kwargs.pop("target", None), kwargs.pop("ignore_index", None)
        with pytest.raises((ValueError, TypeError)) as info:
            getattr(kdops, op)(**kwargs, backend=backend)
            if device == "cuda":
                torch.cuda.synchronize()
        assert argument in str(info.value), f"{op}: the error does not name {argument}: {info.value}"

    check()
