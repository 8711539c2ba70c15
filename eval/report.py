"""`loracompose report RESULTS_DIR`: summary tables, plots, comparison grids and one HTML page.

Writes into RESULTS_DIR: summary.json, summary.csv, summary.md, plots/*.png, grids/*.png and report.html.
The page embeds the plots and grids and links every generated image relatively (images/...), so
the results folder can be moved or archived as a whole.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from PIL import Image, ImageDraw, ImageFont

from compose.errors import ComposeError

from .harness import RESULTS, read_rows

CAVEAT = (
    "Global CLIPScore is a weak proxy for composition quality: in the human study of Multi-LoRA Composition "
    "(Zhong et al., 2024) it showed about zero correlation with human judgement. One score for the whole image "
    "cannot tell whether each LoRA's concept is present and in its place; region scores (each LoRA's box against "
    "its own prompt) say a little more. Read the numbers beside the images, never instead of them."
)

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; the normal 1.96 beyond.
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
STAT_FIELDS = ("n", "mean", "std", "ci95_low", "ci95_high")
GRID_SEEDS = 8  # seeds shown per prompt in a grid


def _flag(value) -> list[float]:
    return [] if value is None else [float(value)]


def _share(flags: dict | None) -> list[float]:
    """The share of a row's concepts found, one value per row."""
    return [sum(flags.values()) / len(flags)] if flags else []


# What is summarised per method: metric -> the values one row contributes (none if it lacks the metric).
# all_present / concepts_present / all_in_region come from a ground-truth judge (the toy world's);
# their means are rates.
METRICS = {
    "clip_score": lambda row: [row["clip_score"]],
    "region_score": lambda row: list(row.get("region_scores", {}).values()),
    "all_present": lambda row: _flag(row.get("all_present")),
    "concepts_present": lambda row: _share(row.get("judge_present")),
    "all_in_region": lambda row: _flag(row.get("all_in_region")),
    "seconds": lambda row: [row["seconds"]],
}
METRIC_TITLES = {
    "clip_score": "CLIPScore",
    "region_score": "region score",
    "all_present": "all concepts present",
    "concepts_present": "concepts present",
    "all_in_region": "all in their regions",
    "seconds": "seconds per image",
}


def describe(values: Iterable[float]) -> dict[str, Any]:
    """n, mean, sample std and the t-based 95% confidence interval of the mean (None where undefined)."""
    values = list(values)
    n = len(values)
    if n == 0:
        return dict.fromkeys(STAT_FIELDS) | {"n": 0}
    mean = statistics.fmean(values)
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "ci95_low": None, "ci95_high": None}
    std = statistics.stdev(values)
    half = (_T95[n - 2] if n - 1 <= len(_T95) else 1.96) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95_low": mean - half, "ci95_high": mean + half}


def _describe_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {name: describe(value for row in rows for value in values(row)) for name, values in METRICS.items()}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Every metric per method, and per method and number of LoRAs."""
    by_method: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_method[row["method"]].append(row)
    summary = {"caveat": CAVEAT, "rows": len(rows), "methods": {}}
    for method, group in by_method.items():
        per_count: dict[int, list[dict]] = defaultdict(list)
        for row in group:
            per_count[row["num_loras"]].append(row)
        summary["methods"][method] = {
            **_describe_metrics(group),
            "by_num_loras": {str(count): _describe_metrics(subgroup) for count, subgroup in sorted(per_count.items())},
        }
    return summary


def measured(summary: dict[str, Any]) -> list[str]:
    """The metrics at least one row has."""
    return [name for name in METRICS if any(entry[name]["n"] for entry in summary["methods"].values())]


def write_csv(summary: dict[str, Any], path: Path) -> None:
    """One line per (method, number of LoRAs or 'all', metric)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "num_loras", "score", *STAT_FIELDS])
        for method, entry in summary["methods"].items():
            groups = [("all", entry), *entry["by_num_loras"].items()]
            for count, group in groups:
                for kind in METRICS:
                    if group[kind]["n"]:
                        writer.writerow([method, count, kind, *(group[kind][f] for f in STAT_FIELDS)])


