"""Measure a toy model with the judge: single-shape and two-shape prompts over several seeds.

    python -m toyworld.measure --model toyworld/model --seeds 4 --grid toyworld/model/samples.png

Prints the rates as JSON; the grid (upscaled with nearest so pixels stay sharp) shows every image.
"""
from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from .judge import judge
from .world import COLOURS, OPPOSITE, SHAPES, phrase

GENERATION = dict(height=32, width=32, num_inference_steps=25, guidance_scale=4.0)


def single_shape_prompts() -> list[tuple[str, str, str]]:
    """(prompt, colour, shape) for every colour and shape."""
    return [(phrase(f"{c} {s}"), c, s) for c in COLOURS for s in SHAPES]


def two_shape_prompts(count: int = 24) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(prompt, [(colour, shape, position)] x 2): distinct colours, every pair of positions in turn."""
    rng = np.random.default_rng(0)
    prompts = []
    for i, first in zip(range(count), itertools.cycle(OPPOSITE)):
        c1, c2 = rng.choice(list(COLOURS), 2, replace=False)
        s1, s2 = rng.choice(SHAPES, 2)
        things = [(str(c1), str(s1), first), (str(c2), str(s2), OPPOSITE[first])]
        prompt = " and ".join(phrase(f"{c} {s}", p) for c, s, p in things)
        prompts.append((prompt, things))
    return prompts


def generate(pipe, prompts: list[str], seeds: range) -> list[list[Image.Image]]:
    """images[i][j]: prompt i with seed j, each seed its own generator so results do not depend on batching."""
    rows = []
    for prompt in prompts:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        rows.append(pipe([prompt] * len(seeds), generator=generators, **GENERATION).images)
    return rows


def image_grid(rows: list[list[Image.Image]], per_line: int = 6, scale: int = 4) -> Image.Image:
    """`per_line` prompts side by side, each with its seeds in a row; nearest upscaling keeps pixels sharp."""
    lines = [sum(rows[i : i + per_line], []) for i in range(0, len(rows), per_line)]
    blank = np.full_like(np.asarray(rows[0][0]), 255)
    width = max(len(line) for line in lines)
    grid = np.concatenate([
        np.concatenate([np.asarray(im) for im in line] + [blank] * (width - len(line)), 1) for line in lines
    ], 0)
    return Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)


def measure(pipe, seeds: range) -> tuple[dict, list[list[Image.Image]]]:
    singles, pairs = single_shape_prompts(), two_shape_prompts()
    single_images = generate(pipe, [p for p, _, _ in singles], seeds)
    pair_images = generate(pipe, [p for p, _ in pairs], seeds)
    colour_right, shape_right, both_present, both_placed = [], [], [], []
    for (_, colour, shape), images in zip(singles, single_images):
        for image in images:
            reading = judge(image)
            colour_right.append(any(d.colour == colour for d in reading.detections))
            shape_right.append(reading.has(shape, colour))
    for (_, things), images in zip(pairs, pair_images):
        for image in images:
            reading = judge(image)
            both_present.append(all(reading.has(s, c) for c, s, _ in things))
            both_placed.append(all(reading.has(s, c, p) for c, s, p in things))
    rate = lambda values: round(float(np.mean(values)), 3)
    figures = {
        "single_colour_right": rate(colour_right),
        "single_colour_and_shape_right": rate(shape_right),
        "two_shapes_both_present": rate(both_present),
        "two_shapes_both_in_place": rate(both_placed),
        "single_images": len(colour_right),
        "two_shape_images": len(both_present),
        **{k: v for k, v in GENERATION.items()},
    }
    return figures, single_images + pair_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--grid")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    figures, rows = measure(pipe, range(args.seeds))
    if args.grid:
        image_grid(rows).save(args.grid)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
