"""`loracompose eval CONFIG`: generate a grid of images with several methods, score them, log one row each.

The grid is prompt x LoRA set x method x seed; a LoRA set may bring its own prompts and a method may
run on some sets only (the toy-world preset pairs TARA-trained files with the `tara` method).
Every row is appended to a JSON-lines file right
after its image is written, so a killed run rerun with the same command skips the finished rows.
Under `accelerate launch --num_processes K` each process takes a contiguous slice of the pending
rows and writes its own shard file; the main process merges them in grid order at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from compose.errors import ComposeError, UnknownMethodError
from compose.loading import resolve_loras
from compose.methods import build_method
from compose.spec import LoraSpec, ResolvedLora
from pipelines.generate import generate
from pipelines.loading import load_pipeline
from pipelines.recipe import save_png_with_recipe

from .clipscore import CONVENTIONS, CLIPScorer, default_clip
from .errors import ClipModelError, EvalConfigError
from .memory import PeakMemory

RESULTS = "results.jsonl"
OTHER_GRIDS = "results.other-grids.jsonl"
IMAGES = "images"
CONFIG_FIELDS = {
    "model", "prompts", "lora_sets", "methods", "seeds", "steps", "size", "guidance", "negative_prompt",
    "clip", "clip_pretrained", "clip_convention", "judge",
}  # fmt: skip
REQUIRED_FIELDS = ("lora_sets", "methods", "seeds")
LORA_FIELDS = {"file", "weight", "trigger", "concept", "region", "prompt", "name"}
SET_FIELDS = {"loras", "prompts", "seeds"}
METHOD_FIELDS = {"name", "options", "label", "lora_sets"}
# Ground-truth judges: name -> module with composition_scores(image, loras, prompt) -> row fields
# and check_composition(loras, height, width), which raises ValueError for what it cannot judge.
JUDGES = {"toyworld": "toyworld.judge"}
# Configs shipped with the project, run by name: `loracompose eval toyworld`.
PRESETS = {"toyworld": Path(__file__).resolve().parent.parent / "toyworld" / "eval.toml"}


@dataclass(frozen=True)
class MethodEntry:
    """A method with its options; `label` tells two option sets of one method apart in the results.

    lora_sets: the sets it runs on (None: all of them).
    """

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    lora_sets: tuple[str, ...] | None = None


@dataclass
class EvalConfig:
    model: str
    prompts: list[str]  # for every LoRA set without prompts of its own
    lora_sets: dict[str, list[dict[str, Any]]]
    methods: list[MethodEntry]
    seeds: list[int]
    set_prompts: dict[str, list[str]] = field(default_factory=dict)
    set_seeds: dict[str, list[int]] = field(default_factory=dict)  # sets that run other seeds than `seeds`
    steps: int = 20
    height: int = 512
    width: int = 512
    guidance: float = 7.5
    negative_prompt: str = ""
    clip: str | None = None
    clip_pretrained: str | None = None
    clip_convention: str = "torchmetrics"
    judge: str | None = None

    def prompts_for(self, lora_set: str) -> list[str]:
        return self.set_prompts.get(lora_set, self.prompts)

    def seeds_for(self, lora_set: str) -> list[int]:
        return self.set_seeds.get(lora_set, self.seeds)


@dataclass(frozen=True)
class Job:
    """One cell of the grid: one image."""

    prompt: str
    lora_set: str
    method: MethodEntry
    seed: int


def config_path(name: str | Path) -> Path:
    """A config file, or the file of a preset named like `toyworld`."""
    path = Path(name)
    if not path.is_file() and str(name) in PRESETS:
        return PRESETS[str(name)]
    if not path.is_file():
        raise EvalConfigError("CONFIG", f"config file {path} does not exist; give a file or a preset ({sorted(PRESETS)})")
    return path


def load_config(path: str | Path) -> EvalConfig:
    """Read a .toml/.yaml/.json config (or a preset) and check every field; relative paths are taken from its folder."""
    path = config_path(path)
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        elif path.suffix == ".json":
            raw = json.loads(text)
        else:
            raise EvalConfigError("CONFIG", f"{path} must end in .toml, .yaml, .yml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as error:
        if isinstance(error, EvalConfigError):
            raise
        raise EvalConfigError("CONFIG", f"{path} cannot be parsed: {error}") from error
    if not isinstance(raw, dict):
        raise EvalConfigError("CONFIG", f"{path} must hold a table of fields, got {type(raw).__name__}")
    return parse_config(raw, path.parent)


def parse_config(raw: dict[str, Any], base: Path) -> EvalConfig:
    unknown = sorted(set(raw) - CONFIG_FIELDS)
    if unknown:
        raise EvalConfigError(unknown[0], f"unknown field; valid fields are {sorted(CONFIG_FIELDS)}")
    for name in REQUIRED_FIELDS:
        if name not in raw:
            raise EvalConfigError(name, "missing; it is required")
    height, width = _size(raw.get("size", 512))
    convention = raw.get("clip_convention", "torchmetrics")
    if convention not in CONVENTIONS:
        raise EvalConfigError("clip_convention", f"{convention!r} is not one of {sorted(CONVENTIONS)}")
    model = _text(raw.get("model", "tiny"), "model")
    if model != "tiny" and (base / model).exists():
        model = str((base / model).resolve())
    clip = raw.get("clip")
    if clip is not None:
        clip = _text(clip, "clip")
        clip = str((base / clip).resolve()) if (base / clip).exists() else clip
    elif default_clip() is None:
        raise EvalConfigError(
            "clip", "missing: no toy-world CLIP is installed; give a CLIP model folder (or an open_clip architecture)"
        )
    pretrained = raw.get("clip_pretrained")
    if pretrained is not None:
        pretrained = _text(pretrained, "clip_pretrained")
        pretrained = str((base / pretrained).resolve()) if (base / pretrained).is_file() else pretrained
    lora_sets, set_prompts, set_seeds = _lora_sets(raw["lora_sets"], base)
    if "prompts" not in raw and len(set_prompts) < len(lora_sets):
        missing = sorted(set(lora_sets) - set(set_prompts))
        raise EvalConfigError("prompts", f"missing; it is required unless every LoRA set has its own (not {missing})")
    judge = raw.get("judge")
    if judge is not None and judge not in JUDGES:
        raise EvalConfigError("judge", f"{judge!r} is not one of {sorted(JUDGES)}")
    return EvalConfig(
        model=model,
        prompts=_prompts(raw["prompts"], "prompts") if "prompts" in raw else [],
        lora_sets=lora_sets,
        methods=_methods(raw["methods"], set(lora_sets)),
        seeds=_seeds(raw["seeds"]),
        set_prompts=set_prompts,
        set_seeds=set_seeds,
        judge=judge,
        steps=_whole(raw.get("steps", 20), "steps", minimum=1),
        height=height,
        width=width,
        guidance=_number(raw.get("guidance", 7.5), "guidance"),
        negative_prompt=_text(raw.get("negative_prompt", ""), "negative_prompt", empty=True),
        clip=clip,
        clip_pretrained=pretrained,
        clip_convention=convention,
    )


def _text(value, name: str, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value.strip()):
        raise EvalConfigError(name, f"must be a non-empty string, got {value!r}")
    return value


def _whole(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise EvalConfigError(name, f"must be a whole number >= {minimum}, got {value!r}")
    return value


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EvalConfigError(name, f"must be a finite number, got {value!r}")
    return float(value)


def _size(value) -> tuple[int, int]:
    pair = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(pair, list) or len(pair) != 2:
        raise EvalConfigError("size", f"must be one number or [height, width], got {value!r}")
    for side in pair:
        if isinstance(side, bool) or not isinstance(side, int) or side < 8 or side % 8:
            raise EvalConfigError("size", f"sides must be whole multiples of 8 (the VAE's factor), got {value!r}")
    return pair[0], pair[1]


def _prompts(value, where: str) -> list[str]:
    if not isinstance(value, list) or not value:
        raise EvalConfigError(where, f"must be a non-empty list of strings, got {value!r}")
    return [_text(prompt, f"{where}[{i}]") for i, prompt in enumerate(value)]


def _seeds(value, name: str = "seeds") -> list[int]:
    """A list of seeds, or a count N meaning seeds 0..N-1."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return list(range(value))
    if not isinstance(value, list) or not value:
        raise EvalConfigError(name, f"must be a non-empty list of whole numbers, got {value!r}")
    for i, seed in enumerate(value):
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise EvalConfigError(f"{name}[{i}]", f"must be a whole number in [0, 2**63), got {seed!r}")
    if len(set(value)) != len(value):
        raise EvalConfigError(name, f"lists a seed twice: {value}")
    return list(value)


