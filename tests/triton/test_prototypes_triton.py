"""The Triton kernels of the prototype ops with launch sizes small enough that tiny inputs
cross every boundary: several pixel tiles per image, several pixel splits per class-sum program,
several channel chunks and class blocks, ragged ends of each.

Without a GPU these run on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py); every
launcher buffer starts as NaN (kdops.triton._launch.POISON_OUTPUTS), so a pass also proves each output is written.
The op-level cases (every backend against the reference) are in tests/ops/test_prototypes.py.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import kdops  # noqa: E402
from kdops import backend as kd_backend  # noqa: E402
from kdops.reference import prototypes as ref  # noqa: E402
from kdops.triton import prototypes as triton_prototypes  # noqa: E402
from tests.ops.test_prototypes import (  # noqa: E402
    check_kl, check_pool, check_variation, kl_inputs, make_features, make_labels,
)
from tests.utils import cpu_and_cuda  # noqa: E402

SMALL_BLOCKS = {"block_p": 16, "block_c": 16, "block_k": 16, "splits": 3}


@pytest.fixture(params=cpu_and_cuda())
def device(request):
    if request.param == "cpu" and not kd_backend.triton_interpreting():
        pytest.skip("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    return request.param


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr("kdops.triton._launch.POISON_OUTPUTS", True)
    monkeypatch.setattr(triton_prototypes, "_LAUNCH_OVERRIDES", dict(SMALL_BLOCKS))


# 37 channels: three 16-channel chunks with a ragged end; 9×11 = 99 pixels: seven 16-pixel
# tiles in three splits; K = 35: three 16-class blocks.
SHAPE, K, LABEL_SIZE = (2, 37, 9, 11), 35, (17, 23)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("per_image", [True, False], ids=["per-image", "per-batch"])
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
def test_prototype_pool_crosses_blocks(device, layout, per_image, normalize):
    labels = make_labels(SHAPE[0], LABEL_SIZE, K, device)
    x = make_features(SHAPE, torch.float32, layout, device)
    check_pool("triton", x, labels, K, 1e-5, 1e-5, per_image, normalize=normalize)


@pytest.mark.parametrize("per_image", [True, False], ids=["per-image", "per-batch"])
def test_prototype_kl_crosses_blocks(device, per_image):
    inputs = kl_inputs(SHAPE, 20, K, LABEL_SIZE, torch.float32, "channels_last", device, per_image)
    check_kl("triton", *inputs, 0.1, 1e-5, 1e-5)


def test_class_variation_loss_crosses_blocks(device):
    labels = make_labels(SHAPE[0], LABEL_SIZE, K, device)
    s = make_features(SHAPE, torch.float32, "contiguous", device, seed=3)
    t = make_features((SHAPE[0], 21, *SHAPE[2:]), torch.float32, "channels_last", device, seed=4)
    check_variation("triton", s, t, labels, K, 1e-5, 1e-5)


def test_out_of_range_labels_assert_on_the_device(device):
    """The kernels flag a label outside [0, K) and the launcher asserts on the device (no host
    sync): on CPU tensors the assert raises at once."""
    labels = make_labels(2, (5, 6), 3, device)
    labels[1, 2, 3] = 7
    x = make_features((2, 4, 5, 6), torch.float32, "contiguous", device)
    with pytest.raises(RuntimeError, match="labels hold a value outside"):
        torch.ops.kdops_triton.prototype_pool(x, labels, 3, 255, True, False)
        if device == "cuda":
            torch.cuda.synchronize()


def test_prototype_kl_refuses_too_many_classes(device):
    x = make_features((1, 3, 2, 2), torch.float32, "contiguous", device)
    protos = torch.zeros(300, 3, device=device)
    counts = torch.ones(300, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="student_protos"):
        kdops.prototype_kl(x, x, protos, protos, counts, backend="triton")


def test_features_never_reach_the_observations_in_memory(device, monkeypatch):
    """No buffer of K × L floats is allocated by the forward (the cosines stay in registers)."""
    inputs = kl_inputs((1, 8, 16, 16), 8, 20, (16, 16), torch.float32, "contiguous", device, True)
    s, t, ps, pt, counts = inputs
    allocated = []
    original = triton_prototypes.new_buffer

    def recording(shape, dtype, dev):
        allocated.append(tuple(shape) if not isinstance(shape, int) else (shape,))
        return original(shape, dtype, dev)

    monkeypatch.setattr(triton_prototypes, "new_buffer", recording)
    kdops.prototype_kl(s, t, ps, pt, counts, backend="triton")
    pixels = 16 * 16
    for shape in allocated:
        numel = 1
        for v in shape:
            numel *= v
        assert numel < 20 * pixels, f"forward allocated {shape}"
    assert ref.prototype_kl(s, t, ps, pt, counts).isfinite()