def markdown_table(summary: dict[str, Any]) -> str:
    """Per method and number of LoRAs: n and each metric's mean (rates as percentages), ready for a README."""
    metrics = measured(summary)
    lines = [
        "| method | LoRAs | n | " + " | ".join(METRIC_TITLES[m] for m in metrics) + " |",
        "|---|---|---|" + "---|" * len(metrics),
    ]
    for method, entry in summary["methods"].items():
        for count, group in entry["by_num_loras"].items():
            cells = []
            for metric in metrics:
                mean = group[metric]["mean"]
                rate = metric.startswith("all_") or metric == "concepts_present"
                cells.append("–" if mean is None else f"{100 * mean:.0f}%" if rate else f"{mean:.2f}")
            n = max(group[m]["n"] for m in ("clip_score", "seconds"))
            lines.append(f"| {method} | {count} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_box_by_method(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    methods = list(dict.fromkeys(row["method"] for row in rows))
    figure = Figure(figsize=(max(4, 1.4 * len(methods)), 3.6), dpi=100)
    axes = figure.subplots()
    axes.boxplot([[r["clip_score"] for r in rows if r["method"] == m] for m in methods], tick_labels=methods)
    axes.set_ylabel(f"CLIPScore ({rows[0]['clip_convention']})")
    axes.set_title("CLIPScore per method")
    figure.tight_layout()
    figure.savefig(path)


def plot_score_vs_loras(summary: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3.6), dpi=100)
    axes = figure.subplots()
    for method, entry in summary["methods"].items():
        counts = [int(c) for c in entry["by_num_loras"]]
        stats = [entry["by_num_loras"][str(c)]["clip_score"] for c in counts]
        means = [s["mean"] for s in stats]
        errors = [0.0 if s["ci95_high"] is None else s["ci95_high"] - s["mean"] for s in stats]
        axes.errorbar(counts, means, yerr=errors, marker="o", capsize=3, label=method)
    axes.set_xlabel("number of LoRAs")
    axes.set_ylabel("mean CLIPScore (95% CI)")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path)


def _concepts(row: dict[str, Any]) -> tuple:
    """What a grid groups by besides the prompt: the LoRAs' triggers (so TARA-trained files of the same
    concepts share a grid with plain ones), or the LoRA set's name."""
    triggers = tuple(lora.get("trigger") for lora in row.get("loras", []))
    return triggers if triggers and all(triggers) else (row["lora_set"],)