def _methods(value, set_names: set[str]) -> list[MethodEntry]:
    if not isinstance(value, list) or not value:
        raise EvalConfigError("methods", "must be a non-empty list of method names or {name, options, label} tables")
    methods = []
    for i, entry in enumerate(value):
        where = f"methods[{i}]"
        entry = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict):
            raise EvalConfigError(where, f"must be a method name or a table, got {entry!r}")
        unknown = sorted(set(entry) - METHOD_FIELDS)
        if unknown:
            raise EvalConfigError(f"{where}.{unknown[0]}", f"unknown field; valid fields are {sorted(METHOD_FIELDS)}")
        name = _text(entry.get("name"), f"{where}.name")
        options = entry.get("options") or {}
        if not isinstance(options, dict):
            raise EvalConfigError(f"{where}.options", f"must be a table of option values, got {options!r}")
        try:
            build_method(name, options)
        except ComposeError as error:
            part = "name" if isinstance(error, UnknownMethodError) else "options"
            raise EvalConfigError(f"{where}.{part}", str(error)) from error
        runs_on = entry.get("lora_sets")
        if runs_on is not None:
            if not isinstance(runs_on, list) or not runs_on or not set(runs_on) <= set_names:
                raise EvalConfigError(
                    f"{where}.lora_sets", f"must be a non-empty list of LoRA set names from {sorted(set_names)}, got {runs_on!r}"
                )
            runs_on = tuple(runs_on)
        methods.append(MethodEntry(_text(entry.get("label", name), f"{where}.label"), name, options, runs_on))
    for i, method in enumerate(methods):
        for other in methods[:i]:
            if other.label == method.label and not _disjoint(other.lora_sets, method.lora_sets):
                raise EvalConfigError(
                    f"methods[{i}].label",
                    f"'{method.label}' is taken by an entry that runs on the same LoRA sets; give each a distinct "
                    "`label`, or give both `lora_sets` without common names (one method, set-specific options)",
                )
    return methods


