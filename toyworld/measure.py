"""The base model's gates, measured by the judge: single objects, two objects, and regional prompting.

    python -m toyworld.measure --model toyworld/model --seeds 4 --regional-seeds 64 --grid toyworld/model/samples.png

Prints the rates as JSON, each with its image count and 95% interval; the grid (upscaled with
nearest so pixels stay sharp) shows every image. Regional prompting runs through the project's own
regional cross-attention (`compose.attention.regions.RegionCrossAttnProcessor`) with no LoRA:
pixels inside a box attend to that box's prompt, the rest to the global prompt.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
from contextlib import contextmanager

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from compose.attention.layers import attention_layers, install_processors, layer_grid
from compose.attention.regions import RegionCrossAttnProcessor, RegionState
from compose.regions import Box, region_mask

from .judge import judge
from .world import COLOURS, OPPOSITE, SHAPES, SIZE, phrase

GENERATION = dict(height=SIZE, width=SIZE, num_inference_steps=25, guidance_scale=4.0)
# The regional gate: boxes that leave background around them, a global prompt naming both objects.
REGIONAL_PROMPT = "a red square on the left and a blue circle on the right"
REGIONAL_PARTS = (("a red square", Box(0.2, 0.05, 0.8, 0.45), "square", "red"),
                  ("a blue circle", Box(0.2, 0.55, 0.8, 0.95), "circle", "blue"))


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% score interval of a rate; sensible at 0% and 100%, unlike mean +- 2 standard errors."""
    if total == 0:
        return (0.0, 1.0)
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(values: list[bool]) -> dict:
    low, high = wilson_interval(int(sum(values)), len(values))
    return {"rate": round(float(np.mean(values)), 3), "n": len(values), "ci95": [round(low, 3), round(high, 3)]}


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


def generate(pipe, prompts: list[str], seeds, batch: int = 32) -> list[list[Image.Image]]:
    """images[i][j]: prompt i with seed j, each seed its own generator so results do not depend on batching."""
    rows = []
    seeds = list(seeds)
    for prompt in prompts:
        images = []
        for start in range(0, len(seeds), batch):
            generators = [torch.Generator().manual_seed(s) for s in seeds[start : start + batch]]
            images += pipe([prompt] * len(generators), generator=generators, **GENERATION).images
        rows.append(images)
    return rows


@contextmanager
def regional_prompting(pipe, parts: list[tuple[str, Box]], images: int):
    """Every cross-attention layer attends to each box's prompt inside its box; no LoRA is involved.

    The regional embeddings are laid out as the pipeline's CFG batch: `images` negative rows, then
    `images` conditional rows.
    """
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder

    def embed(text: str) -> torch.Tensor:
        ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        with torch.no_grad():
            return encoder(ids.input_ids).last_hidden_state

    empty = embed("")
    contexts = [torch.cat([empty.expand(images, -1, -1), embed(p).expand(images, -1, -1)]) for p, _ in parts]
    state = RegionState([f"region{k}" for k in range(len(parts))], contexts)
    latent_hw = (GENERATION["height"] // pipe.vae_scale_factor, GENERATION["width"] // pipe.vae_scale_factor)
    processors = {}
    for layer in attention_layers(pipe.unet):
        if layer.cross:
            grid = layer_grid(latent_hw, layer.factor)
            masks = torch.stack([region_mask(box, *grid).flatten() > 0 for _, box in parts])
            processors[layer.name] = RegionCrossAttnProcessor(state, masks, layer.name)
    original = dict(pipe.unet.attn_processors)
    install_processors(pipe.unet, processors)
    try:
        yield
    finally:
        pipe.unet.set_attn_processor(original)


def in_box(reading, shape: str, colour: str, box: Box) -> bool:
    """The object is drawn and its centre lies inside the box."""
    mask = region_mask(box, SIZE, SIZE)
    for d in reading.detections:
        if d.concept is None and d.form == shape and d.colour == colour:
            x, y = (d.box[0] + d.box[2]) // 2, (d.box[1] + d.box[3]) // 2
            if mask[min(y, SIZE - 1), min(x, SIZE - 1)] > 0:
                return True
    return False


def measure_regional(pipe, seeds) -> tuple[dict, list[Image.Image], list[Image.Image]]:
    """Each object in its own box, with regional cross-attention and, as the baseline, without."""
    seeds = list(seeds)
    plain = generate(pipe, [REGIONAL_PROMPT], seeds)[0]
    with regional_prompting(pipe, [(p, box) for p, box, _, _ in REGIONAL_PARTS], len(seeds)):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        regional = pipe([REGIONAL_PROMPT] * len(seeds), generator=generators, **GENERATION).images
    placed = lambda image: all(in_box(judge(image), s, c, box) for _, box, s, c in REGIONAL_PARTS)
    drawn = lambda image: all(judge(image).has(s, c) for _, _, s, c in REGIONAL_PARTS)
    figures = {
        "regional_each_in_its_box": rate([placed(im) for im in regional]),
        "regional_both_drawn": rate([drawn(im) for im in regional]),
        "no_regions_each_in_its_box": rate([placed(im) for im in plain]),
    }
    return figures, regional, plain


def measure(pipe, seeds, regional_seeds) -> tuple[dict, list[list[Image.Image]]]:
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
    regional, regional_images, plain_images = measure_regional(pipe, regional_seeds)
    figures = {
        "single_colour_right": rate(colour_right),
        "single_colour_and_shape_right": rate(shape_right),
        "two_shapes_both_present": rate(both_present),
        "two_shapes_both_in_place": rate(both_placed),
        **regional,
        **GENERATION,
    }
    per_row = len(list(seeds))
    regional_rows = [regional_images[i : i + per_row] for i in range(0, len(regional_images), per_row)]
    return figures, single_images + pair_images + regional_rows


def image_grid(rows: list[list[Image.Image]], per_line: int = 6, scale: int = 3) -> Image.Image:
    """`per_line` rows side by side, each a prompt's seeds; nearest upscaling keeps pixels sharp."""
    lines = [sum(rows[i : i + per_line], []) for i in range(0, len(rows), per_line)]
    blank = np.full_like(np.asarray(rows[0][0]), 255)
    width = max(len(line) for line in lines)
    grid = np.concatenate([
        np.concatenate([np.asarray(im) for im in line] + [blank] * (width - len(line)), 1) for line in lines
    ], 0)
    return Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--seeds", type=int, default=4, help="seeds per single- and two-object prompt")
    parser.add_argument("--regional-seeds", type=int, default=64)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--grid")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = StableDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    first = args.first_seed
    figures, rows = measure(pipe, range(first, first + args.seeds), range(first, first + args.regional_seeds))
    if args.grid:
        image_grid(rows).save(args.grid)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
