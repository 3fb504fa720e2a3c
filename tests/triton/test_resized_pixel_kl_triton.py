"""The Triton kernels of pixel_kl(size=...) (kdops.triton.resized_pixel_kl) against the float64
reference (kdops.reference.softmax_kl.pixel_kl with size).

Without a GPU these run on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py): shapes are
tiny. Every launcher buffer starts as NaN (POISON_OUTPUTS), so a passing case proves that every
gradient element is written, including input pixels no output pixel reads (downsampling).
Launch overrides make the small inputs cross pixel tiles, channel chunks, column blocks and
column steps of the backward programs.
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
from kdops.triton import pixel_kl as triton_pixel_kl  # noqa: E402
from kdops.triton import resized_pixel_kl as triton_resized  # noqa: E402
from tests.triton.test_softmax_kl_triton import (  # noqa: E402
    assert_matches, make_pair, reference_and_grads,
)
from tests.utils import TOLERANCES, cpu_and_cuda, relative_error  # noqa: E402

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
    monkeypatch.setattr(triton_resized, "_LAUNCH_OVERRIDES", dict(overrides))


def make_target(n, size, num_classes, ignore_index, device, dtype=torch.int64, seed=1):
    """Labels (N, H, W) at the output size, about a third of them ignored."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n, *size), generator=generator)
    ignored = torch.rand(labels.shape, generator=generator) < 0.35
    return torch.where(ignored, ignore_index, labels).to(dtype).to(device)


def run_resized(student, teacher, tau, target, ignore_index, size, align_corners):
    """The backend entry point kdops.backend dispatches to (pixel_kl with size)."""
    return triton_pixel_kl.pixel_kl(student, teacher, tau, target, ignore_index, size, align_corners)


def expected(student, teacher, tau, target, ignore_index, size, align_corners):
    cpu_target = None if target is None else target.cpu()
    return reference_and_grads(
        reference.pixel_kl, student, teacher, tau, cpu_target, ignore_index, size, align_corners
    )


# (shape (N, C, h, w), size (H, W), align_corners, layouts, labels, launch overrides)
RESIZE_CASES = [
    pytest.param((2, 3, 4, 5), (9, 13), False, ("contiguous",) * 2, (255, torch.int64), {},
                 id="up-odd-ratios"),
    pytest.param((2, 3, 4, 5), (9, 13), True, ("contiguous",) * 2, None, {},
                 id="up-odd-ratios-align-no-target"),
    pytest.param((1, 3, 3, 4), (24, 32), False, ("contiguous",) * 2, (255, torch.int64),
                 {"block_x": 16, "block_j": 2}, id="up-x8-column-blocks-and-steps"),
    pytest.param((2, 3, 7, 6), (4, 5), False, ("contiguous",) * 2, (255, torch.uint8), {},
                 id="down-uint8"),
    pytest.param((1, 3, 9, 9), (4, 2), True, ("contiguous",) * 2, (-1, torch.int32),
                 {"block_j": 3}, id="down-align-unread-inputs-ignore-minus-1"),
    pytest.param((1, 10, 3, 4), (7, 9), False, ("contiguous",) * 2, (255, torch.int64),
                 {"block_c": 4, "block_p": 16, "block_x": 8, "block_j": 2},
                 id="3-channel-chunks"),
    pytest.param((2, 5, 3, 4), (7, 9), True, ("channels_last",) * 2, (255, torch.int64), {},
                 id="channels-last"),
    pytest.param((2, 3, 3, 4), (7, 9), False, ("channels_last", "strided"), None, {},
                 id="mixed-layouts"),
    pytest.param((2, 3, 3, 4), (7, 9), False, ("h-slice", "contiguous"), (255, torch.int64), {},
                 id="unmergeable-student"),
    pytest.param((2, 3, 1, 5), (3, 1), False, ("contiguous",) * 2, None, {}, id="h1-to-W1"),
    pytest.param((2, 3, 1, 1), (3, 4), True, ("contiguous",) * 2, (255, torch.int64), {},
                 id="1x1-align"),
    pytest.param((1, 2, 5, 3), (1, 6), True, ("contiguous",) * 2, None, {}, id="H1-align"),
    pytest.param((2, 1, 3, 4), (5, 7), False, ("contiguous",) * 2, (255, torch.int64), {},
                 id="C1"),
]


