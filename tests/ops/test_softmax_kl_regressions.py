"""The reproducers of issue 7 (an independent fuzzer's findings), on every backend that runs.

Each case states its exact answer (float64, from the formula) and the error DESIGN.md allows.
"""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import kdops
from tests.utils import relative_error

ALL_BACKENDS = [
    pytest.param(device, backend, id=f"{device}-{backend}", marks=marks)
    for device, backend, marks in (
        ("cpu", "reference", ()),
        ("cpu", "cpu", ()),
        ("cpu", "triton", ()),
        ("cuda", "cuda", (pytest.mark.needs_cuda,)),
        ("cuda", "triton", (pytest.mark.needs_cuda,)),
    )
]
OPS = [pytest.param("channel_kl", id="channel_kl"), pytest.param("pixel_kl", id="pixel_kl")]


def skip_unavailable(op, backend, device):
    reason = kdops.backend.unavailable_reason(op, backend, device, torch.float32)
    if reason is not None:
        pytest.skip(reason)


def exact(op, s, t, tau, **kwargs):
    """Loss and gradients of the float64 reference on the same values."""
    s64 = s.detach().cpu().double().requires_grad_(True)
    t64 = t.detach().cpu().double().requires_grad_(True)
    loss = getattr(kdops, op)(s64, t64, tau, **kwargs, backend="reference")
    loss.backward()
    return loss.detach(), s64.grad, t64.grad


def run(op, s, t, tau, device, backend, **kwargs):
    s = s.detach().to(device).requires_grad_(True)
    t = t.detach().to(device).requires_grad_(True)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    loss = getattr(kdops, op)(s, t, tau, **kwargs, backend=backend)
    loss.backward()
    return loss.detach().cpu(), s.grad.cpu(), t.grad.cpu()


# ---------------------------------------------------------------------------------------------
# 1, 2: large logits and extreme temperatures keep float32 accuracy (shift-safe math)


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_pixel_kl_two_large_logits(device, backend):
    skip_unavailable("pixel_kl", backend, device)
    s = torch.tensor([902.71576, 902.44110]).view(1, 2, 1, 1)
    t = torch.tensor([-0.37490556, -0.11977036]).view(1, 2, 1, 1)
    loss, gs, gt = run("pixel_kl", s, t, 1.0, device, backend)
    ref_loss, ref_gs, ref_gt = exact("pixel_kl", s, t, 1.0)
    assert relative_error(loss, ref_loss) <= 1e-5
    assert relative_error(gs, ref_gs) <= 1e-5
    assert relative_error(gt, ref_gt) <= 1e-5


