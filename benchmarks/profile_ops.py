"""Where a fused op's GPU time goes: the kernels of one forward+backward, from torch.profiler.

    python -m benchmarks.profile_ops                                   # the default list below
    python -m benchmarks.profile_ops --cases "attention_loss[8x512x64x128,float32]" --variants triton cuda

For each benchmark case (``benchmarks.cases``, names as in the results files) and variant, five
profiled forward+backward steps after a warm-up, and the kernels that took the device's time,
most first. Used by ``benchmarks/gpu_check.sh`` on the cases where the H200 results show a fused
backend slower than ``torch.compile`` of the reference.
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.cases import cases
from benchmarks.harness import variants

DEFAULT_CASES = (
    "attention_loss[8x512x64x128,float32]",
    "class_attention_loss[8x512x64x128,float32]",
    "channel_correlation_loss[8x512x64x128,float32]",
    "pairwise_affinity_loss[8x512x64x128,float32]",
    "prototype_kl[8x512x64x128,float32]",
    "class_variation_loss[8x512x64x128,float32]",
)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def profile_case(case, variant: str, device: str = "cuda", steps: int = 5, top: int = 8) -> str:
    tensors, kwargs = case.make_inputs(device, case.dtype)
    fn = variants(case, device)[variant]
    grads = tensors[: case.grad_inputs]

    def step():
        for t in grads:
            t.grad = None
            t.requires_grad_(True)
        loss = fn(*tensors, **kwargs)
        (loss if loss.dim() == 0 else loss.float().square().sum()).backward()

    step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    averages = prof.key_averages()
    keys = ("self_device_time_total", "self_cuda_time_total") if device == "cuda" else ("self_cpu_time_total",)
    for key in keys:
        try:
            return averages.table(sort_by=key, row_limit=top, max_name_column_width=70)
        except (AttributeError, KeyError, ValueError):
            continue
    return averages.table(row_limit=top)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES))
    parser.add_argument("--variants", nargs="+", default=["cuda", "triton"])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the scaled-down CPU cases (their names differ)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --device cpu)")
    by_name = {c.name: c for c in cases(args.device, [torch.float32, torch.bfloat16])}
    for name in args.cases:
        if name not in by_name:
            print(f"== {name}: no such case")
            continue
        for variant in args.variants:
            print(f"== {name} {variant} (5 forward+backward steps)", flush=True)
            try:
                print(profile_case(by_name[name], variant, args.device), flush=True)
            except Exception as exc:  # a variant that cannot run here is reported, not fatal
                print(f"   {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    main()