@pytest.mark.parametrize("dtype, loss_tol, grad_tol", TOLERANCES)
@pytest.mark.parametrize("shape, size, align, layouts, labels, launch", RESIZE_CASES)
def test_matches_reference(
    device, monkeypatch, shape, size, align, layouts, labels, launch, dtype, loss_tol, grad_tol
):
    set_launch(monkeypatch, **launch)
    student, teacher = make_pair(shape, dtype, device, layouts)
    ignore_index, label_dtype = labels if labels is not None else (255, None)
    target = None
    if labels is not None:
        target = make_target(shape[0], size, shape[1], ignore_index, device, label_dtype)
    tau = 1.5
    loss = run_resized(student, teacher, tau, target, ignore_index, size, align)
    loss.backward()
    want = expected(student, teacher, tau, target, ignore_index, size, align)
    assert_matches(loss, student, teacher, want, loss_tol, grad_tol)


@pytest.mark.parametrize("align", [False, True], ids=["half-pixel", "align-corners"])
def test_source_positions_are_the_references(device, align):
    """A teacher −inf at two input pixels is probability 0 at exactly the output pixels that
    read it with weight > 0. Ratios 2 and 3 put many output positions exactly on input pixels
    (weight 0 on the neighbour): a kernel whose positions rounded differently (a fused
    multiply-add) would read −inf at other pixels and move the loss by a whole probability."""
    shape, size = (1, 3, 5, 7), (10, 21)  # ratios 2 and 3: many positions land on inputs
    generator = torch.Generator().manual_seed(3)
    s = torch.randn(shape, generator=generator, dtype=torch.float64)
    t = torch.randn(shape, generator=generator, dtype=torch.float64)
    t[0, 1, 2, 3] = float("-inf")
    t[0, 0, 4, 6] = float("-inf")
    student = s.float().to(device).requires_grad_()
    teacher = t.float().to(device).requires_grad_()
    loss = run_resized(student, teacher, 1.0, None, 255, size, align)
    loss.backward()
    want_loss, want_s, want_t = expected(student, teacher, 1.0, None, 255, size, align)
    assert torch.isfinite(loss) and relative_error(loss, want_loss) <= 1e-5
    assert relative_error(student.grad, want_s) <= 1e-5
    assert torch.isfinite(teacher.grad).all()
    assert relative_error(teacher.grad, want_t) <= 1e-5
    assert not teacher.grad[torch.isinf(t).to(device)].any()


def test_nan_in_ignored_pixels_reaches_nothing(device, monkeypatch):
    """NaN logits read only by ignored output pixels: loss and gradients are the reference's
    with those logits zeroed, and exactly zero at the NaN inputs (a select, never 0·NaN)."""
    set_launch(monkeypatch, block_j=2)
    shape, size = (1, 3, 4, 4), (8, 8)
    generator = torch.Generator().manual_seed(5)
    s = torch.randn(shape, generator=generator)
    t = torch.randn(shape, generator=generator)
    target = torch.randint(0, 3, (1, *size), generator=generator)
    # Input pixel (1, 1) is read by output rows and columns 1 … 4 (half-pixel, ratio 2):
    # ignore all of those, then put NaN there.
    target[0, 0:5, 0:5] = 255
    s_nan, t_nan = s.clone(), t.clone()
    s_nan[0, :, 1, 1] = float("nan")
    t_nan[0, 2, 1, 1] = float("nan")
    student = s_nan.to(device).requires_grad_()
    teacher = t_nan.to(device).requires_grad_()
    loss = run_resized(student, teacher, 2.0, target.to(device), 255, size, False)
    loss.backward()
    want = expected(s, t, 2.0, target, 255, size, False)
    assert_matches(loss, student, teacher, want, 1e-5, 1e-5)
    assert not student.grad[0, :, 1, 1].any() and not teacher.grad[0, :, 1, 1].any()


def test_extreme_logits_across_chunks(device, monkeypatch):
    """Logits near 1e4 (the shift must come before any scaling: the interpolation itself is
    anchored) and a teacher −inf over a whole chunk of channels at one input pixel, with three
    channel chunks in both kernels: float32 accuracy against the float64 reference."""
    set_launch(monkeypatch, block_c=4, block_x=8, block_j=2)
    shape, size = (1, 10, 3, 3), (5, 7)
    generator = torch.Generator().manual_seed(21)
    s = torch.randn(shape, generator=generator, dtype=torch.float64) + 1e4
    t = torch.randn(shape, generator=generator, dtype=torch.float64) + 1e4
    t[0, :4, 1, 1] = float("-inf")
    s, t = s.float(), t.float()
    student = s.to(device).requires_grad_()
    teacher = t.to(device).requires_grad_()
    loss = run_resized(student, teacher, 0.7, None, 255, size, False)
    loss.backward()
    want = expected(student, teacher, 0.7, None, 255, size, False)
    assert_matches(loss, student, teacher, want, 1e-5, 1e-5)