@pytest.mark.parametrize("offset", [1e3, 1e4], ids=["plus1e3", "plus1e4"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_offset_logits_keep_float32_accuracy(device, backend, op, offset):
    skip_unavailable(op, backend, device)
    g = torch.Generator().manual_seed(7)
    s = torch.randn(2, 7, 13, 11, generator=g) + offset
    t = torch.randn(2, 7, 13, 11, generator=g) + offset
    loss, gs, gt = run(op, s, t, 1.0, device, backend)
    ref_loss, ref_gs, ref_gt = exact(op, s, t, 1.0)
    assert relative_error(loss, ref_loss) <= 1e-5
    assert relative_error(gs, ref_gs) <= 1e-5
    assert relative_error(gt, ref_gt) <= 1e-5


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_uniform_rows_give_exactly_zero(device, backend, op):
    """s ≡ 0.0066895, t ≡ 122.49455 over a row: both softmaxes uniform, KL exactly 0 (was −1.7e-6)."""
    skip_unavailable(op, backend, device)
    s = torch.full((1, 1, 1, 20), 0.0066895) if op == "channel_kl" else torch.full((1, 20, 1, 1), 0.0066895)
    t = torch.full_like(s, 122.49455)
    loss, gs, gt = run(op, s, t, 0.14094782, device, backend)
    assert loss.item() == 0.0
    # The exact gradients are 0; float32 round-off of p and q (≈ 0.05) may leave ~1e-9.
    assert gs.abs().max() <= 1e-7 and gt.abs().max() <= 1e-7


@pytest.mark.parametrize("tau", [1e-6, 1e6], ids=["tau1e-6", "tau1e6"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_extreme_temperatures_give_finite_results(device, backend, op, tau):
    skip_unavailable(op, backend, device)
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 5, 4, 6, generator=g), torch.randn(2, 5, 4, 6, generator=g)
    loss, gs, gt = run(op, s, t, tau, device, backend)
    assert torch.isfinite(loss) and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    if tau == 1e-6:  # well conditioned: the KL is that of two one-hot-like rows
        ref_loss, ref_gs, _ = exact(op, s, t, tau)
        assert relative_error(loss, ref_loss) <= 1e-5
        assert relative_error(gs, ref_gs) <= 1e-5


@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_float16_gradient_beyond_the_range_is_inf(device, backend):
    """Found by the fuzz suite (Triton, interpreter): at τ = 1e6 with a −inf teacher logit the
    student gradient τ·(p_s − p_t) = ±5e5 exceeds float16's range: it must be ±inf, not NaN."""
    s = torch.tensor([0.0015, -0.0003], dtype=torch.float16).view(1, 2, 1, 1).to(device)
    t = torch.tensor([-math.inf, -0.0003], dtype=torch.float16).view(1, 2, 1, 1).to(device)
    a = s.clone().requires_grad_(True)
    kdops.pixel_kl(a, t, 1e6, backend=backend).backward()
    assert a.grad.flatten().tolist() == [math.inf, -math.inf]


@pytest.mark.parametrize("tau", [1e-10, 1e-30, 1e-200, 1e-320, 2e6, 1e200, math.inf, math.nan, 0.0, -1.0])
@pytest.mark.parametrize("op", OPS)
def test_temperature_outside_the_range_is_an_error(op, tau):
    s = torch.randn(2, 5, 4, 6)
    with pytest.raises(ValueError, match="tau"):
        getattr(kdops, op)(s, s.clone(), tau)


# ---------------------------------------------------------------------------------------------
# 3: −inf is a probability of exactly 0; NaN in ignored pixels reaches nothing


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_minus_inf_in_the_teacher_is_probability_zero(device, backend, op):
    skip_unavailable(op, backend, device)
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    t[0, 1, 2, 3] = -math.inf
    loss, gs, gt = run(op, s, t, 2.0, device, backend)
    ref_loss, ref_gs, ref_gt = exact(op, s, t, 2.0)
    assert torch.isfinite(ref_loss) and torch.isfinite(ref_gt).all()
    assert relative_error(loss, ref_loss) <= 1e-5
    assert relative_error(gs, ref_gs) <= 1e-5
    assert relative_error(gt, ref_gt) <= 1e-5
    assert gt[0, 1, 2, 3] == 0


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_minus_inf_in_the_student_gives_infinite_loss(device, backend, op):
    """q = 0 where p > 0: KL(p‖q) = +inf exactly (never NaN)."""
    skip_unavailable(op, backend, device)
    s, t = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    s[1, 2, 0, 4] = -math.inf
    s = s.to(device)
    loss = getattr(kdops, op)(s, t.to(device), 1.0, backend=backend)
    assert loss.item() == math.inf


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_minus_inf_in_both_at_the_same_entry_contributes_zero(device, backend, op):
    skip_unavailable(op, backend, device)
    g = torch.Generator().manual_seed(9)
    s, t = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    s[1, 2, 0, 4] = t[1, 2, 0, 4] = -math.inf
    loss, gs, _ = run(op, s, t, 1.0, device, backend)
    ref_loss, ref_gs, _ = exact(op, s, t, 1.0)
    assert torch.isfinite(ref_loss)
    assert relative_error(loss, ref_loss) <= 1e-5
    assert torch.isfinite(gs).all()


@pytest.mark.parametrize("all_ignored", [False, True], ids=["some-ignored", "all-ignored"])
@pytest.mark.parametrize("device,backend", ALL_BACKENDS)
def test_nan_in_ignored_pixels_reaches_nothing(device, backend, all_ignored):
    skip_unavailable("pixel_kl", backend, device)
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 4, 3, 5, generator=g)
    target = torch.randint(0, 4, (2, 3, 5), generator=g)
    target[0, 1] = 255
    if all_ignored:
        target[:] = 255
    ignored = (target == 255).unsqueeze(1).expand_as(s)
    clean_loss, clean_gs, clean_gt = exact("pixel_kl", s, t, 1.0, target=target)
    s, t = s.masked_fill(ignored, math.nan), t.masked_fill(ignored, -math.inf)
    loss, gs, gt = run("pixel_kl", s, t, 1.0, device, backend, target=target)
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert (gs[ignored] == 0).all() and (gt[ignored] == 0).all()
    if all_ignored:
        assert loss.item() == 0.0
    else:
        assert relative_error(loss, clean_loss) <= 1e-5
        assert relative_error(gs, clean_gs) <= 1e-5
        assert relative_error(gt, clean_gt) <= 1e-5


# ---------------------------------------------------------------------------------------------
# 4, 5: labels outside [0, C) and an ignore_index the label dtype cannot hold are errors


def _label_cases():
    """(dtype, bad label, ignore_index) for every pair both held by the label dtype."""
    cases = []
    for dtype in (torch.int64, torch.int32, torch.uint8):
        info = torch.iinfo(dtype)
        for value, ignore_index in ((3, 255), (1000, 255), (-2, 255), (-1, 255), (255, -1)):
            if info.min <= value <= info.max and info.min <= ignore_index <= info.max:
                name = f"{str(dtype).removeprefix('torch.')}-label{value}-ignore{ignore_index}"
                cases.append(pytest.param(dtype, value, ignore_index, id=name))
    return cases


@pytest.mark.parametrize("dtype,value,ignore_index", _label_cases())
@pytest.mark.parametrize("device,backend", [p for p in ALL_BACKENDS if p.id.startswith("cpu")])
def test_label_outside_the_classes_is_an_error(device, backend, dtype, value, ignore_index):
    skip_unavailable("pixel_kl", backend, device)
    s = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5)).to(dtype)
    target[1, 3, 2] = value
    with pytest.raises(ValueError, match=rf"target holds {value}, outside \[0, 3\)"):
        kdops.pixel_kl(s, s.clone(), 1.0, target, ignore_index, backend=backend)


