"""The per-thread code of the CUDA kernels of resized_pixel_kl, built for the host and run on the
CPU: the bilinear taps against the exact fractions (bitwise) and F.interpolate, the transposed ranges
(every output that reads an input is visited), and each kernel's work items run in order in
float32 against the float64 reference and oracle.

csrc/cuda/resized_pixel_kl_threads.h is what every thread of the kernels computes (__host__
__device__ code); tests/cuda_host/resized_pixel_kl_host.cpp runs it over every work item. What
only a GPU run checks (the cuda-cuda rows of tests/ops/test_resized_pixel_kl.py): the grids, the
block reductions, the 16-bit conversions and the device's exp/log.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest
import torch

from tests.ops.resized_pixel_kl_cases import (
    ALIGN,
    RESIZE_CASES,
    assert_grad_close,
    exact_taps,
    gradient_unit,
    make_logits,
    make_target,
    output_readers,
    reference_loss_and_grads,
    resized_oracle,
    target_ignoring_readers_of,
)
from tests.utils import make_layout, relative_error

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(ROOT, "tests", "cuda_host", "resized_pixel_kl_host.cpp")
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def cuda_include_dir():
    """The CUDA toolkit's include dir (the params header names cudaStream_t), or None."""
    candidates = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            return os.path.join(home, "include")
    return None


CUDA_INCLUDE = cuda_include_dir()
I64P = ctypes.POINTER(ctypes.c_int64)
F32P = ctypes.POINTER(ctypes.c_float)


@pytest.fixture(scope="module")
def host():
    if CXX is None or CUDA_INCLUDE is None:
        reason = "no C++ compiler" if CXX is None else "no CUDA headers (cuda_runtime_api.h)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must build the host copy of the CUDA thread code: {reason}")
        pytest.skip(reason)
    build = os.path.join(ROOT, "build", "cuda_host")
    os.makedirs(build, exist_ok=True)
    library = os.path.join(build, f"resized_pixel_kl_host_{os.getpid()}.so")
    command = [CXX, "-std=c++17", "-O1", "-ffp-contract=off", "-shared", "-fPIC", "-Wall",
               "-I", os.path.join(ROOT, "csrc"), "-I", CUDA_INCLUDE, "-o", library, SOURCE]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}"
    lib = ctypes.CDLL(library)
    os.remove(library)
    lib.resized_pixel_kl_host_forward.restype = ctypes.c_float
    lib.resized_pixel_kl_host_forward.argtypes = [
        ctypes.c_void_p, I64P, ctypes.c_void_p, I64P, I64P, ctypes.c_int, ctypes.c_double,
        ctypes.c_void_p, I64P, ctypes.c_int64, I64P]
    lib.resized_pixel_kl_host_backward.restype = ctypes.c_int
    lib.resized_pixel_kl_host_backward.argtypes = [
        ctypes.c_void_p, I64P, ctypes.c_void_p, I64P, I64P, ctypes.c_int, ctypes.c_double,
        ctypes.c_void_p, I64P, ctypes.c_int64, ctypes.c_float, ctypes.c_int64,
        ctypes.c_void_p, I64P, ctypes.c_void_p, I64P, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]
    lib.resized_pixel_kl_host_taps.restype = None
    lib.resized_pixel_kl_host_taps.argtypes = [
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int, I64P, I64P, F32P]
    lib.resized_pixel_kl_host_readers.restype = None
    lib.resized_pixel_kl_host_readers.argtypes = [
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int, I64P, I64P, F32P]
    return lib


def _i64(values):
    return (ctypes.c_int64 * len(values))(*values)


def _ptr(x):
    return None if x is None else ctypes.c_void_p(x.data_ptr())


def _i64_ptr(x):
    return ctypes.cast(ctypes.c_void_p(x.data_ptr()), I64P)


def _f32_ptr(x):
    return ctypes.cast(ctypes.c_void_p(x.data_ptr()), F32P)


def host_forward(lib, s, t, tau, target, size, align_corners, ignore_index=255):
    """(loss, num_valid) of the forward kernel's per-pixel code, float32 inputs of any strides."""
    assert s.dtype == torch.float32 and t.dtype == torch.float32
    count = ctypes.c_int64(-1)
    target_strides = None if target is None else _i64(target.stride())
    loss = lib.resized_pixel_kl_host_forward(
        _ptr(s), _i64(s.stride()), _ptr(t), _i64(t.stride()), _i64([*s.shape, *size]),
        int(align_corners), tau, _ptr(target), target_strides, ignore_index, ctypes.byref(count))
    return loss, count.value


