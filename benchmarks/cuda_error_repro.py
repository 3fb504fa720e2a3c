"""Does an argument error raised inside a kdops C++ op reach Python as an exception on this GPU
machine? One subprocess per case, so a crash in one does not hide the others.

    python -m benchmarks.cuda_error_repro          # one line per case: raised / crashed (signal)
    python -m benchmarks.cuda_error_repro --gdb    # and the native backtrace of the first crash

Why: on the H200 (torch 2.11, extension built by ``pip install -e .``) two tests that make a
CUDA op raise (``attention_loss`` with an unknown norm, ``prototype_pool`` with float labels)
ended the test process with a segmentation fault instead of a Python exception. The cases below
separate the suspects: the same kind of error from a CPU kernel of the same extension, from each
CUDA family, and from a plain ATen op; and, for the first case that crashes, the same call with
the C++ stack trace shown (its symbolisation runs at the throw) and after a CUDA op that works.
The backtrace comes from gdb, or cuda-gdb where gdb is missing (the GPU machines' image).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

PRELUDE = ("import torch, kdops._extension\nassert kdops._extension.loaded(), kdops._extension.load_error()\n"
           "s = torch.randn(2, 3, 4, 5, device='{device}')\n")
CASES = {
    "aten cuda (control)": ("cuda", "torch.zeros(2, device='cuda').view(3)"),
    "attention_loss cpu": ("cpu", "torch.ops.kdops.attention_loss(s, s, 2.0, False, 'max', None)"),
    "attention_loss cuda": ("cuda", "torch.ops.kdops.attention_loss(s, s, 2.0, False, 'max', None)"),
    "attention_reduce cuda (int x)": ("cuda", "torch.ops.kdops.attention_reduce(s.int(), 2.0, True)"),
    "channel_correlation_loss cuda": ("cuda", "torch.ops.kdops.channel_correlation_loss(s, s[:, :2], 'row')"),
    "channel_kl cuda": ("cuda", "torch.ops.kdops.channel_kl(s, s[:1], 1.0)"),
    "prototype_pool cuda": ("cuda", "torch.ops.kdops.prototype_pool(s, torch.zeros(2, 4, 5, device='cuda'), 3, 255, True, False)"),
    # What the message formats: sizes (IntArrayRef) from a CPU kernel; an int64 only; a double only.
    "channel_correlation_loss cpu": ("cpu", "torch.ops.kdops.channel_correlation_loss(s, s[:, :2], 'row')"),
    "prototype_pool cuda (int64 only)": ("cuda", "torch.ops.kdops.prototype_pool(s, torch.zeros(2, 4, 5, dtype=torch.long, device='cuda'), 0, 255, True, False)"),
    "attention_reduce cuda (double only)": ("cuda", "torch.ops.kdops.attention_reduce(s, -1.0, True)"),
}
# The environment of the extension: which C++ runtime the process maps, the compilers, the CPU.
ENVIRONMENT = """
import subprocess, sys, torch, kdops._C as c
print('kdops._C:', c.__file__)
print('torch built with:', [l.strip() for l in torch.__config__.show().splitlines() if 'C++ Version' in l or 'GCC' in l or 'CXX_COMPILER' in l or 'CXX_FLAGS' in l][:3])
maps = open('/proc/self/maps').read().split(chr(10))
print('mapped C++ runtimes:', sorted({l.split()[-1] for l in maps if 'stdc++' in l or 'libgcc_s' in l or 'gomp' in l or 'c++' in l}))
print(subprocess.run(['ldd', c.__file__], capture_output=True, text=True).stdout)
print(subprocess.run(['c++', '--version'], capture_output=True, text=True).stdout.splitlines()[:1])
flags = [l for l in open('/proc/cpuinfo') if l.startswith('flags')][:1]
print('cpu avx512 flags:', sorted(f for f in flags[0].split() if 'avx512' in f or 'amx' in f) if flags else None)
"""
# Variants of a crashing case: (label, extra environment, statement run before the call).
VARIANTS = [
    ("with TORCH_SHOW_CPP_STACKTRACES=1", {"TORCH_SHOW_CPP_STACKTRACES": "1"}, ""),
    ("after a CUDA op that succeeds", {}, "torch.ops.kdops.attention_reduce(s, 2.0, True)\n"),
    ("through the public API (kdops imported)", {}, "import kdops\n"),
]


def script(device: str, call: str, before: str = "") -> str:
    return PRELUDE.format(device=device) + before + (
        f"try:\n    {call}\n    print('no error raised')\n"
        "except Exception as exc:\n    print('raised', type(exc).__name__ + ':', str(exc).splitlines()[0][:100])\n"
    )


def run_case(device: str, call: str, before: str = "", env: dict | None = None) -> str:
    command = [sys.executable, "-X", "faulthandler", "-c", script(device, call, before)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, **(env or {})})
    if result.returncode < 0:
        where = [line.strip() for line in result.stderr.splitlines() if line.strip().startswith("File")]
        return f"crashed (signal {-result.returncode}); Python frames: {where[:3]}"
    lines = [line for line in result.stdout.splitlines() if line.startswith(("raised", "no error"))]
    return lines[-1] if lines else f"exit {result.returncode}: {result.stderr.strip().splitlines()[-3:]}"


def backtrace(device: str, call: str) -> str:
    debugger = shutil.which("gdb") or shutil.which("cuda-gdb")
    if debugger is None:
        return "neither gdb nor cuda-gdb is installed: no backtrace"
    path = "/tmp/kdops_cuda_error_case.py"
    with open(path, "w") as f:
        f.write(script(device, call))
    command = [debugger, "-q", "-batch", "-ex", "set pagination off", "-ex", "run", "-ex", "bt 40",
               "-ex", "info sharedlibrary kdops", "--args", sys.executable, path]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    out = result.stdout + result.stderr
    start = out.find("received signal")
    return f"{os.path.basename(debugger)}:\n" + (out[start:] if start >= 0 else out)[:6000]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gdb", action="store_true", help="backtrace of the first crashing case")
    args = parser.parse_args(argv)
    environment = subprocess.run([sys.executable, "-c", ENVIRONMENT], capture_output=True, text=True, timeout=120)
    print(environment.stdout + environment.stderr[-2000:], flush=True)
    with ThreadPoolExecutor(max_workers=len(CASES)) as pool:
        outcomes = dict(zip(CASES, pool.map(lambda case: run_case(*case), CASES.values())))
    for name, outcome in outcomes.items():
        print(f"{name:32s} {outcome}", flush=True)
    crashed = next((CASES[name] for name, outcome in outcomes.items() if outcome.startswith("crashed")), None)
    if crashed is None:
        return
    with ThreadPoolExecutor(max_workers=len(VARIANTS)) as pool:
        variants = list(pool.map(lambda v: run_case(*crashed, before=v[2], env=v[1]), VARIANTS))
    for (label, _, _), outcome in zip(VARIANTS, variants):
        print(f"first crashing case {label}: {outcome}", flush=True)
    if args.gdb:
        print(backtrace(*crashed), flush=True)


if __name__ == "__main__":
    main()
