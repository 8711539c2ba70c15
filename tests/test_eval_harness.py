"""The batch harness: grid expansion, config checks before any image, resume after a kill, 2 processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import eval.harness as harness
from eval.errors import EvalConfigError
from eval.harness import OTHER_GRIDS, RESULTS, expand_grid, load_config, parse_config, prepare_grid, read_rows, run_eval

REPO = Path(__file__).resolve().parents[1]
TIMING = ("seconds", "score_seconds", "peak_memory_mb")


def base_config(loras) -> dict:
    cat = {"file": str(loras["cat"]), "trigger": "sks", "concept": "cat", "region": [0, 0, 1, 0.5]}
    dog = {"file": str(loras["dog"]), "trigger": "zwx", "concept": "dog", "region": [0, 0.5, 1, 1]}
    return {
        "model": "tiny",
        "clip": "tiny",
        "prompts": ["a sks cat and a zwx dog"],
        "seeds": [0],
        "steps": 2,
        "size": 32,
        "lora_sets": {"cat": [cat], "cat_dog": [dict(cat, prompt="a sks cat"), dog]},
        "methods": ["merge", {"name": "switch", "label": "switch-1", "options": {"switch_step": 1}}],
    }


def write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "grid.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, loras):
    """One uninterrupted single-process run of the 4-image grid: (config path, rows)."""
    folder = tmp_path_factory.mktemp("reference")
    config = write_config(folder, base_config(loras))
    return config, run_eval(config, folder / "out")


def without_timing(row: dict) -> dict:
    return {key: value for key, value in row.items() if key not in TIMING and not key.endswith("_scores")}


def test_grid_expands_prompt_set_method_seed(pipe, loras, tmp_path):
    raw = base_config(loras)
    raw["prompts"] = ["a sks cat and a zwx dog", "a zwx dog and a sks cat"]
    raw["lora_sets"]["dog"] = [raw["lora_sets"]["cat_dog"][1]]
    raw["seeds"] = [0, 1, 2]
    config = parse_config(raw, tmp_path)
    jobs = expand_grid(config)
    assert len(jobs) == 2 * 3 * 2 * 3
    assert [job.seed for job in jobs[:4]] == [0, 1, 2, 0]
    assert [job.method.label for job in jobs[:6]] == ["merge"] * 3 + ["switch-1"] * 3
    first_prompt = {(raw["prompts"][0], lora_set) for lora_set in ("cat", "cat_dog", "dog")}
    assert {(job.prompt, job.lora_set) for job in jobs[:18]} == first_prompt
    grid = prepare_grid(pipe, config)
    assert len({grid.job_id(config, job) for job in grid.jobs}) == 36


def test_rows_hold_the_recipe_scores_and_image(reference):
    config, rows = reference
    assert len(rows) == 4
    out = config.parent / "out"
    assert read_rows(out / RESULTS) == rows
    row = rows[-1]
    assert row["method"] == "switch-1" and row["method_name"] == "switch" and row["options"] == {"switch_step": 1}
    assert row["num_loras"] == 2 and [lora["name"] for lora in row["loras"]] == ["cat", "dog"]
    assert all(len(lora["sha256"]) == 64 for lora in row["loras"])
    assert row["model"] == "tiny" and row["clip_model"] == "tiny" and row["clip_convention"] == "torchmetrics"
    assert row["scored_prompt"] == "a cat and a dog"
    assert set(row["region_scores"]) == {"cat", "dog"} and row["region_prompts"] == {"cat": "a cat", "dog": "dog"}
    assert row["seconds"] > 0 and row["peak_memory_mb"] >= 0
    from pipelines.recipe import read_recipe

    recipe = read_recipe(out / row["image"])
    assert (recipe["prompt"], recipe["seed"], recipe["method"], recipe["steps"]) == (row["prompt"], 0, "switch", 2)
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(Path(r["image"]).name for r in rows)


class Killed(Exception):
    pass


def test_rerun_after_a_kill_mid_grid_gives_every_row_once(reference, tmp_path, monkeypatch):
    config, expected = reference
    out = tmp_path / "out"
    write_row = harness.append_row
    written = []

    def killed_after_two(path, row):
        write_row(path, row)
        written.append(row["id"])
        if len(written) == 2:
            raise Killed

    monkeypatch.setattr(harness, "append_row", killed_after_two)
    with pytest.raises(Killed):
        run_eval(config, out)
    assert len(read_rows(out / RESULTS)) == 2
    with open(out / RESULTS, "a") as handle:  # the kill tore the next row in half
        handle.write('{"id": "' + expected[2]["id"][:5])

    monkeypatch.setattr(harness, "append_row", write_row)
    generate, generated = harness.generate, []
    monkeypatch.setattr(harness, "generate", lambda *a: generated.append(1) or generate(*a))
    rows = run_eval(config, out)
    assert len(generated) == 2
    assert [row["id"] for row in rows] == [row["id"] for row in expected]
    assert [without_timing(r) for r in rows] == [without_timing(r) for r in expected]
    assert [r["clip_score"] for r in rows] == pytest.approx([r["clip_score"] for r in expected], abs=1e-4)
    assert read_rows(out / RESULTS) == rows
    assert run_eval(config, out) == rows and len(generated) == 2  # a finished grid generates nothing


def test_rows_of_another_grid_are_set_aside_and_come_back(reference, tmp_path, monkeypatch):
    config, expected = reference
    out = tmp_path / "out"
    shutil.copytree(config.parent / "out", out)
    monkeypatch.setattr(harness, "generate", lambda *a: pytest.fail("generated an image"))
    raw = json.loads(config.read_text())
    smaller = write_config(tmp_path / "merge_only", dict(raw, methods=["merge"]))
    rows = run_eval(smaller, out)
    assert [row["id"] for row in rows] == [row["id"] for row in expected if row["method"] == "merge"]
    assert [row["method"] for row in read_rows(out / OTHER_GRIDS)] == ["switch-1", "switch-1"]
    assert run_eval(config, out) == expected
    assert not (out / OTHER_GRIDS).exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_accelerate_processes_give_the_rows_of_one(reference, tmp_path):
    config, expected = reference
    accelerate_config = tmp_path / "accelerate.yaml"
    accelerate_config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\nnum_processes: 2\n"
        "machine_rank: 0\nmixed_precision: 'no'\ndynamo_config: {}\nuse_cpu: false\n"
    )
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
        "--main_process_port", str(free_port()), "-m", "pipelines.cli", "eval", str(config), "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(out / RESULTS)
    assert [row["id"] for row in rows] == [row["id"] for row in expected]
    assert [without_timing(r) for r in rows] == [without_timing(r) for r in expected]
    assert [r["clip_score"] for r in rows] == pytest.approx([r["clip_score"] for r in expected], abs=1e-3)
    assert sorted(p.name for p in out.iterdir()) == ["images", RESULTS]  # shards merged and removed


def not_a_lora(tmp_path: Path) -> str:
    path = tmp_path / "notes.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14)
    return str(path)


BAD_CONFIGS = {
    "unknown method": (lambda c, t: c["methods"].append("nosuch"), "methods[2].name"),
    "unknown option": (lambda c, t: c["methods"][1]["options"].update(speed=2), "methods[1].options"),
    "missing LoRA file": (
        lambda c, t: c["lora_sets"]["cat_dog"][1].update(file="gone.safetensors"), "lora_sets.cat_dog[1].file"
    ),
    "seed not a number": (lambda c, t: c.update(seeds=[0, "1"]), "seeds[1]"),
    "negative seed": (lambda c, t: c.update(seeds=[-1]), "seeds[0]"),
    "repeated seed": (lambda c, t: c.update(seeds=[3, 3]), "seeds"),
    "empty seed list": (lambda c, t: c.update(seeds=[]), "seeds"),
    "unknown field": (lambda c, t: c.update(colour="red"), "colour"),
    "unknown LoRA field": (lambda c, t: c["lora_sets"]["cat"][0].update(wieght=1), "lora_sets.cat[0].wieght"),
    "bad region": (lambda c, t: c["lora_sets"]["cat"][0].update(region=[0, 0, 0, 0]), "lora_sets.cat[0]"),
    "file is not a LoRA": (lambda c, t: c["lora_sets"]["cat"][0].update(file=not_a_lora(t)), "lora_sets.cat"),
    "bad size": (lambda c, t: c.update(size=30), "size"),
    "method on an unknown set": (lambda c, t: c["methods"].append({"name": "tara", "lora_sets": ["dogs"]}),
                                 "methods[2].lora_sets"),
    "shared label on shared sets": (lambda c, t: c["methods"].append({"name": "merge", "lora_sets": ["cat"]}),
                                    "methods[2].label"),
    "set without prompts": (lambda c, t: c.pop("prompts"), "prompts"),
    "unknown set field": (lambda c, t: c["lora_sets"].update(dog={"loras": [], "prompt": "x"}), "lora_sets.dog.prompt"),
    "unknown judge": (lambda c, t: c.update(judge="eyes"), "judge"),
    "bad seeds of a set": (lambda c, t: c["lora_sets"].update(dog={"loras": c["lora_sets"]["cat"], "seeds": [1, 1]}),
                           "lora_sets.dog.seeds"),
    "box under a pixel of the map grid": (
        lambda c, t: (c["methods"].append("composer"), c["lora_sets"]["cat"][0].update(region=[0, 0, 1, 0.02])),
        "prompts[0]",
    ),
    "judge cannot read the size": (lambda c, t: c.update(judge="toyworld", size=64), "lora_sets.cat"),
    "judge does not know the concept": (
        lambda c, t: (c.update(judge="toyworld"), c["lora_sets"]["cat"][0].update(trigger="bob")), "lora_sets.cat"
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_fails_before_generating_naming_the_field(case, loras, tmp_path, monkeypatch):
    mutate, field = BAD_CONFIGS[case]
    raw = base_config(loras)
    mutate(raw, tmp_path)
    monkeypatch.setattr(harness, "generate", lambda *a: pytest.fail("generated an image"))
    with pytest.raises(EvalConfigError) as error:
        run_eval(write_config(tmp_path, raw), tmp_path / "out")
    assert error.value.field == field
    assert f"'{field}'" in str(error.value)
    assert not (tmp_path / "out" / "images").exists() or not any((tmp_path / "out" / "images").iterdir())


def test_sets_with_own_prompts_and_methods_limited_to_sets(loras, tmp_path):
    raw = base_config(loras)
    cat, dog = raw["lora_sets"]["cat_dog"]
    raw["lora_sets"]["dog"] = {"prompts": ["a zwx dog", "a zwx dog on the right"], "loras": [dog]}
    raw["seeds"] = 2  # seeds 0 and 1
    raw["methods"] = [
        {"name": "merge", "lora_sets": ["cat", "cat_dog"]},
        {"name": "merge", "lora_sets": ["dog"], "options": {"fuse": True}},  # one label, set-specific options
        {"name": "switch", "lora_sets": ["dog"]},
    ]
    config = load_config(write_config(tmp_path, raw))
    cells = [(job.prompt, job.lora_set, job.method.label, job.seed) for job in expand_grid(config)]
    shared, own = "a sks cat and a zwx dog", ["a zwx dog", "a zwx dog on the right"]
    assert cells == (
        [(shared, name, "merge", seed) for name in ("cat", "cat_dog") for seed in (0, 1)]
        + [(prompt, "dog", label, seed) for prompt in own for label in ("merge", "switch") for seed in (0, 1)]
    )
    options = {(job.lora_set, job.method.label): job.method.options for job in expand_grid(config)}
    assert options[("dog", "merge")] == {"fuse": True} and options[("cat", "merge")] == {}


def test_job_ids_count_options_with_their_defaults(pipe, loras, tmp_path):
    def first_id(options):
        raw = dict(base_config(loras), methods=[{"name": "merge", "options": options}])
        config = load_config(write_config(tmp_path / f"config{len(list(tmp_path.iterdir()))}", raw))
        grid = prepare_grid(pipe, config)
        return grid.job_id(config, grid.jobs[0])

    assert first_id({}) == first_id({"fuse": False}) != first_id({"fuse": True})  # default written out or not


def test_cells_of_equal_settings_are_rows_of_their_own_and_resume(loras, tmp_path, monkeypatch):
    raw = base_config(loras)
    cat = raw["lora_sets"]["cat"]
    raw.update(lora_sets={"one": cat, "same_files": cat}, methods=["merge", {"name": "merge", "label": "again"}])
    config = write_config(tmp_path, raw)
    rows = run_eval(config, tmp_path / "out")
    assert [(row["lora_set"], row["method"]) for row in rows] == [
        ("one", "merge"), ("one", "again"), ("same_files", "merge"), ("same_files", "again")
    ]
    assert len({row["image"] for row in rows}) == 4
    monkeypatch.setattr(harness, "generate", lambda *a: pytest.fail("generated a finished row again"))
    assert run_eval(config, tmp_path / "out") == rows


def test_judged_rows_say_which_concepts_are_drawn_and_where(tmp_path):
    """The toy-world preset's judge on two seeds of one method: rows carry presence and placement."""
    rows = run_eval("toyworld", tmp_path / "out", seeds=1)
    by_method = {row["method"]: row for row in rows if row["lora_set"] == "pair"}
    assert set(by_method) == {"merge", "switch", "composite", "cmlora", "clora", "composer", "regional", "loratorio", "freefuse"}
    row = by_method["merge"]
    assert set(row["judge_present"]) == {"sks", "zwx"} and set(row["judge_in_region"]) == {"sks", "zwx"}
    assert row["all_present"] == all(row["judge_present"].values())
    assert row["all_in_region"] == all(row["judge_in_region"].values())
    assert {row["method"] for row in rows if row["lora_set"].endswith("_tara")} == {"tara"}
    ceiling = next(row for row in rows if row["lora_set"] == "pair_joint")
    assert ceiling["method"] == "ceiling (joint LoRA)" and set(ceiling["judge_present"]) == {"sks", "zwx"}
    assert {row["num_loras"] for row in rows} == {1, 2, 3}


