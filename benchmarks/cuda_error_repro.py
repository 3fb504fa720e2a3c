"""Does an argument error raised inside a kdops C++ op reach Python as an exception on this GPU
machine? One subprocess per case, so a crash in one does not hide the others.

    python -m benchmarks.cuda_error_repro          # one line per case: raised / crashed (signal)
    python -m benchmarks.cuda_error_repro --gdb    # and the native backtrace of the first crash

Why: on the H200 (torch 2.11, extension built by ``pip install -e .``) two tests that make a
CUDA op raise (``attention_loss`` with an unknown norm, ``prototype_pool`` with float labels)
ended the test process with a segmentation fault instead of a Python exception. The cases below
separate the suspects: the same kind of error from a CPU kernel of the same extension, from each
CUDA family, and from a plain ATen op.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

PRELUDE = "import torch, kdops._extension\nassert kdops._extension.loaded(), kdops._extension.load_error()\ns = torch.randn(2, 3, 4, 5, device='{device}')\n"
CASES = {
    "aten cuda (control)": ("cuda", "torch.zeros(2, device='cuda').view(3)"),
    "attention_loss cpu": ("cpu", "torch.ops.kdops.attention_loss(s, s, 2.0, False, 'max', None)"),
    "attention_loss cuda": ("cuda", "torch.ops.kdops.attention_loss(s, s, 2.0, False, 'max', None)"),
    "channel_correlation_loss cuda": ("cuda", "torch.ops.kdops.channel_correlation_loss(s, s[:, :2], 'row')"),
    "channel_kl cuda": ("cuda", "torch.ops.kdops.channel_kl(s, s[:1], 1.0)"),
    "prototype_pool cuda": ("cuda", "torch.ops.kdops.prototype_pool(s, torch.zeros(2, 4, 5, device='cuda'), 3, 255, True, False)"),
}


def run_case(device: str, call: str, gdb: bool) -> str:
    script = PRELUDE.format(device=device) + (
        f"try:\n    {call}\n    print('no error raised')\n"
        "except Exception as exc:\n    print('raised', type(exc).__name__ + ':', str(exc).splitlines()[0][:100])\n"
    )
    command = [sys.executable, "-c", script]
    if gdb:
        command = ["gdb", "-q", "-batch", "-ex", "run", "-ex", "bt 40", "--args"] + command
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if gdb:
        return result.stdout[-6000:]
    if result.returncode < 0:
        return f"crashed (signal {-result.returncode})"
    lines = [line for line in result.stdout.splitlines() if line.startswith(("raised", "no error"))]
    return lines[-1] if lines else f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gdb", action="store_true", help="backtrace of the first crashing case (needs gdb)")
    args = parser.parse_args(argv)
    crashed = None
    for name, (device, call) in CASES.items():
        outcome = run_case(device, call, gdb=False)
        print(f"{name:32s} {outcome}", flush=True)
        if crashed is None and outcome.startswith("crashed"):
            crashed = (device, call)
    if args.gdb and crashed is not None:
        if shutil.which("gdb") is None:
            print("gdb is not installed: no backtrace")
        else:
            print(run_case(*crashed, gdb=True))


if __name__ == "__main__":
    main()
