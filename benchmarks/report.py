"""Make the README's benchmark tables from ``benchmarks/results/*.json``.

    python -m benchmarks.report            # rewrite the README section between the markers
    python -m benchmarks.report --print    # print it instead

One table per results file (device): for each op, shape and dtype, the forward+backward
median time of the eager reference, of ``torch.compile`` of it, and of the fastest kdops
backend, with its speed-ups, effective bandwidth (and % of the device's copy bandwidth),
added GPU peak memory and bytes saved for backward.
"""
from __future__ import annotations

import argparse
import glob
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
KDOPS_VARIANTS = ("cpu", "cuda", "triton")


def _fmt(value, spec=".2f", none="–"):
    return none if value is None else format(value, spec)


def table(result: dict) -> str:
    by_case: dict[str, dict[str, dict]] = {}
    for row in result["rows"]:
        if "error" not in row:
            by_case.setdefault(row["case"], {})[row["variant"]] = row
    commands = sorted({f"`{row['command']}` (copy bandwidth {row['copy_gbps']} GB/s)" for row in result["rows"]})
    lines = [
        f"**{result['device']}** — {result['date']}, torch {result['versions']['torch']}, "
        f"triton {result['versions']['triton']}. Forward+backward (student gradient), median ms. "
        f"Measured by: {'; '.join(commands)}.",
        "",
        "| op | shape | dtype | eager | compile | kdops (backend) | × eager | × compile "
        "| GB/s (% copy) | peak MB kdops / eager | saved MB kdops / eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variants in by_case.values():
        eager, compiled = variants.get("eager"), variants.get("compile")
        fused = [variants[v] for v in KDOPS_VARIANTS if v in variants]
        best = min(fused, key=lambda r: r["fwd_bwd_ms"]) if fused else None
        any_row = eager or compiled or best
        cells = [any_row["op"], any_row["shape"], any_row["dtype"],
                 _fmt(eager and eager["fwd_bwd_ms"], ".3f"), _fmt(compiled and compiled["fwd_bwd_ms"], ".3f")]
        if best is None:
            cells += ["no fused kernel yet", "", "", "", "", ""]
        else:
            pct = 100 * best["fwd_bwd_gbps"] / best["copy_gbps"]
            cells += [
                f"{best['fwd_bwd_ms']:.3f} ({best['variant']})",
                _fmt(eager and eager["fwd_bwd_ms"] / best["fwd_bwd_ms"], ".1f") + "×",
                _fmt(compiled and compiled["fwd_bwd_ms"] / best["fwd_bwd_ms"], ".1f") + "×",
                f"{best['fwd_bwd_gbps']:.0f} ({pct:.0f}%)",
                f"{_fmt(best['peak_mb'], '.1f')} / {_fmt(eager and eager['peak_mb'], '.1f')}",
                f"{_fmt(best['saved_mb'], '.3f')} / {_fmt(eager and eager['saved_mb'], '.1f')}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section() -> str:
    files = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json")))
    if not files:
        return "No results yet: run `python -m benchmarks.run`."
    parts = []
    for path in files:
        with open(path) as f:
            parts.append(f"`benchmarks/results/{os.path.basename(path)}`\n\n" + table(json.load(f)))
    return "\n\n".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print", action="store_true", help="print the section instead of editing README.md")
    args = parser.parse_args(argv)
    text = section()
    if args.print:
        print(text)
        return
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        content = f.read()
    if BEGIN not in content or END not in content:
        raise SystemExit(f"README.md lacks the markers {BEGIN} … {END}")
    head, rest = content.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(readme, "w") as f:
        f.write(f"{head}{BEGIN}\n{text}\n{END}{tail}")
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
