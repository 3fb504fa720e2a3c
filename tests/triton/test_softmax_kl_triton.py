"""The Triton kernels of channel_kl and pixel_kl against the float64 reference.

Without a GPU these run on CPU tensors under TRITON_INTERPRET=1 (set by tests/conftest.py);
on a GPU the same cases run on CUDA tensors. Every launcher buffer starts as NaN (the
kdops.triton._launch.POISON_OUTPUTS hook, on for the whole file), so a passing case also proves that every output
element is written. Small launch overrides make tiny inputs cross blocks, chunks and splits.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from kdops import backend as kd_backend  # noqa: E402
from kdops.reference import softmax_kl as reference  # noqa: E402
from kdops.triton import channel_kl as triton_channel_kl  # noqa: E402
from kdops.triton import pixel_kl as triton_pixel_kl  # noqa: E402
from kdops.triton._launch import new_buffer  # noqa: E402
from tests.ops.test_softmax_kl import assert_row_stats, oracle  # noqa: E402
from tests.utils import TOLERANCES, cpu_and_cuda, make_layout, relative_error  # noqa: E402

OPS = torch.ops.kdops_triton


@pytest.fixture(params=cpu_and_cuda())
def device(request):
    if request.param == "cpu" and not kd_backend.triton_interpreting():
        pytest.skip("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    return request.param


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr("kdops.triton._launch.POISON_OUTPUTS", True)


def set_launch(monkeypatch, **overrides):
    monkeypatch.setattr(triton_channel_kl, "_LAUNCH_OVERRIDES", dict(overrides))
    monkeypatch.setattr(triton_pixel_kl, "_LAUNCH_OVERRIDES", dict(overrides))


def layout(x: torch.Tensor, name: str) -> torch.Tensor:
    """make_layout's layouts, and "h-slice": every other row of a twice-as-tall buffer, whose
    spatial dims do not merge into one stride (the launchers copy it once)."""
    if name != "h-slice":
        return make_layout(x, name)
    tall = torch.empty(*x.shape[:2], 2 * x.shape[2], *x.shape[3:], dtype=x.dtype, device=x.device)
    tall[:, :, ::2] = x
    return tall[:, :, ::2]


def make_pair(shape, dtype, device, layouts=("contiguous", "contiguous"), seed=0):
    """Student and teacher logits, spread wide enough (σ = 3) that the softmaxes are peaked."""
    generator = torch.Generator().manual_seed(seed)
    pair = []
    for name in layouts:
        x = (3 * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)
        pair.append(layout(x.to(device), name).requires_grad_())
    return pair


def make_target(shape, num_classes, ignore_index, device, dtype=torch.int64, seed=1):
    """Labels (N, *spatial) in [0, num_classes) with about a third of the pixels ignored."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (shape[0], *shape[2:]), generator=generator)
    ignored = torch.rand(labels.shape, generator=generator) < 0.35
    return torch.where(ignored, ignore_index, labels).to(dtype).to(device)


def reference_and_grads(fn, student, teacher, *args):
    """The reference loss and gradients, in float64 on CPU, at the same (rounded) inputs."""
    s = student.detach().double().cpu().requires_grad_()
    t = teacher.detach().double().cpu().requires_grad_()
    loss = fn(s, t, *args)
    loss.backward()
    return loss, s.grad, t.grad


def assert_matches(loss, student, teacher, expected, loss_tol, grad_tol):
    expected_loss, expected_grad_s, expected_grad_t = expected
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert relative_error(loss, expected_loss) <= loss_tol
    for x, expected_grad in ((student, expected_grad_s), (teacher, expected_grad_t)):
        assert x.grad.dtype == x.dtype and x.grad.shape == x.shape
        assert torch.isfinite(x.grad).all()
        assert relative_error(x.grad, expected_grad) <= grad_tol
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            assert x.grad.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------ channel_kl ---

