"""``python -m kdops.info``: versions, devices, the extension's build, and ops × backends.

A cell of the table says whether the backend implements the op and is built here
("yes"), is implemented but not built ("not built", "no triton"), or does not implement it
("not implemented"). Whether a built backend can run also depends on the tensors' device:
"cpu" runs CPU tensors, "cuda" and "triton" CUDA tensors (triton also CPU tensors under
TRITON_INTERPRET=1).
"""
from __future__ import annotations

import importlib.metadata
import platform

import torch

from kdops import _extension
from kdops.backend import BACKENDS, OPS, _auto_order, status, unavailable_reason


def package_version(package: str) -> str:
    """The installed version of ``package``, or "not installed"."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _auto_choice(op: str, device: str) -> str:
    for candidate in _auto_order(op, device, torch.float32):
        if unavailable_reason(op, candidate, device, torch.float32) is None:
            return candidate
    return "reference"


def report() -> str:
    lines = [
        f"kdops {package_version('kdops')}",
        f"python {platform.python_version()}, torch {torch.__version__}, triton {package_version('triton')}",
    ]
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"devices: cpu, cuda ({names}; CUDA {torch.version.cuda})")
    else:
        lines.append("devices: cpu (no CUDA device)")
    if _extension.loaded():
        cuda_part = "with" if _extension.built_with_cuda() else "without"
        lines.append(f"extension kdops._C: built, {cuda_part} CUDA kernels")
    else:
        lines.append(f"extension kdops._C: not built ({_extension.load_error()})")

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    header = ["op", *BACKENDS, *(f"auto on {d}" for d in devices)]
    rows = [
        [op, *(status(op, b) for b in BACKENDS), *(_auto_choice(op, d) for d in devices)]
        for op in OPS
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines += ["", fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
