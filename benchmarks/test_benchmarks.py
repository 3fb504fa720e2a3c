"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only``.

The same cases as ``python -m benchmarks.run`` (first shape of each op), forward+backward,
one benchmark per (op, variant). ``python -m benchmarks.run`` is the tool that writes the
results files and measures bandwidth and memory; this suite is for pytest-benchmark's
comparisons between runs (``--benchmark-autosave``, ``--benchmark-compare``).
"""
import pytest
import torch

from benchmarks.cases import cases
from benchmarks.harness import synchronize, variants

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _first_shape_per_op():
    seen, out = set(), []
    for case in cases(DEVICE, [torch.float32]):
        if case.op not in seen:
            seen.add(case.op)
            out.append(case)
    return out


PARAMS = [
    pytest.param(case, variant, id=f"{case.name}-{variant}")
    for case in _first_shape_per_op()
    for variant in variants(case, DEVICE)
]


@pytest.mark.parametrize("case,variant", PARAMS)
def test_forward_backward(benchmark, case, variant):
    fn = variants(case, DEVICE)[variant]
    tensors, kwargs = case.make_inputs(DEVICE, case.dtype)
    student = tensors[0].requires_grad_(True)

    def step():
        student.grad = None
        fn(*tensors, **kwargs).backward()
        synchronize(DEVICE)

    step()  # compile outside the timed rounds
    benchmark(step)