CHANNEL_CASES = [
    pytest.param((2, 3, 5, 7), ("contiguous",) * 2, 1.0, {}, id="odd-2x3x5x7"),
    pytest.param(
        (1, 2, 15, 20), ("contiguous",) * 2, 2.5, {"channel_block_l": 64}, id="L300-5-blocks"
    ),
    pytest.param(
        (1, 2, 15, 20), ("contiguous",) * 2, 0.5, {"channel_block_l": 32, "channel_splits": 3},
        id="L300-3-splits-of-4-4-2-blocks",
    ),
    pytest.param((2, 5, 5, 7), ("channels_last",) * 2, 1.0, {}, id="channels-last"),
    pytest.param(
        (2, 5, 5, 7), ("channels_last",) * 2, 2.0,
        {"channel_block_r": 2, "channel_block_l": 16, "channel_splits": 2},
        id="channels-last-3-row-tiles-2-splits",
    ),
    pytest.param((2, 3, 5, 7), ("channels_last", "contiguous"), 1.0, {}, id="mixed-layouts"),
    pytest.param((2, 3, 5, 7), ("strided",) * 2, 1.0, {}, id="strided"),
    pytest.param((2, 3, 5, 7), ("h-slice", "contiguous"), 1.0, {}, id="unmergeable-copy"),
    pytest.param((3, 1, 4, 6), ("contiguous",) * 2, 1.0, {}, id="C1"),
    pytest.param((2, 3, 1, 1), ("contiguous",) * 2, 1.0, {}, id="L1"),
    pytest.param((1, 4, 9), ("contiguous",) * 2, 3.0, {}, id="3d-N1"),
    pytest.param((2, 2, 3, 2, 5), ("contiguous",) * 2, 1.0, {}, id="5d"),
]


@pytest.mark.parametrize("dtype, loss_tol, grad_tol", TOLERANCES)
@pytest.mark.parametrize("shape, layouts, tau, launch", CHANNEL_CASES)
def test_channel_kl_matches_reference(
    device, monkeypatch, shape, layouts, tau, launch, dtype, loss_tol, grad_tol
):
    set_launch(monkeypatch, **launch)
    student, teacher = make_pair(shape, dtype, device, layouts)
    loss = triton_channel_kl.channel_kl(student, teacher, tau)
    loss.backward()
    expected = reference_and_grads(reference.channel_kl, student, teacher, tau)
    assert_matches(loss, student, teacher, expected, loss_tol, grad_tol)


@pytest.mark.parametrize(
    "launch",
    [
        pytest.param({}, id="one-split"),
        pytest.param({"channel_block_l": 16, "channel_splits": 3}, id="3-splits"),
    ],
)
def test_channel_kl_row_stats(device, monkeypatch, launch):
    """row_stats = per row (n, c) [max_s, log z_s, max_t, log z_t, KL], against float64."""
    set_launch(monkeypatch, **launch)
    tau = 1.7
    student, teacher = make_pair((2, 3, 5, 9), torch.float32, device)
    loss, row_stats = OPS.channel_kl(student.detach(), teacher.detach(), tau)
    assert_row_stats(loss, row_stats, student, teacher, tau)


# -------------------------------------------------------------------------------- pixel_kl ---

PIXEL_CASES = [
    pytest.param((2, 3, 5, 7), ("contiguous",) * 2, 1.0, None, {}, id="odd-no-target"),
    pytest.param((2, 3, 5, 7), ("contiguous",) * 2, 2.0, (255, torch.int64), {}, id="odd-target"),
    pytest.param(
        (2, 10, 5, 7), ("contiguous",) * 2, 0.7, (255, torch.int64),
        {"pixel_block_p": 16, "pixel_block_c": 4}, id="3-tiles-3-chunks",
    ),
    pytest.param(
        (2, 10, 5, 7), ("channels_last",) * 2, 1.0, (255, torch.uint8),
        {"pixel_block_p": 16, "pixel_block_c": 4}, id="channels-last-chunks-uint8",
    ),
    pytest.param(
        (2, 5, 5, 7), ("channels_last",) * 2, 1.0, (-1, torch.int32), {},
        id="channels-last-ignore-minus-1",
    ),
    pytest.param(
        (2, 3, 5, 7), ("channels_last", "strided"), 1.0, (255, torch.int64), {}, id="mixed-layouts"
    ),
    pytest.param((2, 3, 5, 7), ("strided",) * 2, 3.0, None, {}, id="strided"),
    pytest.param(
        (2, 3, 5, 7), ("h-slice", "contiguous"), 1.0, (255, torch.int64), {}, id="unmergeable-copy"
    ),
    pytest.param((3, 1, 4, 6), ("contiguous",) * 2, 1.0, (255, torch.int64), {}, id="C1"),
    pytest.param((2, 4, 1, 1), ("contiguous",) * 2, 1.0, None, {}, id="L1"),
    pytest.param((1, 4, 9), ("contiguous",) * 2, 1.0, (0, torch.int64), {}, id="3d-N1-ignore-0"),
    pytest.param((2, 2, 3, 2, 5), ("contiguous",) * 2, 1.0, None, {}, id="5d"),
]