def test_a_set_with_its_own_seeds_runs_them_until_a_quick_look_overrides_all(loras, tmp_path, monkeypatch):
    raw = base_config(loras)
    raw["seeds"] = 2
    raw["lora_sets"]["cat"] = {"loras": raw["lora_sets"]["cat"], "seeds": [7]}
    config = load_config(write_config(tmp_path, raw))
    seeds = {(job.lora_set, job.seed) for job in expand_grid(config)}
    assert seeds == {("cat", 7), ("cat_dog", 0), ("cat_dog", 1)}

    class Expanded(Exception):
        pass

    def stop(pipe, config):
        raise Expanded({(job.lora_set, job.seed) for job in expand_grid(config)})

    monkeypatch.setattr(harness, "prepare_grid", stop)
    with pytest.raises(Expanded) as quick:
        run_eval(write_config(tmp_path, raw), tmp_path / "out", seeds=1)
    assert quick.value.args[0] == {("cat", 0), ("cat_dog", 0)}


def test_toml_yaml_and_json_configs_read_alike(loras, tmp_path):
    import yaml

    raw = base_config(loras)
    toml = "\n".join(
        [f"{key} = {json.dumps(raw[key])}" for key in ("model", "clip", "prompts", "seeds", "steps", "size")]
        + ["methods = ['merge', { name = 'switch', label = 'switch-1', options = { switch_step = 1 } }]", "[lora_sets]"]
        + [f"{name} = [{', '.join(inline_table(e) for e in entries)}]" for name, entries in raw["lora_sets"].items()]
    )
    (tmp_path / "grid.toml").write_text(toml)
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(raw))
    configs = [load_config(tmp_path / name) for name in ("grid.toml", "grid.yaml")]
    assert configs[0] == configs[1] == load_config(write_config(tmp_path, raw))


def inline_table(entry: dict) -> str:
    return "{ " + ", ".join(f"{key} = {json.dumps(value)}" for key, value in entry.items()) + " }"


def test_example_config_is_valid(tmp_path, loras):
    example = REPO / "examples" / "eval_tiny.toml"
    (tmp_path / "loras").mkdir()
    for name in ("cat", "dog", "car"):
        (tmp_path / "loras" / f"{name}.safetensors").write_bytes(loras[name].read_bytes())
    copy = tmp_path / example.name
    copy.write_text(example.read_text())
    config = load_config(copy)
    assert config.model == "tiny" and len(expand_grid(config)) >= 8
