"""Train the toy world's concept LoRAs (sks, zwx, vrn) with the project's TARA trainer, and measure them.

    python -m toyworld.train_loras --out toyworld/loras            # train all three, then measure
    python -m toyworld.train_loras --out toyworld/loras --measure  # measure the shipped files only

Deterministic: the training scenes, the LoRA initialisation and the noise stream are all seeded.
The measurement is the judge's concept rate for "a <trigger> <class>" with and without each LoRA.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import toyworld
from compose.training.tara import TaraTrainingOptions, train_tara
from pipelines.loading import load_pipeline
from toyworld.judge import judge
from toyworld.world import concept_scene

CLASS_WORDS = {"sks": "square", "zwx": "circle", "vrn": "triangle"}
SCENES = 128
TRAINING = dict(steps=400, lr=1e-3, rank=8, alpha=16.0, batch_size=32, seed=0, checkpoint_every=0)
GENERATION = dict(height=32, width=32, num_inference_steps=25, guidance_scale=4.0)


def training_pairs(trigger: str, count: int = SCENES) -> list[tuple[np.ndarray, str]]:
    """Rendered concept scenes with the renderer's captions ("a sks square on the left", ...)."""
    scenes = [concept_scene(trigger, seed) for seed in range(count)]
    return [(scene.image, scene.caption) for scene in scenes]


def train_all(pipe, out: Path, triggers) -> dict[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}
    for trigger in triggers:
        options = TaraTrainingOptions(rare_token=trigger, class_word=CLASS_WORDS[trigger], **TRAINING)
        began = time.perf_counter()
        train_tara(pipe, training_pairs(trigger), out / f"{trigger}.safetensors", options, progress=False)
        seconds[trigger] = time.perf_counter() - began
        for leftover in (out / f"{trigger}.checkpoint").glob("*"):
            leftover.unlink()
        (out / f"{trigger}.checkpoint").rmdir()
        print(f"{trigger}: trained in {seconds[trigger]:.0f} s", flush=True)
    return seconds


def generate(pipe, prompt: str, seeds, lora: Path | None = None, method: str = "tara") -> list[Image.Image]:
    """One image per seed, all seeds in one batch."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    loras = [str(lora)] if lora else None
    kwargs = dict(loras=loras, method=method) if lora else {}
    return pipe(prompt, num_images_per_prompt=len(generators), generator=generators, **GENERATION, **kwargs).images


def concept_rate(images, trigger: str) -> float:
    return sum(judge(image).has_concept(trigger) for image in images) / len(images)


def measure(pipe, out: Path, triggers, seeds) -> tuple[dict, dict]:
    """{trigger: (lora rate, base rate)} and the images, rows LoRA / base per trigger."""
    rates, rows = {}, {}
    for trigger in triggers:
        prompt = f"a {trigger} {CLASS_WORDS[trigger]}"
        with_lora = generate(pipe, prompt, seeds, out / f"{trigger}.safetensors")
        base = generate(pipe, prompt, seeds)
        rates[trigger] = (concept_rate(with_lora, trigger), concept_rate(base, trigger))
        rows[trigger] = (with_lora, base)
        print(f"{trigger}: LoRA {rates[trigger][0]:.0%}  base {rates[trigger][1]:.0%}", flush=True)
    return rates, rows


def save_grid(rows: dict, path: Path, scale: int = 3) -> None:
    """Rows top to bottom: each trigger's LoRA then the base model on the same prompt and seeds."""
    lines = [np.concatenate([np.asarray(image) for image in images], axis=1) for pair in rows.values() for images in pair]
    grid = Image.fromarray(np.concatenate(lines, axis=0))
    grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("toyworld/loras"))
    parser.add_argument("--triggers", nargs="+", default=list(CLASS_WORDS), choices=list(CLASS_WORDS))
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--measure", action="store_true", help="only measure the LoRAs already in --out")
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = load_pipeline(str(toyworld.default_model_path()))
    pipe.set_progress_bar_config(disable=True)
    if not args.measure:
        train_all(pipe, args.out, args.triggers)
    _, rows = measure(pipe, args.out, args.triggers, range(args.seeds))
    save_grid(rows, args.out / "samples.png")


if __name__ == "__main__":
    main()