@pytest.mark.parametrize(
    "dtype,ignore_index",
    [(torch.uint8, 256), (torch.uint8, -1), (torch.int8, 255), (torch.int32, 2**31), (torch.int64, 2**70)],
    ids=["uint8-256", "uint8-minus1", "int8-255", "int32-2p31", "int64-2p70"],
)
@pytest.mark.parametrize("device,backend", [p for p in ALL_BACKENDS if p.id.startswith("cpu")])
def test_ignore_index_the_labels_cannot_hold_is_an_error(device, backend, dtype, ignore_index):
    skip_unavailable("pixel_kl", backend, device)
    s = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 4, 5)).to(dtype)
    with pytest.raises(ValueError, match="ignore_index"):
        kdops.pixel_kl(s, s.clone(), 1.0, target, ignore_index, backend=backend)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_label_check_does_not_synchronise_on_cuda(backend):
    skip_unavailable("pixel_kl", backend, "cuda")
    s = torch.randn(2, 19, 8, 9, device="cuda", requires_grad=True)
    t = torch.randn(2, 19, 8, 9, device="cuda")
    target = torch.randint(0, 19, (2, 8, 9), device="cuda")
    target[0, 0, 0] = 255
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kdops.pixel_kl(s, t, 2.0, target, backend=backend).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.needs_cuda
def test_label_outside_the_classes_on_cuda_is_a_device_side_error():
    """The device-side assert ends its CUDA context, so it runs in a process of its own."""
    script = textwrap.dedent("""
        import torch, kdops
        s = torch.randn(2, 3, 4, 5, device="cuda")
        target = torch.zeros(2, 4, 5, dtype=torch.long, device="cuda")
        target[1, 2, 3] = 7
        try:
            kdops.pixel_kl(s, s.clone(), 1.0, target)
            torch.cuda.synchronize()
        except RuntimeError as exc:
            print("raised:", exc)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "target holds a label outside [0, num_classes)" in result.stdout + result.stderr