# The second backward kernel: "tiled" (the launcher's choice: the tiled gather, a block of 256
# threads, where its tiles fit), "tiled-3" (tiles of at most 3 input columns: many tiles per row,
# their edges inside small images) or "per-thread" (the launcher's fallback).
PATHS = {"tiled": (0, 256), "tiled-3": (0, 3), "per-thread": (1, 256)}
GATHER = [pytest.param(name, id=name) for name in PATHS]


def host_backward(lib, s, t, tau, target, size, align_corners, grad_loss, num_valid,
                  want=(True, True), grad_layout="contiguous", ignore_index=255, gather="tiled",
                  expect_path=None):
    """(grad_student, grad_teacher) of the backward kernels' per-item code; the outputs start as
    NaN (an element left unwritten shows), in grad_layout. gather: "tiled" or "per-thread", or
    (path, threads) for the tiled gather with another block size; expect_path: the path (0 tiled,
    1 per-thread) the launcher must take."""
    n = s.shape[0]
    grads = [make_layout(torch.full(s.shape, float("nan")), grad_layout) if w else None for w in want]
    stats = torch.full((n * size[0] * size[1] * 5,), float("nan"))
    target_strides = None if target is None else _i64(target.stride())
    taken = lib.resized_pixel_kl_host_backward(
        _ptr(s), _i64(s.stride()), _ptr(t), _i64(t.stride()), _i64([*s.shape, *size]),
        int(align_corners), tau, _ptr(target), target_strides, ignore_index, grad_loss, num_valid,
        _ptr(grads[0]), None if grads[0] is None else _i64(grads[0].stride()),
        _ptr(grads[1]), None if grads[1] is None else _i64(grads[1].stride()), _ptr(stats),
        *(PATHS[gather] if isinstance(gather, str) else gather))
    if expect_path is not None:
        assert taken == expect_path, f"the launcher took path {taken}, not {expect_path}"
    return grads[0], grads[1]


def host_loss_and_grads(lib, s, t, tau, target, size, align_corners, **kwargs):
    loss, count = host_forward(lib, s, t, tau, target, size, align_corners)
    grad_s, grad_t = host_backward(lib, s, t, tau, target, size, align_corners, 1.0, count, **kwargs)
    return loss, count, grad_s, grad_t


# ---------------------------------------------------------------------------------------------
# The taps and their transpose

# (in, out) along one axis: the APD sizes (8× up), odd factors, down, size 1 either side.
AXES = [(64, 512), (128, 1024), (65, 513), (512, 64), (1024, 97), (7, 3), (3, 7), (1, 9),
        (9, 1), (1, 1), (2, 2048), (33, 100), (100, 33), (5, 6), (6, 5), (257, 1025)]


@pytest.mark.parametrize("align_corners", ALIGN)
def test_taps_are_the_exact_fractions(host, align_corners):
    """i0, i1 equal and λ bitwise equal to the exact fraction's, rounded once to float32."""
    for in_size, out_size in AXES:
        i0 = torch.empty(out_size, dtype=torch.int64)
        i1 = torch.empty(out_size, dtype=torch.int64)
        lam = torch.empty(out_size, dtype=torch.float32)
        host.resized_pixel_kl_host_taps(in_size, out_size, int(align_corners), _i64_ptr(i0),
                                        _i64_ptr(i1), _f32_ptr(lam))
        e0, e1, elam = exact_taps(in_size, out_size, align_corners, torch.float32)
        case = (in_size, out_size)
        assert torch.equal(i0, e0), case
        assert torch.equal(i1, e1), case
        assert torch.equal(lam.view(torch.int32), elam.view(torch.int32)), case


@pytest.mark.parametrize("align_corners", ALIGN)
def test_taps_are_f_interpolate_positions(host, align_corners):
    """The same positions as F.interpolate's float32 ones up to their round-off: the float32
    position i0 + λ within 2e-6·in of F.interpolate's weights applied to a ramp."""
    for in_size, out_size in AXES:
        i0 = torch.empty(out_size, dtype=torch.int64)
        i1 = torch.empty(out_size, dtype=torch.int64)
        lam = torch.empty(out_size, dtype=torch.float32)
        host.resized_pixel_kl_host_taps(in_size, out_size, int(align_corners), _i64_ptr(i0),
                                        _i64_ptr(i1), _f32_ptr(lam))
        ramp = torch.arange(in_size, dtype=torch.float64).reshape(1, 1, 1, in_size)
        expected = torch.nn.functional.interpolate(
            ramp, size=(1, out_size), mode="bilinear", align_corners=align_corners).flatten()
        position = i0.double() + torch.where(i1 > i0, lam.double(), torch.zeros(()))
        assert (position - expected).abs().max().item() <= 2e-6 * in_size, (in_size, out_size)