def _disjoint(first: tuple[str, ...] | None, second: tuple[str, ...] | None) -> bool:
    return first is not None and second is not None and not set(first) & set(second)


def _lora_sets(value, base: Path) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[str]], dict[str, list[int]]]:
    """The sets' LoRA entries, and the prompts and seeds of sets that bring their own
    ({loras = [...], prompts = [...], seeds = 50})."""
    if not isinstance(value, dict) or not value:
        raise EvalConfigError("lora_sets", "must be a table of named lists of LoRA entries")
    sets, prompts, seeds = {}, {}, {}
    for set_name, entries in value.items():
        where = f"lora_sets.{set_name}"
        if isinstance(entries, dict):
            unknown = sorted(set(entries) - SET_FIELDS)
            if unknown:
                raise EvalConfigError(f"{where}.{unknown[0]}", f"unknown field; valid fields are {sorted(SET_FIELDS)}")
            if "prompts" in entries:
                prompts[set_name] = _prompts(entries["prompts"], f"{where}.prompts")
            if "seeds" in entries:
                seeds[set_name] = _seeds(entries["seeds"], f"{where}.seeds")
            where, entries = f"{where}.loras", entries.get("loras")
        if not isinstance(entries, list) or not entries:
            raise EvalConfigError(where, "must be a non-empty list of LoRA entries {file, weight, trigger, ...}")
        sets[set_name] = [_lora_entry(entry, f"{where}[{i}]", base) for i, entry in enumerate(entries)]
    return sets, prompts, seeds


