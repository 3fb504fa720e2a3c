"""Make the README's benchmark tables from ``benchmarks/results/*.json``.

    python -m benchmarks.report            # rewrite the README sections between the markers
    python -m benchmarks.report --print    # print them instead

Op results (``<device>.json``, from ``benchmarks.run``): one table per file: for each op,
shape and dtype, the forward+backward median time of the eager reference, of
``torch.compile`` of it, and of the fastest kdops backend, with its speed-ups, effective
bandwidth (and % of the device's copy bandwidth), added GPU peak memory and bytes saved for
backward.

Recipe results (``<device>-recipes.json``, from ``benchmarks.recipes``): the README's
headline table — per recipe the KD terms' time per step and share of the step, kdops
against the reference losses — and a bar chart ``<device>-recipes.png`` (matplotlib).
"""
from __future__ import annotations

import argparse
import glob
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
RECIPES_BEGIN, RECIPES_END = "<!-- recipes:begin -->", "<!-- recipes:end -->"
# Results files of other benchmarks, rendered by their own sections.
OTHER_KINDS = ("-recipes.json", "-overhead.json", "-gains.json", "-matmul.json")
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


def op_result_files() -> list[str]:
    files = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*.json")))
    return [f for f in files if not f.endswith(OTHER_KINDS)]


def recipes_table(result: dict) -> str:
    setup = result["setup"]
    lines = [
        f"**{result['device']}** — {result['date']}, torch {result['versions']['torch']}, "
        f"{result.get('threads', '?')} threads; {setup['student']} ← {setup['teacher']}, batch "
        f"{setup['batch']} at {setup['size'][0]}×{setup['size'][1]}, autocast {setup['autocast'] or 'off'}; "
        f"plain student step {result['student_step_ms']:.1f} ms. Measured by `{result['command']}`.",
        "",
        "| recipe | KD terms kdops ms (share of step) | reference ms (share) | × | saved for backward MB kdops / reference | peak MB kdops / reference |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        a, r = row["auto"], row["reference"]
        if "error" in a or "error" in r:
            lines.append(f"| {row['recipe']} | {a.get('error', '')} | {r.get('error', '')} | | | |")
            continue
        lines.append(
            f"| {row['recipe']} | {a['ms']:.2f} ({100 * a['share']:.1f}%) | {r['ms']:.2f} ({100 * r['share']:.1f}%) "
            f"| {r['ms'] / a['ms']:.2f} | {a['saved_mb']:.2f} / {r['saved_mb']:.2f} "
            f"| {_fmt(a['peak_mb'], '.0f')} / {_fmt(r['peak_mb'], '.0f')} |"
        )
    return "\n".join(lines)


def recipes_chart(result: dict, path: str) -> None:
    """Horizontal bars: each recipe's KD share of the step, kdops against the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "error" not in r["auto"] and "error" not in r["reference"]]
    names = [r["recipe"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.2))
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [100 * r["reference"]["share"] for r in rows], height=0.4, label="reference")
    ax.barh([y - 0.2 for y in ys], [100 * r["auto"]["share"] for r in rows], height=0.4, label="kdops")
    ax.set_yticks(list(ys), names)
    ax.invert_yaxis()
    ax.set_xlabel("KD losses, % of a distillation step (forward + backward)")
    ax.set_title(f"{result['device']}: {result['setup']['student']} ← {result['setup']['teacher'].split(' ')[0]}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def recipes_section(*, charts: bool) -> str:
    files = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "*-recipes.json")))
    if not files:
        return "No recipe results yet: run `python -m benchmarks.recipes`."
    parts = []
    for path in files:
        with open(path) as f:
            result = json.load(f)
        chart = path.removesuffix(".json") + ".png"
        if charts:
            recipes_chart(result, chart)
        text = f"`benchmarks/results/{os.path.basename(path)}`\n\n" + recipes_table(result)
        if os.path.exists(chart):
            text += f"\n\n![KD share per recipe](benchmarks/results/{os.path.basename(chart)})"
        parts.append(text)
    return "\n\n".join(parts)


def section() -> str:
    files = op_result_files()
    if not files:
        return "No results yet: run `python -m benchmarks.run`."
    parts = []
    for path in files:
        with open(path) as f:
            parts.append(f"`benchmarks/results/{os.path.basename(path)}`\n\n" + table(json.load(f)))
    return "\n\n".join(parts)


def _replace(content: str, begin: str, end: str, text: str) -> str:
    if begin not in content or end not in content:
        raise SystemExit(f"README.md lacks the markers {begin} … {end}")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{text}\n{end}{tail}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print", action="store_true", help="print the sections instead of editing README.md")
    args = parser.parse_args(argv)
    ops_text, recipes_text = section(), recipes_section(charts=not args.print)
    if args.print:
        print(recipes_text + "\n\n" + ops_text)
        return
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        content = f.read()
    content = _replace(content, BEGIN, END, ops_text)
    content = _replace(content, RECIPES_BEGIN, RECIPES_END, recipes_text)
    with open(readme, "w") as f:
        f.write(content)
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
