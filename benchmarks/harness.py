"""Timing, memory and saved-tensor measurement shared by every op benchmark.

A :class:`Case` is one op at one shape and dtype. For each *variant* of the op — the
reference in eager mode ("eager"), ``torch.compile`` of the reference ("compile"), and each
kdops backend that can run on the device — :func:`measure` reports, for forward and
forward+backward:

* ``ms``: the median of many timed repeats (``triton.testing.do_bench`` on GPU, which uses
  CUDA events and flushes L2; ``time.perf_counter`` around a synchronised call on CPU);
* ``gbps``: effective bandwidth, the minimal bytes the op must move divided by the time;
* ``peak_mb``: GPU memory added at the peak, beyond the inputs (``None`` on CPU);
* ``saved_mb``: bytes autograd keeps for backward beyond the inputs themselves (eager
  variants; ``None`` for compiled graphs, whose saved tensors the hooks don't see).
"""
from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kdops import backend as kd_backend


@dataclass
class Case:
    """One op at one shape/dtype.

    ``make_inputs(device, dtype)`` returns ``(tensors, kwargs)``: the float tensors that get
    gradients come first (``grad_inputs`` of them require grad — the student only, as in
    training, where the teacher is frozen), and ``kwargs`` are passed through.
    ``reference`` is the plain-PyTorch function; ``op`` the kdops public function.
    ``bytes_fwd``/``bytes_fwd_bwd`` give the minimal traffic for the bandwidth figure.
    """

    name: str
    op: str
    shape: str
    dtype: torch.dtype
    make_inputs: Callable
    reference: Callable
    public: Callable
    bytes_fwd: int
    bytes_fwd_bwd: int
    grad_inputs: int = 1


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, *, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()``."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=max(100, repeats * 5),
                                             return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def saved_bytes(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves during ``fn()`` that are not views of ``inputs``."""
    input_storages = {t.untyped_storage().data_ptr() for t in inputs}
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        nonlocal total
        if ptr not in input_storages and ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def peak_added_mb(fn: Callable[[], object], device: str) -> float | None:
    """GPU memory allocated at the peak of ``fn()`` beyond what was allocated before it."""
    if device != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def variants(case: Case, device: str) -> dict[str, Callable]:
    """name → callable(tensors, kwargs) for every variant that can run on ``device``."""
    out: dict[str, Callable] = {"eager": case.reference}
    compiled = torch.compile(case.reference, dynamic=False)
    out["compile"] = compiled
    for name in ("cpu", "cuda", "triton"):
        if kd_backend.unavailable_reason(case.op, name, device, case.dtype) is None:
            out[name] = lambda *a, _b=name, **k: case.public(*a, backend=_b, **k)
    return out


def measure(case: Case, device: str, *, repeats: int, only: tuple[str, ...] | None = None) -> list[dict]:
    """One result row per variant: forward and forward+backward timings and memory."""
    rows = []
    tensors, kwargs = case.make_inputs(device, case.dtype)
    grads = tensors[: case.grad_inputs]
    for variant, fn in variants(case, device).items():
        if only and variant not in only:
            continue

        def forward():
            with torch.no_grad():
                return fn(*tensors, **kwargs)

        def forward_backward():
            for t in grads:
                t.grad = None
            for t in grads:
                t.requires_grad_(True)
            loss = fn(*tensors, **kwargs)
            loss = loss if loss.dim() == 0 else loss.float().square().sum()
            loss.backward()
            for t in grads:
                t.requires_grad_(False)

        try:
            forward_backward()  # compile / autotune outside the timed region
            fwd_ms = time_ms(forward, device, repeats=repeats)
            fb_ms = time_ms(forward_backward, device, repeats=repeats)
            peak = peak_added_mb(forward_backward, device)
            saved = None
            if variant != "compile":
                for t in grads:
                    t.requires_grad_(True)
                saved = saved_bytes(lambda: fn(*tensors, **kwargs), tensors) / 2**20
                for t in grads:
                    t.requires_grad_(False)
        except Exception as exc:  # a variant that fails is reported, not hidden
            rows.append(dict(case=case.name, op=case.op, shape=case.shape, dtype=_dtype(case.dtype),
                             variant=variant, error=f"{type(exc).__name__}: {exc}"[:300]))
            continue
        rows.append(result_row(case, variant, fwd_ms, fb_ms, peak, saved))
    return rows


def result_row(case: Case, variant: str, fwd_ms: float, fb_ms: float, peak_mb, saved_mb) -> dict:
    """One results-file row: the timings, the bandwidths they imply, the memory figures."""
    return dict(
        case=case.name, op=case.op, shape=case.shape, dtype=_dtype(case.dtype), variant=variant,
        fwd_ms=round(fwd_ms, 4), fwd_bwd_ms=round(fb_ms, 4),
        fwd_gbps=round(case.bytes_fwd / fwd_ms / 1e6, 2),
        fwd_bwd_gbps=round(case.bytes_fwd_bwd / fb_ms / 1e6, 2),
        peak_mb=None if peak_mb is None else round(peak_mb, 2),
        saved_mb=None if saved_mb is None else round(saved_mb, 3),
    )


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def copy_bandwidth_gbps(device: str, nbytes: int = 1 << 30) -> float:
    """The device's measured copy bandwidth (read + write bytes / time of a large clone)."""
    if device == "cpu":
        nbytes = min(nbytes, 256 << 20)
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), device, repeats=10)
    return 2 * nbytes / ms / 1e6