def _lora_entry(entry, where: str, base: Path) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise EvalConfigError(where, f"must be a table with at least `file`, got {entry!r}")
    unknown = sorted(set(entry) - LORA_FIELDS)
    if unknown:
        raise EvalConfigError(f"{where}.{unknown[0]}", f"unknown field; valid fields are {sorted(LORA_FIELDS)}")
    source = base / _text(entry.get("file"), f"{where}.file")
    if not source.exists():
        raise EvalConfigError(
            f"{where}.file", f"LoRA file {source.resolve()} does not exist (paths are relative to the config file)"
        )
    entry = {**entry, "file": str(source.resolve())}
    try:
        LoraSpec.from_dict(entry)
    except ComposeError as error:
        raise EvalConfigError(where, str(error)) from error
    return entry


def expand_grid(config: EvalConfig) -> list[Job]:
    """Every (prompt, LoRA set, method, seed), in the order rows are reported."""
    shared = [(prompt, name) for prompt in config.prompts for name in config.lora_sets if name not in config.set_prompts]
    own = [(prompt, name) for name, prompts in config.set_prompts.items() for prompt in prompts]
    return [
        Job(prompt, set_name, method, seed)
        for prompt, set_name in shared + own
        for method in config.methods
        if method.lora_sets is None or set_name in method.lora_sets
        for seed in config.seeds_for(set_name)
    ]


@dataclass
class PreparedGrid:
    """The grid after every check that needs the model: LoRAs resolved and hashed, prompts checked."""

    jobs: list[Job]
    loras: dict[str, list[ResolvedLora]]

    def recipe(self, config: EvalConfig, job: Job) -> dict[str, Any]:
        """What `loracompose generate` runs for this job (the same recipe is stored in the PNG)."""
        return {
            "model": config.model,
            "prompt": job.prompt,
            "negative_prompt": config.negative_prompt,
            "seed": job.seed,
            "steps": config.steps,
            "guidance": config.guidance,
            "height": config.height,
            "width": config.width,
            "method": job.method.name,
            "options": job.method.options,
            "loras": [
                {"source": str(lora.path), "weight": lora.weight, "trigger": lora.trigger, "concept": lora.concept,
                 "region": lora.recipe()["region"], "name": lora.adapter, "prompt": lora.spec.prompt}
                for lora in self.loras[job.lora_set]
            ],
        }  # fmt: skip

    def job_id(self, config: EvalConfig, job: Job) -> str:
        """Same cell (method label, LoRA set name), settings and LoRA contents -> same id, wherever the files live.

        The cell counts because two labels may run the same settings (or two sets the same files) and each
        is a row of its own. Options count with their defaults filled in, so a row made before a default
        changed is not reused.
        """
        recipe = self.recipe(config, job)
        recipe.update(label=job.method.label, lora_set=job.lora_set)
        recipe["options"] = dataclasses.asdict(build_method(job.method.name, job.method.options).options)
        for entry, lora in zip(recipe["loras"], self.loras[job.lora_set]):
            entry["source"] = lora.sha256
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:20]


