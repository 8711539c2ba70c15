"""Reports: statistics, files written, and an HTML page that shows every image and the CLIPScore caveat."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from PIL import Image

from eval.harness import RESULTS, append_row
from eval.report import CAVEAT, describe, write_report


def test_describe_gives_mean_std_and_t_interval():
    stats = describe([1.0, 2.0, 3.0, 4.0])
    assert stats["mean"] == 2.5 and stats["std"] == pytest.approx(1.2909944)
    assert stats["ci95_high"] - stats["mean"] == pytest.approx(3.182 * 1.2909944 / 2)
    assert describe([5.0]) == {"n": 1, "mean": 5.0, "std": None, "ci95_low": None, "ci95_high": None}
    assert describe([])["n"] == 0


@pytest.fixture()
def results(tmp_path):
    """A results folder as `loracompose eval` leaves it: 3 methods x 2 LoRA sets x 2 seeds."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for method in ("merge", "switch", "composite"):
        for lora_set, count in (("cat", 1), ("cat_dog", 2)):
            for seed in (0, 1):
                name = f"images/{method}-{lora_set}-{seed}.png"
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / name)
                regions = {"cat": float(rng.uniform(10, 30))} if count == 2 else {}
                append_row(tmp_path / RESULTS, {
                    "id": name, "prompt": "a sks cat and a zwx dog", "seed": seed, "method": method,
                    "lora_set": lora_set, "num_loras": count, "clip_score": float(rng.uniform(10, 40)),
                    "region_scores": regions, "image": name, "model": "tiny", "clip_model": "tiny",
                    "clip_convention": "torchmetrics", "steps": 2, "height": 32, "width": 32, "guidance": 7.5,
                    "seconds": 0.5, "peak_memory_mb": 12.0,
                })  # fmt: skip
    return tmp_path


def test_report_writes_summaries_plots_grids_and_a_page_showing_every_image(results):
    page = write_report(results)
    rows = [json.loads(line) for line in (results / RESULTS).read_text().splitlines()]
    summary = json.loads((results / "summary.json").read_text())
    merge = summary["methods"]["merge"]
    merge_scores = [r["clip_score"] for r in rows if r["method"] == "merge"]
    assert merge["clip_score"]["mean"] == pytest.approx(np.mean(merge_scores))
    assert merge["clip_score"]["std"] == pytest.approx(np.std(merge_scores, ddof=1))
    assert merge["by_num_loras"]["2"]["clip_score"]["n"] == 2 and merge["by_num_loras"]["2"]["region_score"]["n"] == 2
    lines = list(csv.DictReader(open(results / "summary.csv")))
    assert {(line["method"], line["num_loras"], line["score"]) for line in lines} >= {
        ("switch", "all", "clip_score"), ("switch", "1", "clip_score"), ("switch", "2", "region_score")
    }  # fmt: skip
    assert (results / "plots" / "box_by_method.png").is_file()
    assert (results / "plots" / "score_vs_num_loras.png").is_file()
    grids = sorted((results / "grids").iterdir())
    assert len(grids) == 2  # one per (prompt, LoRA set): a row per method, a column per seed
    assert Image.open(grids[0]).size == (110 + 2 * 102, 18 + 3 * 118)

    text = page.read_text()
    sources = set(re.findall(r"src='([^']+)'", text))
    assert {row["image"] for row in rows} <= sources
    assert all((results / src).is_file() for src in sources if not src.startswith("data:"))
    assert sum(src.startswith("data:image/png;base64,") for src in sources) == 2 + 2  # plots and grids embedded
    assert "weak proxy" in text and "Multi-LoRA Composition" in text and CAVEAT[:40] in text
    assert "region score" in text


def test_judged_rows_give_presence_and_placement_rates(results):
    """Rows with a judge's verdicts: the summary's rates are shares of images (or of concepts)."""
    rows = [json.loads(line) for line in (results / RESULTS).read_text().splitlines()]
    verdicts = [({"sks": True, "zwx": True}, {"sks": True, "zwx": False}), ({"sks": True, "zwx": False}, {}),
                ({"sks": False, "zwx": False}, {}), ({"sks": True, "zwx": True}, {"sks": True, "zwx": True})]
    (results / RESULTS).unlink()
    for index, row in enumerate(rows):
        present, placed = verdicts[index % 4]
        row.update(judge_present=present, all_present=all(present.values()), judge_in_region=placed,
                   all_in_region=all(placed.values()) if placed else None)
        append_row(results / RESULTS, row)
    write_report(results)
    merge = json.loads((results / "summary.json").read_text())["methods"]["merge"]  # verdicts 0..3, once each
    assert merge["all_present"]["mean"] == pytest.approx(2 / 4)
    assert merge["concepts_present"]["mean"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert merge["all_in_region"]["n"] == 2 and merge["all_in_region"]["mean"] == pytest.approx(1 / 2)
    table = (results / "summary.md").read_text().splitlines()
    assert table[0].startswith("| method | LoRAs | n | CLIPScore | region score | all concepts present |")
    assert "| merge | 1 | 2 |" in table[2] and "| 50% |" in table[2]  # seeds 0, 1 of LoRA set 'cat'
    assert "sks +/in zwx +/out" in (results / "report.html").read_text()