@pytest.mark.parametrize("align_corners", ALIGN)
def test_readers_are_exactly_the_outputs_that_read(host, align_corners):
    """Every output of nonzero weight on input r lies in r's range [begin, end); the range holds
    nothing else but outputs of weight 0 on r that read r − 1 (i0 = r − 1, λ = 0); the weights are
    bitwise the reference's in float32."""
    for in_size, out_size in AXES:
        begin = torch.empty(in_size, dtype=torch.int64)
        end = torch.empty(in_size, dtype=torch.int64)
        weights = torch.empty(out_size, in_size, dtype=torch.float32)
        host.resized_pixel_kl_host_readers(in_size, out_size, int(align_corners), _i64_ptr(begin),
                                           _i64_ptr(end), _f32_ptr(weights))
        i0, _, lam = exact_taps(in_size, out_size, align_corners, torch.float32)
        expected = output_readers(in_size, out_size, align_corners, torch.float32)
        case = (in_size, out_size)
        assert torch.equal(weights, expected), case
        outputs = torch.arange(out_size)
        for r in range(in_size):
            inside = (outputs >= begin[r]) & (outputs < end[r])
            reads = weights[:, r] > 0
            assert not (reads & ~inside).any(), (case, r)
            extra = inside & ~reads
            assert ((i0[extra] == r - 1) & (lam[extra] == 0)).all(), (case, r)


# ---------------------------------------------------------------------------------------------
# The kernels' work against the reference


@pytest.mark.parametrize("gather", GATHER)
@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("shape,size", RESIZE_CASES)
@pytest.mark.parametrize("with_target", [False, True], ids=["no-target", "target"])
def test_matches_reference(host, shape, size, align_corners, with_target, gather):
    s, t = make_logits(shape)
    target = make_target(shape[0], size, shape[1]) if with_target else None
    loss, count, grad_s, grad_t = host_loss_and_grads(host, s, t, 1.0, target, size, align_corners,
                                                      gather=gather)
    expected, grad_s_ref, grad_t_ref = reference_loss_and_grads(s, t, 1.0, target, size, align_corners)
    assert relative_error(torch.tensor(loss), expected) <= 1e-5, (loss, expected.item())
    assert count == (shape[0] * size[0] * size[1] if target is None else int((target != 255).sum()))
    unit = gradient_unit(size, shape[0], 1.0, target)
    assert_grad_close(grad_s, grad_s_ref, 1e-5, "student", unit)
    assert_grad_close(grad_t, grad_t_ref, 1e-5, "teacher", unit)


@pytest.mark.parametrize("gather", GATHER)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("align_corners", ALIGN)
def test_any_strides(host, layout, align_corners, gather):
    """Inputs, target and gradients of other layouts (a strided target too): the same values."""
    shape, size = (2, 5, 3, 7), (8, 11)
    s, t = make_logits(shape)
    target = make_layout(make_target(2, size, 5), "strided" if layout == "strided" else "contiguous")
    a, b = make_layout(s, layout), make_layout(t, layout)
    loss, count, grad_s, grad_t = host_loss_and_grads(host, a, b, 1.0, target, size, align_corners,
                                                      grad_layout=layout, gather=gather)
    expected, grad_s_ref, grad_t_ref = reference_loss_and_grads(s, t, 1.0, target, size, align_corners)
    assert relative_error(torch.tensor(loss), expected) <= 1e-5
    unit = gradient_unit(size, 2, 1.0, target)
    assert_grad_close(grad_s, grad_s_ref, 1e-5, "student", unit)
    assert_grad_close(grad_t, grad_t_ref, 1e-5, "teacher", unit)