def prepare_grid(pipe, config: EvalConfig) -> PreparedGrid:
    """Resolve every LoRA set on the model and run each method's input checks on each prompt."""
    loras = {}
    for set_name, entries in config.lora_sets.items():
        try:
            loras[set_name] = resolve_loras(pipe, [LoraSpec.from_dict(entry) for entry in entries])
        except ComposeError as error:
            raise EvalConfigError(f"lora_sets.{set_name}", str(error)) from error
        if config.judge:
            try:
                judge_module(config.judge).check_composition(loras[set_name], config.height, config.width)
            except ValueError as error:
                raise EvalConfigError(f"lora_sets.{set_name}", f"judge '{config.judge}': {error}") from error
    jobs = expand_grid(config)
    checked = set()
    for job in jobs:
        key = (job.prompt, job.lora_set, job.method.label)
        if key in checked:
            continue
        checked.add(key)
        try:
            method = build_method(job.method.name, job.method.options)
            method.check(pipe, job.prompt, loras[job.lora_set])
            method.check_size(pipe, loras[job.lora_set], config.height, config.width)
        except ComposeError as error:
            own = config.set_prompts.get(job.lora_set)
            where = f"lora_sets.{job.lora_set}.prompts" if own else "prompts"
            where += f"[{config.prompts_for(job.lora_set).index(job.prompt)}]"
            combination = f"with LoRA set '{job.lora_set}' and method '{job.method.label}'"
            raise EvalConfigError(where, f"{combination}: {error}") from error
    return PreparedGrid(jobs, loras)


# Result files: one JSON object per line, each line written whole and fsync'ed after its image.


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a results file; a torn last line (a run killed mid-write) is ignored."""
    if not path.is_file():
        return []
    rows = []
    lines = path.read_text().split("\n")
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines) - 1:  # only the last line can be torn; anything else is damage
                raise ComposeError(f"{path}, line {number + 1}, is not valid JSON; remove or repair that line")
    return rows


def drop_torn_tail(path: Path) -> None:
    """Cut an unfinished last line so the next row starts on a line of its own."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append one row as a single line and force it to disk."""
    line = json.dumps(row, sort_keys=True) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def result_files(out: Path) -> list[Path]:
    """results.jsonl, rows set aside from other grids, then shard files of distributed (maybe killed) runs."""
    return [out / RESULTS, out / OTHER_GRIDS, *sorted(out.glob("results.shard-*.jsonl"))]


def shard_file(out: Path, index: int, count: int) -> Path:
    return out / RESULTS if count == 1 else out / f"results.shard-{index}.jsonl"


