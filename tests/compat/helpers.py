"""Shared by the drop-in tests: seeded inputs, the precision rows, and the comparison of a
drop-in against the upstream formula (value and every input's gradient)."""
from __future__ import annotations

import inspect

import pytest
import torch

from tests.utils import cpu_and_cuda, relative_error

# (dtype, tolerance): the drop-in run in dtype against the formula in float64, as relative
# errors of the value and of each gradient (‖g − g_ref‖ / ‖g_ref‖).
PRECISIONS = [
    pytest.param(torch.float32, 1e-5, id="float32"),
    pytest.param(torch.float64, 1e-10, id="float64"),
]

# The fused backends against the reference, both in float32: the DESIGN tolerance.
BACKEND_TOL = 1e-5

# The fused-backend comparisons run on CPU tensors, and on CUDA tensors where there is a GPU.
DEVICES = cpu_and_cuda()


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def labels(n, h, w, num_classes, *, seed: int, ignore=255, ignored_pixels=3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n, h, w), generator=g)
    flat = y.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[:ignored_pixels]] = ignore
    return y


def _leaves(inputs, dtype, device="cpu"):
    return [(x.detach().to(device, dtype).requires_grad_(True) if x.is_floating_point() else x.to(device))
            if isinstance(x, torch.Tensor) else x for x in inputs]


def _grads(value, leaves):
    wanted = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
    grads = torch.autograd.grad(value.sum(), wanted, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(wanted, grads)]


def run(fn, inputs, dtype, device="cpu"):
    """fn(*inputs in dtype on device) → (value, gradients of the floating inputs)."""
    leaves = _leaves(inputs, dtype, device)
    value = fn(*leaves)
    return value, _grads(value, leaves)


def assert_matches(dropin, formula, inputs, dtype, tol):
    """dropin(*inputs in dtype) equals formula(*inputs in float64): the value and the gradient
    of every floating input (zero where the formula detaches it)."""
    value, grads = run(dropin, inputs, dtype)
    expected, expected_grads = run(formula, inputs, torch.float64)
    assert value.shape == expected.shape
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) or value.dtype == dtype
    assert relative_error(value, expected) <= tol, (value, expected)
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        if e.abs().max() == 0:
            assert g.abs().max() == 0, f"gradient {i} should be zero (detached upstream)"
        else:
            assert relative_error(g, e) <= tol, f"gradient {i}: relative error {relative_error(g, e)}"


def assert_backends_agree(make, inputs, device, modules=()):
    """make(backend) → the drop-in on that backend: auto (the fused kernels where they exist)
    equals the reference backend, value and gradients, in float32 on ``device`` (``modules``,
    the drop-in's parameters, are moved there first)."""
    for module in modules:
        module.to(device)
    value_ref, grads_ref = run(make("reference"), inputs, torch.float32, device)
    value, grads = run(make(None), inputs, torch.float32, device)
    assert relative_error(value, value_ref) <= BACKEND_TOL
    for g, e in zip(grads, grads_ref):
        assert relative_error(g, e) <= BACKEND_TOL


def parameter_names(callable_) -> list[str]:
    """The names of the arguments a user passes (self, *args, **kwargs and kdops's keyword-only
    backend left out)."""
    names = []
    for p in inspect.signature(callable_).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("self", "backend"):
            continue
        names.append(p.name)
    return names


def defaults(callable_) -> dict:
    return {p.name: p.default for p in inspect.signature(callable_).parameters.values()
            if p.default is not inspect.Parameter.empty and p.name != "backend"}