@pytest.mark.parametrize("tau", [0.5, 4.0], ids=["tau0.5", "tau4"])
def test_tau_and_grad_loss(host, tau):
    shape, size = (2, 4, 5, 6), (17, 9)
    s, t = make_logits(shape)
    target = make_target(2, size, 4)
    loss, count = host_forward(host, s, t, tau, target, size, True)
    grad_s, grad_t = host_backward(host, s, t, tau, target, size, True, 2.5, count)
    expected, grad_s_ref, grad_t_ref = reference_loss_and_grads(s, t, tau, target, size, True)
    assert relative_error(torch.tensor(loss), expected) <= 1e-5
    unit = 2.5 * gradient_unit(size, 2, tau, target)
    assert_grad_close(grad_s, 2.5 * grad_s_ref, 1e-5, "student", unit)
    assert_grad_close(grad_t, 2.5 * grad_t_ref, 1e-5, "teacher", unit)


@pytest.mark.parametrize("gather", GATHER)
@pytest.mark.parametrize("wanted", ["student", "teacher"])
def test_one_gradient_requested(host, wanted, gather):
    shape, size = (2, 3, 4, 5), (9, 12)
    s, t = make_logits(shape)
    _, count = host_forward(host, s, t, 1.0, None, size, False)
    want = (wanted == "student", wanted == "teacher")
    grad_s, grad_t = host_backward(host, s, t, 1.0, None, size, False, 1.0, count, want=want,
                                   gather=gather)
    _, grad_s_ref, grad_t_ref = reference_loss_and_grads(s, t, 1.0, None, size, False)
    unit = gradient_unit(size, 2, 1.0, None)
    if wanted == "student":
        assert grad_t is None
        assert_grad_close(grad_s, grad_s_ref, 1e-5, "student", unit)
    else:
        assert grad_s is None
        assert_grad_close(grad_t, grad_t_ref, 1e-5, "teacher", unit)


@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("shape,size,path", [
    pytest.param((1, 3, 2, 40), (3, 2000), 0, id="tiles-halved-40x50"),
    pytest.param((1, 2, 2, 3), (3, 2000), 1, id="per-thread-fallback-3-to-2000"),
    pytest.param((2, 3, 3, 300), (5, 301), 0, id="several-tiles-w300"),
])
def test_launcher_paths(host, shape, size, path, align_corners):
    """The launcher's choice: tiles halved until their span fits, the per-thread gather when not
    even one column's readers fit, several tiles of 256 columns per row; each against the
    reference."""
    s, t = make_logits(shape)
    target = make_target(shape[0], size, shape[1])
    loss, count = host_forward(host, s, t, 1.0, target, size, align_corners)
    grad_s, grad_t = host_backward(host, s, t, 1.0, target, size, align_corners, 1.0, count,
                                   expect_path=path)
    expected, grad_s_ref, grad_t_ref = reference_loss_and_grads(s, t, 1.0, target, size, align_corners)
    assert relative_error(torch.tensor(loss), expected) <= 1e-5
    unit = gradient_unit(size, shape[0], 1.0, target)
    assert_grad_close(grad_s, grad_s_ref, 1e-5, "student", unit)
    assert_grad_close(grad_t, grad_t_ref, 1e-5, "teacher", unit)


# ---------------------------------------------------------------------------------------------
# Extreme inputs, against the float64 oracle


@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("offset", [1e3, 1e4], ids=["plus-1e3", "plus-1e4"])
def test_large_offset_logits(host, align_corners, offset):
    """Logits near 1e4: a float32 interpolation of the raw values rounds them at ~1e-3, which
    would show as loss and gradient errors ≥ 1e-4; the anchored interpolation keeps float32
    accuracy."""
    shape, size = (2, 7, 5, 6), (19, 23)
    g = torch.Generator().manual_seed(7)
    s = torch.randn(shape, generator=g) + offset
    t = torch.randn(shape, generator=g) + offset
    for tau in (1.0, 0.5):
        loss, count, grad_s, grad_t = host_loss_and_grads(host, s, t, tau, None, size, align_corners)
        expected, grad_s_ref, grad_t_ref = resized_oracle(s, t, tau, None, size, align_corners)
        assert relative_error(torch.tensor(loss), expected) <= 1e-5, (loss, expected.item())
        assert relative_error(grad_s, grad_s_ref) <= 1e-5
        assert relative_error(grad_t, grad_t_ref) <= 1e-5