@pytest.mark.parametrize("dtype, loss_tol, grad_tol", TOLERANCES)
@pytest.mark.parametrize("shape, layouts, tau, labels, launch", PIXEL_CASES)
def test_pixel_kl_matches_reference(
    device, monkeypatch, shape, layouts, tau, labels, launch, dtype, loss_tol, grad_tol
):
    set_launch(monkeypatch, **launch)
    student, teacher = make_pair(shape, dtype, device, layouts)
    ignore_index, label_dtype = labels if labels is not None else (255, None)
    target = None
    if labels is not None:
        target = make_target(shape, shape[1], ignore_index, device, label_dtype)
    loss = triton_pixel_kl.pixel_kl(student, teacher, tau, target, ignore_index)
    loss.backward()
    cpu_target = None if target is None else target.cpu()
    expected = reference_and_grads(
        reference.pixel_kl, student, teacher, tau, cpu_target, ignore_index
    )
    assert_matches(loss, student, teacher, expected, loss_tol, grad_tol)


def test_pixel_kl_num_valid(device):
    student, teacher = make_pair((2, 3, 5, 7), torch.float32, device)
    target = make_target(student.shape, 3, 255, device)
    _, num_valid = OPS.pixel_kl(student.detach(), teacher.detach(), target, 255, 1.0)
    assert num_valid.dtype == torch.int64 and num_valid.shape == ()
    assert int(num_valid) == int((target != 255).sum())
    _, num_valid = OPS.pixel_kl(student.detach(), teacher.detach(), None, 255, 1.0)
    assert int(num_valid) == 2 * 35


def test_pixel_kl_all_ignored_is_zero(device):
    student, teacher = make_pair((2, 3, 5, 7), torch.float32, device)
    target = torch.full((2, 5, 7), 255, dtype=torch.int64, device=device)
    loss = triton_pixel_kl.pixel_kl(student, teacher, 2.0, target, 255)
    loss.backward()
    assert loss.item() == 0.0
    for x in (student, teacher):
        assert torch.equal(x.grad, torch.zeros_like(x))


# ------------------------------------------------ extreme inputs across blocks, splits, chunks ---


@pytest.mark.parametrize(
    "op, shape, launch, run",
    [
        pytest.param("channel_kl", (2, 3, 15, 20), {"channel_block_l": 32, "channel_splits": 3},
                     128, id="channel-3-splits"),
        pytest.param("channel_kl", (2, 5, 5, 7), {"channel_block_r": 2, "channel_block_l": 16,
                                                  "channel_splits": 2}, 16, id="channel-row-tiles"),
        pytest.param("pixel_kl", (2, 10, 5, 7), {"pixel_block_p": 16, "pixel_block_c": 4}, 4,
                     id="pixel-3-chunks"),
    ],
)
def test_extreme_inputs_across_splits(device, monkeypatch, op, shape, launch, run):
    """Large logits (+1e4), a teacher −inf over a whole split / chunk / lane block and at
    single entries, against the float64 oracle: the statistics of lanes, splits and chunks
    that hold only −inf teacher logits (student mass, no teacher mass) merge exactly, and a
    maximum raised from the lowest value adds nothing spurious. run: the −inf logits that
    fill a row's first split (channel_kl) or first chunk of channels (pixel_kl)."""
    set_launch(monkeypatch, **launch)
    generator = torch.Generator().manual_seed(21)
    s = torch.randn(shape, generator=generator) + 1e4
    t = torch.randn(shape, generator=generator) + 1e4
    if op == "channel_kl":
        t[0, 1].view(-1)[:run] = float("-inf")
        t[1, 2].view(-1)[5::7] = float("-inf")
    else:
        t[0, :run] = float("-inf")
        t[1, 5, 2, 3] = float("-inf")
    student = s.to(device).requires_grad_()
    teacher = t.to(device).requires_grad_()
    if op == "channel_kl":
        loss = triton_channel_kl.channel_kl(student, teacher, 0.7)
    else:
        loss = triton_pixel_kl.pixel_kl(student, teacher, 0.7, None, 255)
    loss.backward()
    expected, grad_s, grad_t = oracle(op, s, t, 0.7)
    assert relative_error(loss, expected) <= 1e-5
    for x, expected_grad in ((student, grad_s), (teacher, grad_t)):
        assert torch.isfinite(x.grad).all()
        assert relative_error(x.grad.reshape(expected_grad.shape), expected_grad) <= 1e-5
    assert not teacher.grad[torch.isinf(t).to(device)].any()


