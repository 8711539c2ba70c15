"""`loracompose bench`: seconds, UNet calls and peak memory per image of each method, side by side.

Every configuration runs once to warm up, then the configurations take turns for each repeat, so
slow drift of a shared machine hits all of them alike; ratios are taken against single-LoRA
generation (merge with the first LoRA) measured in the same run. Memory is what one image adds
above the process's resident level before it (the process's own RSS only grows, so it would read
alike on every row).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from compose.errors import ComposeError
from compose.loading import resolve_loras
from compose.methods import METHODS
from compose.saving import save_lora
from compose.spec import LoraSpec
from pipelines.loading import load_pipeline
from pipelines.random_adapters import ADAPTER_KINDS, write_random_adapter
from pipelines.tiny import random_lora_layers

from .memory import PeakMemory

TRIGGERS = ("sks", "zwx", "vrn", "qpl", "bkt", "fjh")
CONCEPTS = ("cat", "dog", "car", "tree", "house", "man")
# What a method must be told to run on the random LoRAs at all: klora takes the second one (zwx) as the style.
ROLE_OPTIONS = {"klora": {"style_triggers": [TRIGGERS[1]]}}
# Methods also timed against the method they build on, which then runs beside them.
BASELINES = {"loratorio": "composite"}


@dataclass
class BenchRow:
    method: str
    num_loras: int
    seconds: float
    ratio: float
    unet_calls: float
    unet_passes: float
    peak_mb: float  # peak resident memory the image adds above the process's level before it (PeakMemory)
    memory_ratio: float = float("nan")
    error: str | None = None
    adapter_type: str = "LoRA"  # of the random files (LoRA, LoHa, LoKr, DoRA), or "file" for the user's
    baseline: str | None = None  # BASELINES: the method this one is also timed against, same N and type
    baseline_ratio: float = float("nan")


def _side_by_side(index: int, count: int) -> tuple[float, float, float, float]:
    return (0.0, index / count, 1.0, (index + 1) / count)


def bench_loras(pipe, count: int, folder: Path, adapter_type: str = "LoRA") -> list[LoraSpec]:
    """Random adapters of one type and rank 4 on the attention projections, with triggers, concept words
    and side-by-side boxes, so every method can run."""
    specs = []
    for index in range(count):
        path = folder / f"{adapter_type}{index}.safetensors"
        words = dict(trigger=TRIGGERS[index], concept=CONCEPTS[index])
        if adapter_type == "LoRA":
            save_lora(path, random_lora_layers(pipe, seed=index + 1), 4, 4.0, **words)
        else:
            write_random_adapter(pipe, path, adapter_type, index + 1, rank=4, alpha=4.0, convs=False, **words)
        specs.append(LoraSpec(path, trigger=TRIGGERS[index], concept=CONCEPTS[index], region=_side_by_side(index, count)))
    return specs


def file_loras(pipe, files: list[str]) -> list[LoraSpec]:
    """The user's LoRA files, side by side, with the trigger and concept words their metadata holds."""
    resolved = resolve_loras(pipe, [LoraSpec(file) for file in files])
    return [
        LoraSpec(lora.path, trigger=lora.trigger, concept=lora.concept, region=_side_by_side(index, len(files)))
        for index, lora in enumerate(resolved)
    ]


def bench_prompt(specs: list[LoraSpec]) -> str:
    """ "a sks cat and a zwx dog": every LoRA's trigger on its concept word."""
    missing = [str(spec.source) for spec in specs if not (spec.trigger and spec.concept)]
    if missing:
        raise ComposeError(f"LoRA {missing[0]} has no trigger or concept word in its metadata; pass --prompt")
    return " and ".join(f"a {spec.trigger} {spec.concept}" for spec in specs)


