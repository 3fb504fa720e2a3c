"""Rebuild results rows from the printed output of ``benchmarks.run`` (when a GPU lease brought
back the log but not the results file).

    python -m benchmarks.recover LOG --device-name "NVIDIA H200" --command "python -m benchmarks.run ..."

Each table line of the log (case, variant, fwd ms, fwd+bwd ms, GB/s, peak MB, saved MB) becomes
the row ``benchmarks.run`` would have written: op, shape and the byte counts behind the GB/s come
from the same case list, the copy bandwidth from the log's last line. The rows are merged into
``benchmarks/results/<device>.json`` like a run's (a re-measured (case, variant) replaces the old).
"""
from __future__ import annotations

import argparse
import json
import os
import re

import torch

from benchmarks.cases import cases
from benchmarks.harness import result_row
from benchmarks.run import RESULTS_DIR, write_results

LINE = re.compile(r"^(?P<case>\S.*\])\s+(?P<variant>\w+)\s+(?P<fwd>[\d.]+)\s+(?P<fb>[\d.]+)\s+[\d.]+\s+"
                  r"(?P<peak>[\d.]+|-)\s+(?P<saved>[\d.]+|-)\s*$")
COPY = re.compile(r"copy bandwidth ([\d.]+) GB/s")


def rows_from_log(text: str, command: str) -> list[dict]:
    by_name = {c.name: c for c in cases("cuda", [torch.float32, torch.bfloat16, torch.float16])}
    copy = COPY.search(text)
    rows, seen = [], set()
    for line in text.splitlines():
        match = LINE.match(line)
        if not match or match["case"] not in by_name:
            continue
        case = by_name[match["case"]]
        key = (case.name, match["variant"])
        if key in seen:  # the final summary table repeats every row
            continue
        seen.add(key)
        row = result_row(case, match["variant"], float(match["fwd"]), float(match["fb"]),
                         None if match["peak"] == "-" else float(match["peak"]),
                         None if match["saved"] == "-" else float(match["saved"]))
        rows.append(dict(row, command=command, copy_gbps=float(copy.group(1)) if copy else None))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("log")
    parser.add_argument("--device-name", required=True, help='e.g. "NVIDIA H200"')
    parser.add_argument("--command", required=True, help="the benchmarks.run command that printed the log")
    parser.add_argument("--copy-gbps", type=float, help="when the log was cut before its last line")
    args = parser.parse_args(argv)
    with open(args.log) as f:
        rows = rows_from_log(f.read(), args.command)
    for row in rows:
        if row["copy_gbps"] is None:
            row["copy_gbps"] = args.copy_gbps
    slug = re.sub(r"[^a-z0-9]+", "-", args.device_name.lower()).strip("-")
    path = os.path.join(RESULTS_DIR, f"{slug}.json")
    with open(path) as f:
        previous = json.load(f)
    measured = {(r["case"], r["variant"]) for r in rows}
    merged = [r for r in previous["rows"] if (r["case"], r["variant"]) not in measured] + rows
    write_results(path, "cuda", merged, description=previous["device"], versions=previous["versions"])
    print(f"{len(rows)} rows from {args.log} merged into {path}")


if __name__ == "__main__":
    main()