# ------------------------------------------------------------- gradients, hooks, determinism ---


def run_op(op, student, teacher, target):
    if op == "channel_kl":
        return triton_channel_kl.channel_kl(student, teacher, 1.5)
    return triton_pixel_kl.pixel_kl(student, teacher, 1.5, target, 255)


@pytest.mark.parametrize("op", ["channel_kl", "pixel_kl"])
@pytest.mark.parametrize("wanted", ["student", "teacher"])
def test_only_requested_gradient(device, op, wanted):
    """Autograd asks for one gradient: it matches the reference, the other stays None."""
    student, teacher = make_pair((2, 3, 5, 7), torch.float32, device)
    target = make_target(student.shape, 3, 255, device)
    unwanted = teacher if wanted == "student" else student
    unwanted.requires_grad_(False)
    run_op(op, student, teacher, target).backward()
    ref_fn = getattr(reference, op)
    args = (1.5,) if op == "channel_kl" else (1.5, target.cpu(), 255)
    _, grad_s, grad_t = reference_and_grads(ref_fn, student, teacher, *args)
    x, expected = (student, grad_s) if wanted == "student" else (teacher, grad_t)
    assert unwanted.grad is None
    assert relative_error(x.grad, expected) <= 1e-5


@pytest.mark.parametrize("op", ["channel_kl", "pixel_kl"])
@pytest.mark.parametrize(
    "flags", [(True, False), (False, True), (False, False)], ids=["student", "teacher", "none"]
)
def test_backward_op_skips_unrequested_gradient(device, op, flags):
    """The backward ops return an empty tensor (numel 0) for a gradient not asked for."""
    student, teacher = make_pair((2, 3, 5, 7), torch.float32, device)
    student, teacher = student.detach(), teacher.detach()
    grad_loss = torch.ones((), device=device)
    if op == "channel_kl":
        _, row_stats = OPS.channel_kl(student, teacher, 1.5)
        grads = OPS.channel_kl_backward(grad_loss, student, teacher, row_stats, 1.5, *flags)
    else:
        _, num_valid = OPS.pixel_kl(student, teacher, None, 255, 1.5)
        grads = OPS.pixel_kl_backward(
            grad_loss, student, teacher, None, num_valid, 255, 1.5, *flags
        )
    for grad, wanted, x in zip(grads, flags, (student, teacher)):
        assert grad.shape == (x.shape if wanted else (0,))
        assert torch.isfinite(grad).all()


def test_poison_hook_fills_with_nan(device):
    """The hook the other tests rely on really poisons the launchers' buffers."""
    assert torch.isnan(new_buffer((3,), torch.float32, torch.device(device))).all()
    counts = new_buffer((3,), torch.int32, torch.device(device))
    assert (counts == torch.iinfo(torch.int32).min).all()


