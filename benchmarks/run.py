"""Run the op benchmarks on the device at hand and write ``benchmarks/results/<device>.json``.

    python -m benchmarks.run                       # every op, every variant, default dtypes
    python -m benchmarks.run --ops channel_kl pixel_kl --repeats 30
    python -m benchmarks.report                    # README tables from the results files

GPU: float32 and bfloat16 at the real shapes; CPU: float32 at the scaled-down shapes.
A row (case, variant) measured again replaces the earlier file's row; the other rows are kept,
so families and variants can be (re-)measured one at a time. The file is rewritten after every
case, so a run stopped by a time limit keeps what it measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re

import torch

from benchmarks.cases import cases
from benchmarks.harness import copy_bandwidth_gbps, measure
from kdops.info import package_version

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_slug(device: str) -> str:
    """"cpu" or the GPU's name, lower-case with dashes (e.g. "nvidia-h100-80gb-hbm3")."""
    if device == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def device_description(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def format_table(rows: list[dict]) -> str:
    header = ["case", "variant", "fwd ms", "fwd+bwd ms", "fwd+bwd GB/s", "peak MB", "saved MB"]
    lines = [header]
    for r in rows:
        if "error" in r:
            lines.append([r["case"], r["variant"], "error", r["error"][:40], "", "", ""])
            continue
        lines.append([
            r["case"], r["variant"], f"{r['fwd_ms']:.3f}", f"{r['fwd_bwd_ms']:.3f}",
            f"{r['fwd_bwd_gbps']:.1f}", "-" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}",
            "-" if r["saved_mb"] is None else f"{r['saved_mb']:.2f}",
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)) for line in lines)


def write_results(path: str, device: str, rows: list[dict], *, description: str | None = None,
                  versions: dict | None = None) -> None:
    """Writes a results file; description and versions default to this machine's."""
    result = {
        "device": description or device_description(device),
        "device_type": device,
        "date": datetime.date.today().isoformat(),
        "versions": versions or {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": package_version("triton"),
            "kdops": package_version("kdops"),
        },
        "rows": rows,
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", nargs="*", help="ops to run (default: all)")
    parser.add_argument("--dtypes", nargs="*", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--variants", nargs="*", help="eager, compile, cpu, cuda, triton (default: all)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", help="results file (default: benchmarks/results/<device>.json)")
    args = parser.parse_args(argv)

    dtype_names = args.dtypes or (["float32", "bfloat16"] if args.device == "cuda" else ["float32"])
    dtypes = [getattr(torch, name) for name in dtype_names]
    selected = [c for c in cases(args.device, dtypes) if not args.ops or c.op in args.ops]
    if not selected:
        parser.error(f"--ops matched no benchmark case: {args.ops}")

    command = "python -m benchmarks.run " + " ".join(argv if argv is not None else os.sys.argv[1:])
    copy_gbps = round(copy_bandwidth_gbps(args.device), 1)
    out = args.out or os.path.join(RESULTS_DIR, f"{device_slug(args.device)}.json")
    previous = []
    if os.path.exists(out):
        with open(out) as f:
            previous = json.load(f)["rows"]
    rows = []
    for case in selected:
        case_rows = measure(case, args.device, repeats=args.repeats,
                            only=tuple(args.variants) if args.variants else None)
        print(format_table(case_rows).split("\n", 1)[1], flush=True)
        # Each row keeps the command and copy bandwidth of its run: a results file merges runs.
        rows += [dict(row, command=command, copy_gbps=copy_gbps) for row in case_rows]
        # Written after every case: a run stopped by a time limit (a GPU lease) keeps what it measured.
        measured = {(r["case"], r["variant"]) for r in rows}
        write_results(out, args.device, [r for r in previous if (r["case"], r["variant"]) not in measured] + rows)
    print(f"\n{format_table(rows)}\n\ncopy bandwidth {copy_gbps} GB/s; wrote {out}")


if __name__ == "__main__":
    main()
