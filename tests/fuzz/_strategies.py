"""Building blocks of the property-based fuzz suite: examples, backends, tensors, tolerances.

An op family plugs in with one file, ``tests/fuzz/test_<family>.py``, that for each op and
backend draws inputs with the strategies here, computes the answer with a float64 oracle
written in that file from the formulas of DESIGN.md, and checks the backend with
:func:`assert_close`, :func:`assert_unchanged` and :func:`assert_bitwise_equal`.

The tolerance rule (DESIGN.md "Numerics", made precise for randomised inputs)
-----------------------------------------------------------------------------
A backend's result r is judged against the exact result x (the float64 oracle on the very
values the backend saw, i.e. after rounding the inputs to their dtype) by

    ‖r − x‖ ≤ max(tol · ‖x‖,  C · u · κ + 2 · ‖round_dtype(x) − x‖)

* tol is DESIGN.md's: loss 1e-5 (float32) / 1e-4 (16-bit); gradient 1e-5 / 2e-3 (float16) /
  1e-2 (bfloat16); 1e-12 for float64.
* u is the unit round-off of the arithmetic the kernels do: float32 (2⁻²⁴) for 16- and 32-bit
  inputs, float64 (2⁻⁵³) for float64 inputs; C = 16 (a handful of operations per term).
* κ ("condition") is computed by the oracle, per case, in float64: the size of what float32
  round-off in the op's well-ordered algorithm can move the result by — e.g. for a softmax
  KL, Σ_i p_i (|x_i − m|/τ + log Z) per row plus the sums' magnitudes. It is large exactly where
  no float32 algorithm can be accurate (τ = 1e6: the KL is 1e-12 of the log-sum-exps it is
  the difference of), and it never excuses an error that the shift-safe algorithm avoids
  (x/τ formed at the magnitude of x would err by u·|x|/τ, far above κ's u·|x − m|/τ).
* ‖round_dtype(x) − x‖ is the error of merely storing the exact result in the output dtype
  (gradients come back in the input's dtype; float16 subnormals lose most of their digits).
* An exact value beyond the output dtype's range must come back as the ±inf it rounds to
  (a float16 gradient of order τ at τ = 1e6), and is left out of the norms above; where the
  bound itself exceeds the stored dtype's range, ±inf (never NaN) is within round-off.

So a fused kernel passes when it is as accurate as DESIGN.md asks, or when float32 round-off
that the specified algorithm cannot avoid explains its error — never because a looser number
was typed in.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st

from kdops import backend as kd_backend

# ---------------------------------------------------------------------------------------------
# examples per test

_EXAMPLES = int(os.environ.get("KDOPS_FUZZ_EXAMPLES", "0") or 0)

# CI's fast profile: examples per (op, backend) test. Triton runs under its interpreter on
# GPU-less machines (each call costs ~0.1 s), so it gets fewer, smaller cases.
DEFAULT_EXAMPLES = {"reference": 120, "cpu": 120, "cuda": 120, "triton": 25}


def examples(backend: str, default: int | None = None) -> settings:
    """The hypothesis settings of a test of ``backend``: $KDOPS_FUZZ_EXAMPLES or the default."""
    return settings(max_examples=_EXAMPLES or default or DEFAULT_EXAMPLES[backend])


def deep() -> bool:
    """True for the deep run (KDOPS_FUZZ_EXAMPLES set): larger shapes are allowed."""
    return _EXAMPLES > 0


# ---------------------------------------------------------------------------------------------
# backends


def backends(op: str) -> list:
    """(device, backend) params for ``op``: the reference on CPU and every fused backend.

    A backend the op has but that cannot run here (no GPU, extension not built) shows up as a
    skipped case saying why, so a missing build is never silently green.
    """
    params = [pytest.param("cpu", "reference", id="cpu-reference")]
    for device in ("cpu", "cuda"):
        for name in ("cpu", "cuda", "triton"):
            if kd_backend.OPS[op].implementation_path(name) is None:
                continue
            if name in ("cpu", "cuda") and name != device:
                continue
            marks = []
            if device == "cuda" and not torch.cuda.is_available():
                marks.append(pytest.mark.skip(reason="no CUDA device on this machine"))
            else:
                reason = kd_backend.unavailable_reason(op, name, device, torch.float32)
                if reason is not None:
                    marks.append(pytest.mark.skip(reason=reason))
            params.append(pytest.param(device, name, marks=marks, id=f"{device}-{name}"))
    return params


def dtypes(backend: str):
    """The input dtypes ``backend`` takes (float64 on the reference and the CPU kernels)."""
    return st.sampled_from(
        [d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
         if backend == "reference" or d in kd_backend.BACKEND_DTYPES[backend]]
    )


# ---------------------------------------------------------------------------------------------
# shapes, values and layouts

LAYOUTS = ("contiguous", "channels_last", "sliced", "expanded", "transposed_hw")
LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@st.composite
def nchw(draw, *, max_numel: int, max_channels: int = 64, max_side: int = 64, min_channels: int = 1):
    """An (N, C, H, W) shape with at most ``max_numel`` elements.

    Odd sizes, size-1 dims, long rows (one side up to ``max_side``) and many channels all
    occur; sizes are drawn so the product stays under the budget.
    """
    n = draw(st.integers(1, 3))
    c = draw(st.integers(min_channels, max(min_channels, min(max_channels, max_numel // n))))
    budget = max(1, max_numel // (n * c))
    h = draw(st.integers(1, max(1, min(max_side, budget))))
    w = draw(st.integers(1, max(1, min(max_side, budget // h))))
    return (n, c, h, w)


@st.composite
def magnitudes(draw):
    """(scale, offset) of random values: tiny to large spreads, around 0 or far from it."""
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 3.0, 30.0]))
    offset = draw(st.sampled_from([0.0, 0.0, 0.0, 1e3, -1e3, 1e4]))
    return scale, offset


def seeds():
    return st.integers(0, 2**31 - 1)


def random_tensor(shape, dtype, seed: int, *, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """offset + scale · randn, rounded to ``dtype``, contiguous, on CPU."""
    g = torch.Generator().manual_seed(seed)
    return (offset + scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def with_layout(x: torch.Tensor, layout: str, *, dim: int = -1) -> torch.Tensor:
    """``x``'s values in another memory layout (``expanded`` changes the values, see below).

    contiguous; channels_last (4-D); sliced: every other element of a buffer twice as long
    along ``dim``; expanded: stride 0 along ``dim`` (the values become those of index 0 there,
    broadcast); transposed_hw: H and W strides swapped (a transposed buffer, transposed back).
    """
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x.contiguous()
    dim = dim % x.dim()
    if layout == "sliced":
        shape = list(x.shape)
        shape[dim] *= 2
        wide = torch.full(shape, float("nan"), dtype=x.dtype, device=x.device)
        view = wide[(slice(None),) * dim + (slice(None, None, 2),)]
        view.copy_(x)
        return view
    if layout == "expanded":
        return x.narrow(dim, 0, 1).expand(x.shape)
    if layout == "transposed_hw":
        if x.dim() < 4:
            return x.contiguous()
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    raise ValueError(f"unknown layout {layout!r}")


@st.composite
def label_maps(draw, shape, num_classes: int, *, dtypes=LABEL_DTYPES):
    """(labels, ignore_index): an integer map of ``shape`` with values in [0, num_classes) and
    a random fraction (0 to 1) of ignored pixels; ignore_index is one the dtype can hold."""
    dtype = draw(st.sampled_from([d for d in dtypes if torch.iinfo(d).max >= num_classes]))
    info = torch.iinfo(dtype)
    ignore_index = draw(st.sampled_from(
        [v for v in (255, -1, num_classes, info.max) if info.min <= v <= info.max and not 0 <= v < num_classes]
    ))
    ignored = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 0.9, 1.0]))
    g = torch.Generator().manual_seed(draw(seeds()))
    labels = torch.randint(0, num_classes, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignored] = ignore_index
    return labels.to(dtype), ignore_index


# ---------------------------------------------------------------------------------------------
# tolerances and checks

LOSS_TOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4, torch.float64: 1e-12}
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
ROUNDOFF_FACTOR = 16.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """u of the arithmetic the kernels do for inputs of ``dtype`` (float32, or float64)."""
    return 2.0**-53 if dtype == torch.float64 else 2.0**-24


def storage_error(exact: torch.Tensor, dtype: torch.dtype) -> float:
    """‖round_dtype(x) − x‖: the error of storing the exact result in ``dtype``."""
    exact = exact.detach().double().cpu()
    return (exact.to(dtype).double() - exact).norm().item()


def assert_close(what: str, actual, exact, *, tol: float, dtype: torch.dtype, condition: float = 0.0):
    """‖actual − exact‖ ≤ max(tol·‖exact‖, C·u·condition + 2·storage error) (module docstring).

    ``exact`` is float64; ``condition`` the oracle's κ for this quantity (same norm).
    """
    actual = torch.as_tensor(actual).detach()
    stored_dtype = actual.dtype  # what the backend returned its result in
    actual = actual.double().cpu()
    exact = torch.as_tensor(exact).detach().double().cpu()
    assert actual.shape == exact.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    if not torch.isfinite(exact).all():
        same = (actual == exact) | (torch.isnan(actual) & torch.isnan(exact))
        assert same.all(), f"{what}: expected {exact}, got {actual}"
        return
    out_dtype = dtype if actual.dim() > 0 else exact.dtype
    # An exact value beyond the range of the dtype the result is stored in rounds to ±inf (IEEE
    # round to nearest; e.g. a float16 gradient τ·(p_s − p_t) at τ = 1e6): there the only right
    # answer is that inf.
    rounded = exact.to(stored_dtype).double()
    overflow = torch.isinf(rounded)
    if overflow.any():
        assert torch.equal(actual[overflow], rounded[overflow]), (
            f"{what}: exact values beyond {stored_dtype}'s range must round to "
            f"{rounded[overflow].tolist()[:4]}, got {actual[overflow].tolist()[:4]}"
        )
        actual, exact = actual[~overflow], exact[~overflow]
    bound = max(
        tol * exact.norm().item(),
        ROUNDOFF_FACTOR * unit_roundoff(dtype) * condition + 2 * storage_error(exact, out_dtype),
    )
    if stored_dtype.is_floating_point and bound >= torch.finfo(stored_dtype).max:
        # The round-off the algorithm cannot avoid reaches past the stored dtype's range (float16
        # features of 1e4, where the exact gradient is 0 and float32 Grams of 1e10 round by 1e3):
        # an inf there is a rounded value, not a failure. NaN never is.
        assert not torch.isnan(actual).any(), f"{what}: NaN where the exact result is finite"
        finite = torch.isfinite(actual)
        actual, exact = actual[finite], exact[finite]
    assert torch.isfinite(actual).all(), f"{what}: non-finite values where the exact result is finite"
    error = (actual - exact).norm().item()
    assert error <= bound, (
        f"{what}: error {error:.3e} > bound {bound:.3e} (|exact| {exact.norm().item():.3e}, "
        f"tol {tol:g}, condition {condition:.3e})"
    )


def snapshot(*tensors):
    """Copies (values and strides) of the inputs, to prove later that nothing wrote to them."""
    return [None if t is None else (t.clone(), t.stride()) for t in tensors]


def assert_unchanged(names, tensors, snapshots) -> None:
    for name, tensor, snap in zip(names, tensors, snapshots):
        if tensor is None:
            continue
        copy, stride = snap
        assert tensor.stride() == stride, f"{name}: strides changed"
        assert torch.equal(tensor.isnan(), copy.isnan()), f"{name} was modified"
        assert torch.equal(tensor.nan_to_num(), copy.nan_to_num()), f"{name} was modified"


def assert_bitwise_equal(what: str, first, second) -> None:
    """Repeated calls give bitwise the same result (NaN patterns included)."""
    a = torch.as_tensor(first).detach()
    b = torch.as_tensor(second).detach()
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: dtype/shape differ between calls"
    if a.is_floating_point():
        a = a.view(torch.int16 if a.element_size() == 2 else torch.int32 if a.element_size() == 4 else torch.int64)
        b = b.view(a.dtype)
    assert torch.equal(a, b), f"{what}: repeated calls differ"