@pytest.mark.parametrize("op", ["channel_kl", "pixel_kl"])
def test_deterministic(device, monkeypatch, op):
    set_launch(monkeypatch, channel_block_l=16, channel_splits=2, pixel_block_p=16)
    runs = []
    for _ in range(2):
        student, teacher = make_pair((2, 3, 5, 7), torch.float32, device)
        target = make_target(student.shape, 3, 255, device)
        loss = run_op(op, student, teacher, target)
        loss.backward()
        runs.append((loss.detach(), student.grad, teacher.grad))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_rejects_float64(device):
    student, teacher = make_pair((1, 2, 3), torch.float64, device)
    with pytest.raises(TypeError, match="student"):
        triton_channel_kl.channel_kl(student, teacher, 1.0)
    with pytest.raises(TypeError, match="student"):
        triton_pixel_kl.pixel_kl(student, teacher, 1.0, None, 255)


# ---------------------------------------------------------------------- torch.library checks ---


def test_opcheck(device):
    """Schemas, fake kernels, autograd registration and AOT dispatch of the four ops."""
    student, teacher = make_pair((2, 3, 2, 3), torch.float32, device)
    target = make_target(student.shape, 3, 255, device)
    torch.library.opcheck(OPS.channel_kl.default, (student, teacher, 1.5))
    torch.library.opcheck(OPS.pixel_kl.default, (student, teacher, target, 255, 1.5))
    torch.library.opcheck(OPS.pixel_kl.default, (student, teacher, None, 255, 1.5))
    s, t = student.detach(), teacher.detach()
    grad_loss = torch.tensor(0.5, device=device)
    _, row_stats = OPS.channel_kl(s, t, 1.5)
    _, num_valid = OPS.pixel_kl(s, t, target, 255, 1.5)
    for flags in ((True, True), (True, False)):
        torch.library.opcheck(
            OPS.channel_kl_backward.default, (grad_loss, s, t, row_stats, 1.5, *flags)
        )
        torch.library.opcheck(
            OPS.pixel_kl_backward.default, (grad_loss, s, t, target, num_valid, 255, 1.5, *flags)
        )


@pytest.mark.needs_cuda
def test_compile_fullgraph():
    """Both losses and their backward under torch.compile(fullgraph=True) equal eager."""

    def losses(student, teacher, target):
        return (
            triton_channel_kl.channel_kl(student, teacher, 2.0)
            + triton_pixel_kl.pixel_kl(student, teacher, 2.0, target, 255)
        )

    compiled = torch.compile(losses, fullgraph=True)
    results = []
    for fn in (losses, compiled):
        student, teacher = make_pair((2, 19, 24, 40), torch.float32, "cuda")
        target = make_target(student.shape, 19, 255, "cuda")
        loss = fn(student, teacher, target)
        loss.backward()
        results.append((loss.detach(), student.grad, teacher.grad))
    for eager, traced in zip(*results):
        assert relative_error(traced, eager) <= 1e-6


@pytest.mark.needs_cuda
def test_int64_offsets(monkeypatch):
    """Offsets past 2^31 elements: the rows and pixels of a 3·2^30-element input, checked
    against the same rows and pixels computed from small copies (with the same splits, so
    the row statistics differ only by the merge's summation order)."""
    set_launch(monkeypatch, channel_splits=64)
    length = 2**30
    generator = torch.Generator(device="cuda").manual_seed(0)
    student = torch.randn((1, 3, length), generator=generator, device="cuda", dtype=torch.float16)
    teacher = torch.randn((1, 3, length), generator=generator, device="cuda", dtype=torch.float16)
    _, row_stats = OPS.channel_kl(student, teacher, 1.0)
    _, last_row = OPS.channel_kl(student[:, 2:].clone(), teacher[:, 2:].clone(), 1.0)
    assert relative_error(row_stats[2], last_row[0]) <= 1e-6
    loss, _ = OPS.pixel_kl(student, teacher, None, 255, 1.0)
    half = length // 2
    halves = [
        OPS.pixel_kl(student[..., part].clone(), teacher[..., part].clone(), None, 255, 1.0)[0]
        for part in (slice(0, half), slice(half, None))
    ]
    assert relative_error(loss, (halves[0] + halves[1]) / 2) <= 1e-5