def comparison_grids(rows: list[dict[str, Any]], folder: Path, tile: int = 96) -> list[tuple[Path, str]]:
    """One grid per (prompt, concepts): a row per method, a column per seed (the first GRID_SEEDS),
    each image labelled with its CLIPScore and framed green/red when a judge found all concepts or not."""
    methods = list(dict.fromkeys(row["method"] for row in rows))
    cells: dict[tuple, dict[tuple, dict]] = defaultdict(dict)
    for row in rows:
        cells[(row["prompt"], _concepts(row))][(row["method"], row["seed"])] = row
    folder.mkdir(parents=True, exist_ok=True)
    font = ImageFont.load_default(size=13)
    label, header, caption, pad = 110, 18, 16, 3
    grids = []
    for index, ((prompt, concepts), by_cell) in enumerate(cells.items()):
        seeds = sorted({seed for _, seed in by_cell})[:GRID_SEEDS]
        shown = [m for m in methods if any((m, seed) in by_cell for seed in seeds)]
        width, height = tile + 2 * pad, tile + 2 * pad + caption
        grid = Image.new("RGB", (label + width * len(seeds), header + height * len(shown)), "white")
        draw = ImageDraw.Draw(grid)
        for column, seed in enumerate(seeds):
            draw.text((label + column * width + pad, 2), f"seed {seed}", fill="dimgray", font=font)
        for line, method in enumerate(shown):
            top = header + line * height
            draw.text((4, top + tile // 2), method, fill="black", font=font)
            for column, seed in enumerate(seeds):
                row = by_cell.get((method, seed))
                if row is None:
                    continue
                left = label + column * width
                if row.get("all_present") is not None:
                    draw.rectangle((left, top, left + width - 1, top + tile + 2 * pad - 1),
                                   fill="seagreen" if row["all_present"] else "firebrick")
                with Image.open(folder.parent / row["image"]) as image:
                    image = image.convert("RGB")
                    scale = tile / max(image.size)
                    resample = Image.NEAREST if scale >= 1 else Image.LANCZOS  # keep small images' pixels crisp
                    image = image.resize((round(image.width * scale), round(image.height * scale)), resample)
                grid.paste(image, (left + pad, top + pad))
                draw.text((left + pad, top + tile + 2 * pad), f"{row['clip_score']:.1f}", fill="dimgray", font=font)
        path = folder / f"grid-{index:03d}.png"
        grid.save(path)
        grids.append((path, f"{prompt} | {', '.join(concepts)} | seeds {', '.join(map(str, seeds))}"))
    return grids


def _embedded(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _number(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def _stat_cells(stats: dict[str, Any]) -> str:
    if not stats["n"]:
        return "<td>–</td><td>–</td>"
    ci = "" if stats["ci95_low"] is None else f" [{_number(stats['ci95_low'])}, {_number(stats['ci95_high'])}]"
    return f"<td>{_number(stats['mean'])} ± {_number(stats['std'])}</td><td>{ci.strip() or '–'}</td>"


def _judged(row: dict[str, Any]) -> str:
    """A judge's verdict on one image: each concept present (+) or missing (-), and placed or not."""
    present = row.get("judge_present")
    if present is None:
        return "–"
    placed = row.get("judge_in_region", {})
    return " ".join(
        f"{trigger} {'+' if found else '-'}" + (f"/{'in' if placed[trigger] else 'out'}" if trigger in placed else "")
        for trigger, found in present.items()
    )


def render_html(rows, summary, plots: list[Path], grids: list[tuple[Path, str]]) -> str:
    e = html.escape
    metrics = measured(summary)

    def cells(group) -> str:
        return "".join(_stat_cells(group[metric]) for metric in metrics)

    method_rows = "".join(
        f"<tr><td>{e(method)}</td><td>all</td><td>{entry['clip_score']['n']}</td>{cells(entry)}</tr>"
        + "".join(
            f"<tr class=sub><td></td><td>{count}</td><td>{group['clip_score']['n']}</td>{cells(group)}</tr>"
            for count, group in entry["by_num_loras"].items()
        )
        for method, entry in summary["methods"].items()
    )
    metric_heads = "".join(f"<th>{e(METRIC_TITLES[m])} mean ± std</th><th>95% CI</th>" for m in metrics)
    image_rows = "".join(
        f"<tr><td><a href='{e(row['image'])}'><img src='{e(row['image'])}' width=96 loading=lazy></a></td>"
        f"<td>{e(row['method'])}</td><td>{e(row['lora_set'])} ({row['num_loras']})</td><td>{row['seed']}</td>"
        f"<td>{e(row['prompt'])}</td><td>{row['clip_score']:.2f}</td>"
        f"<td>{e(', '.join(f'{k}: {v:.2f}' for k, v in row.get('region_scores', {}).items())) or '–'}</td>"
        f"<td>{e(_judged(row))}</td>"
        f"<td>{row['seconds']:.2f}</td><td>{row['peak_memory_mb']:.0f}</td></tr>"
        for row in rows
    )
    first = rows[0]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>loracompose evaluation report</title>
<style>
body {{ font-family: sans-serif; margin: 24px; max-width: 1200px; color: #222 }}
table {{ border-collapse: collapse; margin: 8px 0 20px }} td, th {{ border: 1px solid #ccc; padding: 3px 8px }}
tr.sub td {{ color: #555; font-size: 90% }} .caveat {{ background: #fff4d6; border-left: 4px solid #e0a800;
padding: 8px 12px }} figure {{ display: inline-block; margin: 6px }} img {{ image-rendering: pixelated }}
</style></head><body>
<h1>loracompose evaluation report</h1>
<p>{len(rows)} images &middot; model <code>{e(str(first['model']))}</code> &middot;
CLIP <code>{e(first['clip_model'])}</code> ({e(first['clip_convention'])} convention) &middot;
{first['steps']} steps, {first['height']}x{first['width']} px, guidance {first['guidance']}</p>
<p class="caveat"><b>Caveat.</b> {e(CAVEAT)}</p>
<h2>Summary</h2>
<p>Rates (all concepts present, share of concepts present, all in their regions) come from a ground-truth judge where the model has one
(the toy world's); their mean is the share of images.</p>
<table><tr><th>method</th><th>LoRAs</th><th>n</th>{metric_heads}</tr>{method_rows}</table>
<h2>Plots</h2>
{''.join(f"<figure><img src='{_embedded(p)}' alt='{e(p.stem)}'></figure>" for p in plots)}
<h2>Same seed across methods</h2>
{''.join(f"<figure><img src='{_embedded(p)}' alt='{e(p.stem)}'><figcaption>{e(c)}</figcaption></figure>"
         for p, c in grids)}
<h2>Every image</h2>
<table><tr><th>image</th><th>method</th><th>LoRA set</th><th>seed</th><th>prompt</th><th>CLIPScore</th>
<th>region scores</th><th>judge</th><th>seconds</th><th>peak MB</th></tr>{image_rows}</table>
</body></html>
"""


def write_report(results_dir: str | Path) -> Path:
    """Write the summary files, plots, grids and report.html for a results folder; returns the page."""
    out = Path(results_dir)
    rows = read_rows(out / RESULTS)
    if not rows:
        raise ComposeError(f"{out / RESULTS} holds no rows; run `loracompose eval CONFIG --out {out}` first")
    summary = summarize(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    write_csv(summary, out / "summary.csv")
    (out / "summary.md").write_text(markdown_table(summary))
    (out / "plots").mkdir(exist_ok=True)
    plots = [out / "plots" / "box_by_method.png", out / "plots" / "score_vs_num_loras.png"]
    plot_box_by_method(rows, plots[0])
    plot_score_vs_loras(summary, plots[1])
    grids = comparison_grids(rows, out / "grids")
    page = out / "report.html"
    page.write_text(render_html(rows, summary, plots, grids))
    return page


def run(args) -> int:
    page = write_report(args.results_dir)
    print(f"wrote {page} (summary.json, summary.csv, summary.md, plots/ and grids/ beside it)")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("report", help="summarise an eval results folder as tables, plots and an HTML page")
    parser.add_argument("results_dir", type=Path, help="folder written by `loracompose eval` (holds results.jsonl)")
    parser.set_defaults(run=run)