@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("masked", [0, 2], ids=["channel0", "channel2"])
def test_channel_masked_at_minus_1e4(host, align_corners, masked):
    """A class masked with a large negative logit (−1e4, the float16-safe −inf) in both inputs:
    float32 accuracy in the other channels (the anchor is the largest logit, not any one channel's)."""
    shape, size = (2, 5, 4, 6), (13, 11)
    s, t = make_logits(shape, seed=3)
    s[:, masked] = -1e4
    t[:, masked] = -1e4
    loss, _, grad_s, grad_t = host_loss_and_grads(host, s, t, 1.0, None, size, align_corners)
    expected, grad_s_ref, grad_t_ref = resized_oracle(s, t, 1.0, None, size, align_corners)
    assert relative_error(torch.tensor(loss), expected) <= 1e-5, (loss, expected.item())
    assert relative_error(grad_s, grad_s_ref) <= 1e-5
    assert relative_error(grad_t, grad_t_ref) <= 1e-5


@pytest.mark.parametrize("gather", GATHER)
@pytest.mark.parametrize("align_corners", ALIGN)
def test_teacher_minus_inf_is_probability_zero(host, align_corners, gather):
    """A teacher −inf at an input pixel is p = 0 at every output that reads it (nonzero weight):
    finite loss and gradients, equal to the oracle's; with the student −inf there too."""
    shape, size = (2, 5, 4, 6), (13, 11)
    s, t = make_logits(shape, seed=13)
    t[0, 1, 0, 0] = float("-inf")
    t[1, 3, 2, 4] = float("-inf")
    t[1, :2, 3, 5] = float("-inf")
    for student_too in (False, True):
        s_case = s.clone()
        if student_too:
            s_case[t == float("-inf")] = float("-inf")
        loss, _, grad_s, grad_t = host_loss_and_grads(host, s_case, t, 1.0, None, size, align_corners,
                                                      gather=gather)
        expected, grad_s_ref, grad_t_ref = resized_oracle(s_case, t, 1.0, None, size, align_corners)
        assert torch.isfinite(torch.tensor(loss))
        assert relative_error(torch.tensor(loss), expected) <= 1e-5, (loss, expected.item())
        assert torch.isfinite(grad_s).all() and torch.isfinite(grad_t).all()
        assert relative_error(grad_s, grad_s_ref) <= 1e-5
        assert relative_error(grad_t, grad_t_ref) <= 1e-5


def test_student_minus_inf_gives_infinite_loss(host):
    shape, size = (1, 3, 4, 4), (8, 8)
    s, t = make_logits(shape)
    s[0, 1, 2, 2] = float("-inf")
    loss, _ = host_forward(host, s, t, 1.0, None, size, False)
    assert loss == float("inf")


@pytest.mark.parametrize("gather", GATHER)
@pytest.mark.parametrize("align_corners", ALIGN)
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_input_read_only_by_ignored_pixels_reaches_nothing(host, align_corners, fill, gather):
    """NaN/±inf at an input pixel whose every reader (nonzero weight) is ignored: loss and
    gradients equal the clean inputs' oracle, and that pixel's gradients are exactly 0."""
    shape, size = (2, 3, 5, 6), (17, 19)
    s, t = make_logits(shape)
    pixel = (2, 3)
    target = target_ignoring_readers_of(2, size, shape[2:], pixel, align_corners, 3)
    expected, grad_s_ref, grad_t_ref = resized_oracle(s, t, 1.0, target, size, align_corners)
    s[:, :, pixel[0], pixel[1]] = fill
    t[:, :, pixel[0], pixel[1]] = fill
    loss, _, grad_s, grad_t = host_loss_and_grads(host, s, t, 1.0, target, size, align_corners,
                                                  gather=gather)
    assert relative_error(torch.tensor(loss), expected) <= 1e-5
    assert torch.isfinite(grad_s).all() and torch.isfinite(grad_t).all()
    assert relative_error(grad_s, grad_s_ref) <= 1e-5
    assert relative_error(grad_t, grad_t_ref) <= 1e-5
    assert not grad_s[:, :, pixel[0], pixel[1]].any() and not grad_t[:, :, pixel[0], pixel[1]].any()


@pytest.mark.parametrize("gather", GATHER)
def test_all_pixels_ignored_with_nan_inputs(host, gather):
    """Every output ignored, NaN logits: loss 0, count 0, gradients exactly 0."""
    shape, size = (2, 3, 4, 5), (9, 7)
    s = torch.full(shape, float("nan"))
    t = torch.full(shape, float("nan"))
    target = torch.full((2, *size), 255)
    loss, count, grad_s, grad_t = host_loss_and_grads(host, s, t, 1.0, target, size, False,
                                                      gather=gather)
    assert loss == 0.0 and count == 0
    assert torch.equal(grad_s, torch.zeros(shape)) and torch.equal(grad_t, torch.zeros(shape))