# ------------------------------------------------------------------- compiled for Hopper ---
#
# The interpreter runs the kernels' Python, not Triton's compiler: a kernel can pass every test
# above and still fail to compile (Triton turns an int argument equal to 1 into a constexpr, for
# one). So the launchers also run, in a subprocess without TRITON_INTERPRET, on meta tensors with
# each kernel launch replaced by a compilation for sm_90 (H100); ptxas's resource usage of every
# compiled kernel must show no spills and at most 128 registers per thread (so that at least two
# programs of 8 warps fit on an SM to hide memory latency).

REPO_ROOT = Path(__file__).resolve().parents[2]
KERNELS = (
    "_channel_kl_partials_kernel",
    "_channel_kl_merge_kernel",
    "_channel_kl_backward_kernel",
    "_pixel_kl_forward_kernel",
    "_pixel_kl_backward_kernel",
)


def compile_for_hopper() -> list[tuple[str, int, int]]:
    """(kernel, registers, local-memory bytes) of every kernel the launchers launch for a few
    representative calls, compiled for sm_90 without a GPU."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class Hopper:
        """Stands in for the CUDA driver: the target to compile for, no device."""

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    driver.set_active(Hopper())
    compiled = []

    class CompileInsteadOfLaunch:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                args = [a.dtype if isinstance(a, torch.Tensor) else a for a in args]
                compiled.append(self.kernel.warmup(*args, grid=grid, **kwargs))

            return launch

    for name in KERNELS:
        module = triton_channel_kl if name.startswith("_channel") else triton_pixel_kl
        setattr(module, name, CompileInsteadOfLaunch(getattr(module, name)))

    def run(shape, dtype, target_dtype=None, channels_last=False, grads=(True, True), channel=True):
        s = torch.empty(shape, dtype=dtype, device="meta")
        if channels_last:
            s = s.contiguous(memory_format=torch.channels_last)
        target = None
        if target_dtype is not None:
            target = torch.empty((shape[0], *shape[2:]), dtype=target_dtype, device="meta")
        grad_loss = torch.empty((), device="meta")
        if channel:
            _, row_stats = triton_channel_kl._channel_kl_forward(s, s, 2.0)
            triton_channel_kl._channel_kl_backward(grad_loss, s, s, row_stats, 2.0, *grads)
        _, num_valid = triton_pixel_kl._pixel_kl_forward(s, s, target, 255, 2.0)
        triton_pixel_kl._pixel_kl_backward(grad_loss, s, s, target, num_valid, 255, 2.0, *grads)

    triton_channel_kl._LAUNCH_OVERRIDES["channel_splits"] = 14  # the split count of an H100 at this size
    run((8, 19, 512, 1024), torch.float32, target_dtype=torch.int64)
    run((8, 19, 512, 1024), torch.bfloat16, channels_last=True, grads=(False, True))
    run((2, 1000, 64, 64), torch.float16, torch.uint8, grads=(True, False), channel=False)
    triton_channel_kl._LAUNCH_OVERRIDES.clear()
    run((1, 1, 1), torch.float32, target_dtype=torch.uint8)  # every size 1: constexpr ints

    usage = []
    with tempfile.TemporaryDirectory() as folder:
        for kernel in compiled:
            cubin = Path(folder) / f"{kernel.name}-{len(usage)}.cubin"
            cubin.write_bytes(kernel.asm["cubin"])
            dump = subprocess.run(
                [knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(cubin)],
                capture_output=True, text=True, check=True,
            ).stdout
            registers, local = re.search(r"REG:(\d+) .*LOCAL:(\d+)", dump).groups()
            usage.append((kernel.name, int(registers), int(local)))
    return usage


def test_kernels_compile_for_hopper(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "tests.triton.test_softmax_kl_triton", "--compile-for-hopper"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    usage = json.loads(done.stdout.splitlines()[-1])
    assert {name for name, _, _ in usage} == set(KERNELS)
    for name, registers, local in usage:
        assert local == 0, f"{name} spills {local} bytes"
        assert registers <= 128, f"{name} uses {registers} registers"


if __name__ == "__main__" and sys.argv[1:] == ["--compile-for-hopper"]:
    print(json.dumps(compile_for_hopper()))
