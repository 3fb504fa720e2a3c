"""The device's measured matmul rates: the yardstick of the channel-correlation kernels' GEMM work.

    python -m benchmarks.matmul_rate            # writes benchmarks/results/<device>-matmul.json

Issue targets for the correlation family are stated as a share of what this device's own
matmuls reach, so both rates are measured here rather than read off a data sheet:

* ``float32``: float32-accurate products (TF32 off), the precision DESIGN.md asks of the
  correlation ops for float32 inputs;
* ``bfloat16``: tensor cores with float32 accumulation, for 16-bit inputs.

Shapes: the Gram products of the benchmark cases, (8, C, L) · (8, L, C) with C = 512,
L = 64·128 and C = 256, L = 128·256, and one large square product (the device's best case).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os

import torch

from benchmarks.run import RESULTS_DIR, device_slug

SHAPES = {  # name: (batch, m, k, n) of a batched (m × k) · (k × n) product
    "gram 8x512x8192": (8, 512, 8192, 512),
    "gram 8x256x32768": (8, 256, 32768, 256),
    "square 8192": (1, 8192, 8192, 8192),
}


def rate_tflops(batch: int, m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 20) -> float:
    a = torch.randn(batch, m, k, device="cuda", dtype=dtype)
    b = torch.randn(batch, k, n, device="cuda", dtype=dtype)
    for _ in range(3):
        torch.bmm(a, b)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        torch.bmm(a, b)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / repeats
    return 2 * batch * m * k * n / seconds / 1e12


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        rates = {
            dtype_name: {name: round(rate_tflops(*shape, dtype), 2) for name, shape in SHAPES.items()}
            for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))
        }
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    result = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "versions": {"torch": torch.__version__},
        "command": "python -m benchmarks.matmul_rate",
        "tflops": rates,
    }
    path = os.path.join(RESULTS_DIR, f"{device_slug('cuda')}-matmul.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    for dtype_name, by_shape in rates.items():
        print(dtype_name, ", ".join(f"{name}: {value} TFLOP/s" for name, value in by_shape.items()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
