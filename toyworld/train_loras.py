"""Train the toy world's concept LoRAs (sks, zwx, vrn and the qpl style) with the project's trainer, and measure them.

    python -m toyworld.train_loras --out toyworld/loras            # train all, then measure
    python -m toyworld.train_loras --out toyworld/loras --measure  # measure the shipped files only

Each concept comes in two variants: `<trigger>.safetensors`, a plain LoRA for every method, and
`<trigger>_tara.safetensors`, trained with TARA's token mask for the `tara` method.
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
from toyworld.world import STYLE_TRIGGERS, concept_scene

CLASS_WORDS = {"sks": "square", "zwx": "circle", "vrn": "triangle", "qpl": "style"}
SCENES = 128
TRAINING = dict(steps=400, lr=1e-3, rank=8, alpha=16.0, batch_size=32, seed=0, checkpoint_every=0)
GENERATION = dict(height=32, width=32, num_inference_steps=25, guidance_scale=4.0)
# variant: (file suffix, trainer's token_mask, method it is measured with)
VARIANTS = {"plain": ("", False, "merge"), "tara": ("_tara", True, "tara")}


def lora_file(folder: Path, trigger: str, variant: str) -> Path:
    return folder / f"{trigger}{VARIANTS[variant][0]}.safetensors"


def training_pairs(trigger: str, count: int = SCENES) -> list[tuple[np.ndarray, str]]:
    """Rendered concept scenes with the renderer's captions ("a sks square on the left", ...)."""
    scenes = [concept_scene(trigger, seed) for seed in range(count)]
    return [(scene.image, scene.caption) for scene in scenes]


def train_all(pipe, out: Path, triggers, variants) -> dict[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}
    for variant in variants:
        for trigger in triggers:
            path = lora_file(out, trigger, variant)
            options = TaraTrainingOptions(
                rare_token=trigger, class_word=CLASS_WORDS[trigger], token_mask=VARIANTS[variant][1], **TRAINING
            )
            began = time.perf_counter()
            train_tara(pipe, training_pairs(trigger), path, options, progress=False)
            seconds[path.stem] = time.perf_counter() - began
            checkpoint = path.with_name(path.stem + ".checkpoint")
            for leftover in checkpoint.glob("*"):
                leftover.unlink()
            checkpoint.rmdir()
            print(f"{path.stem}: trained in {seconds[path.stem]:.0f} s", flush=True)
    return seconds


def measure_prompt(trigger: str) -> str:
    """ "a sks square"; a style is asked for on a base shape: "a red circle in qpl style"."""
    if trigger in STYLE_TRIGGERS:
        return f"a red circle in {trigger} {CLASS_WORDS[trigger]}"
    return f"a {trigger} {CLASS_WORDS[trigger]}"


def generate(pipe, prompt: str, seeds, lora: Path | None = None, method: str = "tara") -> list[Image.Image]:
    """One image per seed, all seeds in one batch."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    loras = [str(lora)] if lora else None
    kwargs = dict(loras=loras, method=method) if lora else {}
    return pipe(prompt, num_images_per_prompt=len(generators), generator=generators, **GENERATION, **kwargs).images


def concept_rate(images, trigger: str) -> float:
    return sum(judge(image).has_concept(trigger) for image in images) / len(images)


def measure(pipe, out: Path, triggers, variants, seeds) -> tuple[dict, dict]:
    """{trigger: rates of each variant then the base} and the images, rows variants then base per trigger."""
    rates, rows = {}, {}
    for trigger in triggers:
        prompt = measure_prompt(trigger)
        rows[trigger] = [generate(pipe, prompt, seeds, lora_file(out, trigger, v), VARIANTS[v][2]) for v in variants]
        rows[trigger].append(generate(pipe, prompt, seeds))
        rates[trigger] = [concept_rate(images, trigger) for images in rows[trigger]]
        shown = "  ".join(f"{name} {rate:.0%}" for name, rate in zip([*variants, "base"], rates[trigger]))
        print(f"{trigger}: {shown}", flush=True)
    return rates, rows


def save_grid(rows: dict, path: Path, scale: int = 3) -> None:
    """Rows top to bottom: per trigger, each variant's LoRA then the base model, same prompt and seeds."""
    lines = [np.concatenate([np.asarray(image) for image in images], axis=1) for group in rows.values() for images in group]
    grid = Image.fromarray(np.concatenate(lines, axis=0))
    grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("toyworld/loras"))
    parser.add_argument("--triggers", nargs="+", default=list(CLASS_WORDS), choices=list(CLASS_WORDS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--measure", action="store_true", help="only measure the LoRAs already in --out")
    args = parser.parse_args()
    torch.manual_seed(0)
    pipe = load_pipeline(str(toyworld.default_model_path()))
    pipe.set_progress_bar_config(disable=True)
    if not args.measure:
        train_all(pipe, args.out, args.triggers, args.variants)
    _, rows = measure(pipe, args.out, args.triggers, args.variants, range(args.seeds))
    save_grid(rows, args.out / "samples.png")


if __name__ == "__main__":
    main()
