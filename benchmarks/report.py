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

Gains results (``<device>-gains.json``, from ``benchmarks.gains``): per data set and recipe
the mean ± std over seeds of the student's metric and of its seed-paired gain over the plain
student, with the verdict, and a chart ``<device>-gains.png`` of the paired gains.
"""
from __future__ import annotations

import argparse
import glob
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
RECIPES_BEGIN, RECIPES_END = "<!-- recipes:begin -->", "<!-- recipes:end -->"
GAINS_BEGIN, GAINS_END = "<!-- gains:begin -->", "<!-- gains:end -->"
METRIC_NAMES = {"miou": "mIoU", "lane_f1": "lane F1"}
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


def results_sections(suffix: str, missing: str, chart, render, alt: str, *, charts: bool) -> str:
    """One README part per ``benchmarks/results/*<suffix>``: its name, ``render(result)`` and
    the PNG ``chart(result, path)`` draws beside it (redrawn when ``charts``)."""
    files = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", f"*{suffix}")))
    if not files:
        return missing
    parts = []
    for path in files:
        with open(path) as f:
            result = json.load(f)
        png = path.removesuffix(".json") + ".png"
        if charts:
            chart(result, png)
        text = f"`benchmarks/results/{os.path.basename(path)}`\n\n" + render(result)
        if os.path.exists(png):
            text += f"\n\n![{alt}](benchmarks/results/{os.path.basename(png)})"
        parts.append(text)
    return "\n\n".join(parts)


def recipes_section(*, charts: bool) -> str:
    return results_sections("-recipes.json", "No recipe results yet: run `python -m benchmarks.recipes`.",
                            recipes_chart, recipes_table, "KD share per recipe", charts=charts)


def _pm(mean, std) -> str:
    """``mean ± std`` in points (×100), one decimal; no ± for one seed (std NaN or missing)."""
    if std is None or std != std:
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _signed_pm(mean, std) -> str:
    if std is None or std != std:
        return f"{100 * mean:+.1f}"
    return f"{100 * mean:+.1f} ± {100 * std:.1f}"


def gains_table(result: dict) -> str:
    """One table per data set: recipe, metric mean ± std over seeds, paired gain mean ± std
    over seeds, verdict (see ``benchmarks.gains``)."""
    parts = []
    seeds = len(result["seeds"])
    for dataset, setting in result["settings"].items():
        metric = METRIC_NAMES[setting["metric"]]
        teacher_runs = [r for r in result["runs"] if r["dataset"] == dataset and r["recipe"].startswith("teacher:")]
        teachers = "; ".join(
            f"{'label teacher' if r['recipe'] == 'teacher:labels' else setting['teacher']} "
            f"{100 * (r['lane_f1'] if 'lane_f1' in r else r['miou']):.1f} "
            f"{metric if 'lane_f1' in r else 'mIoU'}" for r in teacher_runs)
        lr = f", lr {setting['lr']}" if setting.get("lr") else ""
        caption = (f"**{dataset}** ({setting['data']}, {setting['train_samples']} train / {setting['val_samples']} val, "
                   f"{setting['size']}×{setting['size']}): student {setting['student']}, {setting['steps']} steps, "
                   f"batch {setting['batch_size']}{lr} ({setting.get('schedule', '')}); teachers trained once "
                   f"(seed 0): {teachers or 'none'}. "
                   f"{metric} in points, mean ± std over {seeds} seed{'s' if seeds > 1 else ''}; "
                   f"gain = the recipe's {metric} minus the plain student's of the same seed.")
        rows = [row for row in result["rows"] if row["dataset"] == dataset]
        second = all("miou" in row for row in rows)  # lanes: mIoU beside the lane F1
        header = f"| recipe | {metric} | gain over plain (paired) | verdict |"
        rule = "|---|---|---|---|"
        if second:
            header += " mIoU | mIoU gain (paired) | mIoU verdict |"
            rule += "---|---|---|"
        lines = [caption, "", header, rule]
        for row in rows:
            if row["recipe"] == "plain":
                line = f"| plain student | {_pm(row['mean'], row['std'])} | | |"
                if second:
                    line += f" {_pm(row['miou']['mean'], row['miou']['std'])} | | |"
                lines.append(line)
                continue
            line = (f"| {row['recipe']} | {_pm(row['mean'], row['std'])} "
                    f"| {_signed_pm(row['gain_mean'], row['gain_std'])} | {row['verdict']} |")
            if second:
                m = row["miou"]
                line += f" {_pm(m['mean'], m['std'])} | {_signed_pm(m['gain_mean'], m['gain_std'])} | {m['verdict']} |"
            lines.append(line)
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def gains_header(result: dict) -> str:
    machine = result["machine"]
    return (f"**{result['device']}** — {result['date']}, torch {result['versions']['torch']}, "
            f"{machine['cpu']} ({machine['cores']} cores), {result['threads']} thread per run, one run at a time"
            f"{' (nice ' + str(result['niced']) + ')' if result.get('niced') else ''}; load average "
            f"{machine['loadavg_start']} at the start, {machine['loadavg_end']} at the end. "
            f"Measured by `{result['command']}`: its {len(result['runs'])} runs took "
            f"{sum(r['wall_seconds'] for r in result['runs']) / 60:.0f} min wall in all, each when it was trained "
            f"(a run finished before is reused, not retrained; this invocation: "
            f"{result['wall_seconds'] / 60:.0f} min).")


def gains_chart(result: dict, path: str) -> None:
    """Per data set, horizontal bars of the mean paired gain with ± 1 std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(result["settings"])
    rows = {d: [r for r in result["rows"] if r["dataset"] == d and r["recipe"] != "plain"] for d in datasets}
    heights = [max(1, len(rows[d])) for d in datasets]
    fig, axes = plt.subplots(len(datasets), 1, figsize=(7, 0.32 * sum(heights) + 1.4 * len(datasets)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, dataset in zip(axes[:, 0], datasets):
        data = rows[dataset]
        ys = list(range(len(data)))
        colours = ["tab:green" if r["verdict"] == "gain > 1 sd" else "tab:red" if r["verdict"] == "loss > 1 sd"
                   else "tab:gray" for r in data]
        errors = [0.0 if r["gain_std"] is None or r["gain_std"] != r["gain_std"] else 100 * r["gain_std"]
                  for r in data]
        ax.barh(ys, [100 * r["gain_mean"] for r in data], xerr=errors, color=colours, capsize=3)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(ys, [r["recipe"] for r in data])
        ax.invert_yaxis()
        metric = METRIC_NAMES[result["settings"][dataset]["metric"]]
        ax.set_xlabel(f"{dataset}: gain over the plain student, {metric} points (mean ± std of seed-paired gains)")
    fig.suptitle(f"{result['device']}: distillation gains, {len(result['seeds'])} seeds "
                 "(green: gain > 1 sd, grey: within noise, red: loss > 1 sd)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def gains_section(*, charts: bool) -> str:
    return results_sections("-gains.json", "No gains results yet: run `python -m benchmarks.gains`.",
                            gains_chart, lambda r: gains_header(r) + "\n\n" + gains_table(r),
                            "Distillation gains per recipe", charts=charts)


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
    gains_text = gains_section(charts=not args.print)
    if args.print:
        print(gains_text + "\n\n" + recipes_text + "\n\n" + ops_text)
        return
    readme = os.path.join(ROOT, "README.md")
    with open(readme) as f:
        content = f.read()
    content = _replace(content, BEGIN, END, ops_text)
    content = _replace(content, RECIPES_BEGIN, RECIPES_END, recipes_text)
    content = _replace(content, GAINS_BEGIN, GAINS_END, gains_text)
    with open(readme, "w") as f:
        f.write(content)
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