def merge_results(out: Path, order: list[str]) -> list[dict[str, Any]]:
    """results.jsonl: this grid's rows in grid order, each once; shards removed.

    Rows of another grid (say, before `steps` changed) would mix into the report, so they move to
    results.other-grids.jsonl, and back when that grid is run again: no row is ever lost.
    """
    rows: dict[str, dict[str, Any]] = {}
    for path in result_files(out):
        for row in read_rows(path):
            rows.setdefault(row["id"], row)
    rank = {job_id: i for i, job_id in enumerate(order)}
    current = sorted((row for row in rows.values() if row["id"] in rank), key=lambda row: rank[row["id"]])
    _write_rows(out / OTHER_GRIDS, [row for row in rows.values() if row["id"] not in rank])
    _write_rows(out / RESULTS, current)
    for path in result_files(out)[2:]:
        path.unlink()
    return current


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace a results file whole (write, fsync, rename); no rows, no file."""
    if not rows:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, sort_keys=True) + "\n" for row in rows)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def load_scorer(config: EvalConfig, device) -> CLIPScorer:
    try:
        return CLIPScorer(config.clip, config.clip_pretrained, convention=config.clip_convention, device=device)
    except ClipModelError as error:
        raise EvalConfigError("clip", str(error)) from error


def run_job(pipe, scorer: CLIPScorer, config: EvalConfig, grid: PreparedGrid, job: Job, out: Path) -> dict[str, Any]:
    """Generate, save (with the recipe) and score one image; returns its row."""
    job_id = grid.job_id(config, job)
    start = time.perf_counter()
    with PeakMemory(device=pipe.device) as peak:
        image, recipe = generate(pipe, grid.recipe(config, job))
    seconds = time.perf_counter() - start
    relative = f"{IMAGES}/{job_id}.png"
    save_png_with_recipe(image, out / relative, recipe)
    start = time.perf_counter()
    scores = scorer.score_composition(image, job.prompt, grid.loras[job.lora_set])
    loras = grid.loras[job.lora_set]
    judged = judge_module(config.judge).composition_scores(image, loras, job.prompt) if config.judge else {}
    return {
        "id": job_id,
        "prompt": job.prompt,
        "negative_prompt": config.negative_prompt,
        "seed": job.seed,
        "method": job.method.label,
        "method_name": job.method.name,
        "options": recipe.get("options", job.method.options),
        "lora_set": job.lora_set,
        "num_loras": len(loras),
        "loras": [{key: lora.recipe()[key] for key in ("name", "sha256", "weight", "trigger", "concept", "region")}
                  for lora in loras],
        "model": config.model,
        "steps": config.steps,
        "height": config.height,
        "width": config.width,
        "guidance": config.guidance,
        "clip_model": scorer.name,
        "clip_convention": scorer.convention,
        **scores,
        **judged,
        "seconds": seconds,
        "score_seconds": time.perf_counter() - start,
        "peak_memory_mb": peak.peak_bytes / 2**20,
        "image": relative,
    }  # fmt: skip


def judge_module(name: str):
    """The module of a ground-truth judge, imported only when a config names it."""
    return importlib.import_module(JUDGES[name])


def run_eval(
    config_path: str | Path, out: str | Path | None = None, seeds: int | None = None
) -> list[dict[str, Any]]:
    """Run (or resume) the grid of a config; returns the merged rows on the main process, [] elsewhere.

    seeds: run seeds 0..seeds-1 instead of the config's (a quick look at a large preset).
    Everything is checked (config, LoRA files, methods, prompts, CLIP model) before the first image.
    """
    config = load_config(config_path)
    if seeds is not None:
        config.seeds, config.set_seeds = _seeds(seeds), {}
    out = Path(out) if out is not None else default_out(config_path)
    # Without CUDA the processes talk over gloo; accelerate only picks it when told the run is on CPU.
    state = PartialState(cpu=not torch.cuda.is_available())
    try:
        pipe = load_pipeline(config.model).to(state.device)
    except ComposeError as error:
        raise EvalConfigError("model", str(error)) from error
    pipe.set_progress_bar_config(disable=True)
    grid = prepare_grid(pipe, config)
    scorer = load_scorer(config, state.device)
    order = [grid.job_id(config, job) for job in grid.jobs]

    (out / IMAGES).mkdir(parents=True, exist_ok=True)
    own = shard_file(out, state.process_index, state.num_processes)
    drop_torn_tail(own)
    done = {row["id"] for path in result_files(out) for row in read_rows(path)}
    state.wait_for_everyone()  # every process sees the same finished rows before anyone adds one
    pending = [job for job, job_id in zip(grid.jobs, order) if job_id not in done]
    with state.split_between_processes(pending) as mine:
        bar = tqdm(mine, desc="eval", unit="img", disable=not state.is_main_process, file=sys.stderr)
        for job in bar:
            append_row(own, run_job(pipe, scorer, config, grid, job, out))
    state.wait_for_everyone()
    merged = merge_results(out, order) if state.is_main_process else []
    state.wait_for_everyone()
    return merged


def default_out(config_path: str | Path) -> Path:
    return Path("eval-results") / Path(config_path).stem


def run(args) -> int:
    rows = run_eval(args.config, args.out, args.seeds)
    if rows:
        out = args.out or default_out(args.config)
        print(f"{len(rows)} rows in {out / RESULTS}; summarise them with `loracompose report {out}`")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="generate and CLIP-score a grid of prompts x LoRA sets x methods x seeds",
        description="Resumable: rerun the same command after an interruption. Distributed: "
        "`accelerate launch --multi_gpu --num_processes K -m pipelines.cli eval CONFIG` (also on CPU-only machines: "
        "accelerate's --cpu flag starts a single process unless MPI is set up).",
    )
    parser.add_argument("config", help=f"grid config (.toml, .yaml or .json) or a preset: {', '.join(PRESETS)}")
    parser.add_argument("--out", type=Path, help="results folder (default: eval-results/<config name>)")
    parser.add_argument("--seeds", type=int, help="run seeds 0..N-1 instead of the config's")
    parser.set_defaults(run=run)