def run_benchmark(
    pipe, methods, counts, steps=10, repeats=3, size=None, options=None, files=None, prompt=None, adapter_types=("LoRA",)
) -> list[BenchRow]:
    """files: LoRA files to time (N uses the first N) instead of random ones; prompt: one prompt for every N;
    adapter_types: random files of each of these types, side by side (ratios against a plain LoRA's single)."""
    given = options or {}
    options = {name: {**ROLE_OPTIONS.get(name, {}), **given.get(name, {})} for name in {*ROLE_OPTIONS, *given}}
    most = len(files) if files else len(TRIGGERS)
    if max(counts) > most or min(counts) < 1:
        raise ComposeError(f"--num-loras must be between 1 and {most}")
    unknown = sorted(set(adapter_types) - set(ADAPTER_KINDS))
    if unknown or not adapter_types:
        raise ComposeError(f"--adapter-types {unknown or '(none)'}: choose from {list(ADAPTER_KINDS)}")
    types = ["file"] if files else list(dict.fromkeys(["LoRA", *adapter_types]))
    methods = list(dict.fromkeys([*methods, *(BASELINES[m] for m in methods if m in BASELINES)]))
    with tempfile.TemporaryDirectory() as tmp:
        specs = {
            kind: file_loras(pipe, files) if files else bench_loras(pipe, max(counts), Path(tmp), kind) for kind in types
        }
        prompts = {count: prompt or bench_prompt(specs[types[0]][:count]) for count in [*counts, 1]}
        configs = [("single", 1, types[0])] + [
            (m, n, kind) for kind in types if kind in adapter_types or files for n in counts for m in methods
        ]

        def once(method, count, kind):
            name = "merge" if method == "single" else method
            with PeakMemory() as peak:
                start = time.perf_counter()
                out = pipe(
                    prompts[count], loras=specs[kind][:count], method=name, method_options=options.get(name),
                    num_inference_steps=steps, height=size, width=size, generator=torch.Generator().manual_seed(0),
                    output_type="np",
                )  # fmt: skip
                seconds = time.perf_counter() - start
            return seconds, out.unet_calls, out.unet_passes, peak.rss_bytes / 2**20

        errors, samples = {}, {config: [] for config in configs}
        for config in configs:  # warm-up: loads adapters, fills caches
            try:
                once(*config)
            except ComposeError as error:
                errors[config] = str(error)
        for _ in range(repeats):
            for config in configs:
                if config not in errors:
                    samples[config].append(once(*config))
    if configs[0] in errors:
        raise ComposeError(f"single-LoRA generation failed: {errors[configs[0]]}")
    single = statistics.median(s[0] for s in samples[configs[0]])
    rows = []
    for method, count, kind in configs:
        config = (method, count, kind)
        if config in errors:
            rows.append(BenchRow(method, count, float("nan"), float("nan"), 0, 0, 0, error=errors[config], adapter_type=kind))
            continue
        seconds = statistics.median(s[0] for s in samples[config])
        calls, passes = samples[config][0][1:3]
        peak = max(s[3] for s in samples[config])
        rows.append(BenchRow(method, count, seconds, seconds / single, calls, passes, peak, adapter_type=kind))
    table = {(row.method, row.num_loras, row.adapter_type): row for row in rows}
    for row in rows:
        row.memory_ratio = row.peak_mb / rows[0].peak_mb if rows[0].peak_mb > 0 else float("nan")
        if row.method in BASELINES:
            row.baseline = BASELINES[row.method]
            row.baseline_ratio = row.seconds / table[row.baseline, row.num_loras, row.adapter_type].seconds
    return rows


def format_table(rows: list[BenchRow]) -> str:
    lines = [
        f"{'method':<10} {'type':<5} {'N':>2} {'s/image':>9} {'x single':>9} {'UNet calls':>10} {'passes':>7} "
        f"{'peak MB':>8} {'mem x':>6}"
    ]
    for r in rows:
        if r.error:
            lines.append(f"{r.method:<10} {r.adapter_type:<5} {r.num_loras:>2}  error: {r.error}")
        else:
            lines.append(
                f"{r.method:<10} {r.adapter_type:<5} {r.num_loras:>2} {r.seconds:>9.3f} {r.ratio:>9.2f} {r.unet_calls:>10.0f} "
                f"{r.unet_passes:>7.0f} {r.peak_mb:>8.1f} {r.memory_ratio:>6.2f}"
                + (f"  {r.baseline_ratio:.2f} x {r.baseline}" if r.baseline else "")
            )
    return "\n".join(lines)


def run(args) -> int:
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    options = {}
    for text in args.option:
        method, _, assignment = text.partition(":")
        key, _, value = assignment.partition("=")
        options.setdefault(method, {})[key] = json.loads(value)
    rows = run_benchmark(
        pipe, args.methods, args.num_loras, args.steps, args.repeats, args.size, options, args.lora, args.prompt,
        args.adapter_types,
    )  # fmt: skip
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
        print(f"saved {args.json}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="time every method against single-LoRA generation")
    parser.add_argument("--model", default="tiny", help="diffusers folder, hub id, 'tiny' (default) or 'tiny-sdxl'")
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS), choices=sorted(METHODS))
    parser.add_argument("--num-loras", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, help="image size in pixels (default: the model's)")
    parser.add_argument("--option", action="append", default=[], metavar="METHOD:KEY=VALUE")
    parser.add_argument("--json", help="also save the rows as JSON here")
    parser.add_argument(
        "--lora", action="append", metavar="FILE", help="time these LoRA files (N uses the first N) instead of random ones"
    )
    parser.add_argument("--prompt", help="with --lora: the prompt (default: each LoRA's trigger and concept word)")
    parser.add_argument(
        "--adapter-types", nargs="+", default=["LoRA"], choices=ADAPTER_KINDS, metavar="TYPE",
        help="random files of these types (LoRA LoCon DoRA LoHa LoKr), rank 4 on the same layers, side by side",
    )  # fmt: skip
    parser.set_defaults(run=run)
