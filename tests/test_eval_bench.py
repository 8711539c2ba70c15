"""The benchmark on the user's own LoRA files: side by side with single-LoRA generation, prompts from metadata."""

from __future__ import annotations

import math

import pytest

from compose.errors import ComposeError
from eval.bench import format_table, run_benchmark


def test_benchmark_times_given_files_against_the_first_alone(pipe, loras):
    rows = run_benchmark(pipe, ["merge", "composite"], [1, 2], steps=2, repeats=1, files=[loras["cat"], loras["dog"]])
    table = {(row.method, row.num_loras): row for row in rows}
    assert list(table) == [("single", 1), ("merge", 1), ("composite", 1), ("merge", 2), ("composite", 2)]
    assert table[("single", 1)].ratio == 1.0 and all(math.isfinite(row.ratio) and row.error is None for row in rows)
    assert (table[("composite", 2)].unet_calls, table[("composite", 2)].unet_passes) == (2, 4)


def test_files_without_concept_words_need_a_prompt(pipe, loras):
    files = [loras["te_kohya"]]  # trigger sks in its metadata, no concept word
    with pytest.raises(ComposeError, match="--prompt"):
        run_benchmark(pipe, ["merge"], [1], steps=1, repeats=1, files=files)
    [single, merge] = run_benchmark(pipe, ["merge"], [1], steps=1, repeats=1, files=files, prompt="a sks cat")
    assert merge.error is None and single.unet_calls == 1
    with pytest.raises(ComposeError, match="between 1 and 1"):
        run_benchmark(pipe, ["merge"], [2], steps=1, repeats=1, files=files, prompt="a sks cat")


def test_memory_differs_per_method_clora_backward_above_single(pipe, loras):
    one_update = {"clora": {"max_iter_to_alter": 1, "refinement_rounds": 1}}  # one backward pass per image
    files = [loras["cat"], loras["dog"]]
    rows = run_benchmark(pipe, ["merge", "clora"], [2], steps=2, repeats=1, size=32, options=one_update, files=files)
    table = {(row.method, row.num_loras): row for row in rows}
    assert table[("clora", 2)].error is None
    assert table[("clora", 2)].memory_ratio > 1.5 * table[("merge", 2)].memory_ratio
    assert table[("clora", 2)].peak_mb > 1.5 * table[("single", 1)].peak_mb > 0


def test_adapter_types_run_side_by_side_against_a_plain_loras_single(pipe):
    rows = run_benchmark(pipe, ["merge", "composite"], [2], steps=1, repeats=1, adapter_types=["LoRA", "LoHa"])
    table = {(row.method, row.adapter_type): row for row in rows}
    assert list(table) == [("single", "LoRA"), ("merge", "LoRA"), ("composite", "LoRA"), ("merge", "LoHa"), ("composite", "LoHa")]
    assert all(row.error is None and math.isfinite(row.ratio) for row in rows)
    assert table[("composite", "LoHa")].unet_passes == table[("composite", "LoRA")].unet_passes == 2
    with pytest.raises(ComposeError, match="--adapter-types"):
        run_benchmark(pipe, ["merge"], [1], steps=1, repeats=1, adapter_types=["IA3"])


def test_klora_and_regional_are_timed_against_single_on_the_random_loras(pipe):
    rows = run_benchmark(pipe, ["regional", "klora"], [2, 3], steps=2, repeats=1, size=32)
    by_config = {(row.method, row.num_loras): row for row in rows}
    assert all(math.isfinite(by_config[(m, 2)].ratio) for m in ("regional", "klora"))
    assert by_config[("klora", 2)].unet_passes == 2 and by_config[("regional", 3)].unet_passes == 6  # thirds: no base
    assert "one subject LoRA and one style LoRA; got 3" in by_config[("klora", 3)].error


def test_loratorio_is_also_timed_against_composite_run_beside_it(pipe):
    rows = run_benchmark(pipe, ["loratorio", "freefuse"], [2], steps=2, repeats=1)
    table = {row.method: row for row in rows}
    assert list(table) == ["single", "loratorio", "freefuse", "composite"]
    assert all(row.error is None and math.isfinite(row.ratio) for row in rows)
    loratorio, composite = table["loratorio"], table["composite"]
    assert loratorio.baseline == "composite" and loratorio.baseline_ratio == loratorio.seconds / composite.seconds
    assert (loratorio.unet_passes, composite.unet_passes) == (6, 4)  # base + 2 LoRAs per step, 2 LoRAs per step
    assert (table["freefuse"].unet_calls, table["freefuse"].baseline) == (2 + 1, None)  # the steps and a map pass
    assert "x composite" in format_table(rows)