def test_num_valid_and_all_ignored(device):
    student, teacher = make_pair((2, 3, 3, 4), torch.float32, device)
    size = (5, 7)
    target = make_target(2, size, 3, 255, device)
    _, num_valid = OPS.resized_pixel_kl(student.detach(), teacher.detach(), target, 255, 1.0,
                                        list(size), False)
    assert num_valid.dtype == torch.int64 and num_valid.shape == ()
    assert int(num_valid) == int((target != 255).sum())
    _, num_valid = OPS.resized_pixel_kl(student.detach(), teacher.detach(), None, 255, 1.0,
                                        list(size), False)
    assert int(num_valid) == 2 * 35
    ignored = torch.full((2, *size), 255, dtype=torch.int64, device=device)
    loss = run_resized(student, teacher, 2.0, ignored, 255, size, False)
    loss.backward()
    assert loss.item() == 0.0
    for x in (student, teacher):
        assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("wanted", ["student", "teacher"])
def test_only_requested_gradient(device, wanted):
    student, teacher = make_pair((2, 3, 3, 4), torch.float32, device)
    size = (7, 6)
    target = make_target(2, size, 3, 255, device)
    unwanted = teacher if wanted == "student" else student
    unwanted.requires_grad_(False)
    run_resized(student, teacher, 1.5, target, 255, size, False).backward()
    _, grad_s, grad_t = expected(student, teacher, 1.5, target, 255, size, False)
    x, want = (student, grad_s) if wanted == "student" else (teacher, grad_t)
    assert unwanted.grad is None
    assert relative_error(x.grad, want) <= 1e-5


@pytest.mark.parametrize(
    "flags", [(True, False), (False, True), (False, False)], ids=["student", "teacher", "none"]
)
def test_backward_op_skips_unrequested_gradient(device, flags):
    student, teacher = make_pair((2, 3, 3, 4), torch.float32, device)
    s, t = student.detach(), teacher.detach()
    _, num_valid = OPS.resized_pixel_kl(s, t, None, 255, 1.5, [5, 7], True)
    grads = OPS.resized_pixel_kl_backward(
        torch.ones((), device=device), s, t, None, num_valid, 255, 1.5, [5, 7], True, *flags
    )
    for grad, wanted, x in zip(grads, flags, (s, t)):
        assert grad.shape == (x.shape if wanted else (0,))
        assert torch.isfinite(grad).all()


def test_deterministic(device, monkeypatch):
    set_launch(monkeypatch, block_p=16, block_x=8, block_j=2)
    runs = []
    for _ in range(2):
        student, teacher = make_pair((2, 3, 3, 4), torch.float32, device)
        target = make_target(2, (7, 9), 3, 255, device)
        loss = run_resized(student, teacher, 1.5, target, 255, (7, 9), False)
        loss.backward()
        runs.append((loss.detach(), student.grad, teacher.grad))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_rejects_float64(device):
    student, teacher = make_pair((1, 2, 3, 3), torch.float64, device)
    with pytest.raises(TypeError, match="student"):
        run_resized(student, teacher, 1.0, None, 255, (5, 5), False)


def test_public_api_dispatches_here(device):
    """kdops.pixel_kl(size=..., backend="triton") runs these kernels: same loss as the op."""
    import kdops

    student, teacher = make_pair((1, 3, 3, 4), torch.float32, device)
    target = make_target(1, (6, 8), 3, 255, device)
    loss = kdops.pixel_kl(student, teacher, 1.5, target, size=(6, 8), align_corners=True,
                          backend="triton")
    op_loss, _ = OPS.resized_pixel_kl(student.detach(), teacher.detach(), target, 255, 1.5,
                                      [6, 8], True)
    assert torch.equal(loss.detach(), op_loss)


def test_opcheck(device):
    student, teacher = make_pair((2, 3, 2, 3), torch.float32, device)
    target = make_target(2, (3, 5), 3, 255, device)
    for args in ((target, 255, 1.5, [3, 5], False), (None, 255, 1.5, [3, 5], True)):
        torch.library.opcheck(OPS.resized_pixel_kl.default, (student, teacher, *args))
    s, t = student.detach(), teacher.detach()
    _, num_valid = OPS.resized_pixel_kl(s, t, target, 255, 1.5, [3, 5], False)
    grad_loss = torch.tensor(0.5, device=device)
    for flags in ((True, True), (True, False)):
        torch.library.opcheck(
            OPS.resized_pixel_kl_backward.default,
            (grad_loss, s, t, target, num_valid, 255, 1.5, [3, 5], False, *flags),
        )


@pytest.mark.needs_cuda
def test_compile_fullgraph():
    import kdops

    def loss_fn(student, teacher, target):
        return kdops.pixel_kl(student, teacher, 2.0, target, size=(128, 256), backend="triton")

    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        student, teacher = make_pair((2, 19, 16, 32), torch.float32, "cuda")
        target = make_target(2, (128, 256), 19, 255, "cuda")
        loss = fn(student, teacher, target)
        loss.backward()
        results.append((loss.detach(), student.grad, teacher.grad))
    for eager, traced in zip(*results):
        assert relative_error(traced, eager) <= 1e-6


@pytest.mark.needs_cuda
@pytest.mark.parametrize("dtype, loss_tol, grad_tol", TOLERANCES)
@pytest.mark.parametrize("align", [False, True], ids=["half-pixel", "align-corners"])
def test_apd_size_against_reference(dtype, loss_tol, grad_tol, align):
    """APD's shape class at reduced batch: (2, 19, 64, 128) → (512, 1024), 8× per side, with
    the launch heuristics of a real call (no overrides)."""
    student, teacher = make_pair((2, 19, 64, 128), dtype, "cuda")
    target = make_target(2, (512, 1024), 19, 255, "cuda")
    loss = run_resized(student, teacher, 1.0, target, 255, (512, 1024), align)
    loss.backward()
    want = expected(student, teacher, 1.0, target, 255, (512, 1024), align)
    assert_matches(loss, student, teacher, want, loss_tol, grad_tol)


# ------------------------------------------------------------------- compiled for Hopper ---
# As in test_softmax_kl_triton: the interpreter does not run Triton's compiler, so the
# launchers also run on meta tensors with each launch replaced by a compilation for sm_90;
# every compiled kernel must show no spills and at most 128 registers per thread.

REPO_ROOT = Path(__file__).resolve().parents[2]
KERNELS = ("_resized_pixel_kl_forward_kernel", "_resized_pixel_kl_backward_kernel")


def compile_for_hopper() -> list[tuple[str, int, int]]:
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class Hopper:
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
        setattr(triton_resized, name, CompileInsteadOfLaunch(getattr(triton_resized, name)))

    def run(shape, size, dtype, target_dtype=None, align=False, channels_last=False,
            grads=(True, True)):
        s = torch.empty(shape, dtype=dtype, device="meta")
        if channels_last:
            s = s.contiguous(memory_format=torch.channels_last)
        target = None
        if target_dtype is not None:
            target = torch.empty((shape[0], *size), dtype=target_dtype, device="meta")
        _, num_valid = triton_resized._forward(s, s, target, 255, 2.0, list(size), align)
        triton_resized._backward(torch.empty((), device="meta"), s, s, target, num_valid, 255,
                                 2.0, list(size), align, *grads)

    run((8, 19, 64, 128), (512, 1024), torch.float32, torch.int64)  # APD on Cityscapes
    run((8, 19, 64, 128), (512, 1024), torch.bfloat16, align=True, channels_last=True,
        grads=(False, True))
    run((2, 150, 64, 64), (512, 512), torch.float16, torch.uint8)  # ADE20K classes
    run((2, 1000, 32, 32), (64, 64), torch.float32, grads=(True, False))  # channel chunks
    run((2, 19, 128, 128), (32, 32), torch.float32, torch.int64)  # downsampling
    run((1, 1, 1, 1), (1, 1), torch.float32, torch.uint8)  # every size 1: constexpr ints

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
        [sys.executable, "-m", "tests.triton.test_resized_pixel_kl_triton", "--compile-for-hopper"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    usage = json.loads(done.stdout.splitlines()[-1])
    assert {name for name, _, _ in usage} == set(KERNELS)
    for name, registers, local in usage:
        assert local == 0, f"{name} spills {local} bytes"
        assert registers <= 128, f"{name} uses {registers} registers"


if __name__ == "__main__" and sys.argv[1:] == ["--compile-for-hopper"]:
    print(json.dumps(compile_for_hopper()))
