"""`loracompose generate`: one image from a prompt and LoRAs, saved with its recipe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from compose.errors import InvalidOptionError
from compose.spec import LoraSpec

from .loading import load_pipeline
from .recipe import read_recipe, save_png_with_recipe


def generate(pipe, recipe: dict[str, Any]):
    """Run one recipe; returns (image, full recipe with LoRA hashes and resolved options)."""
    loras = [LoraSpec.from_dict(entry) for entry in recipe.get("loras", [])]
    output = pipe(
        recipe["prompt"],
        negative_prompt=recipe.get("negative_prompt") or None,
        num_inference_steps=recipe["steps"],
        guidance_scale=recipe["guidance"],
        height=recipe.get("height"),
        width=recipe.get("width"),
        generator=torch.Generator().manual_seed(recipe["seed"]),
        loras=loras if loras else None,
        method=recipe.get("method", "merge"),
        method_options=recipe.get("options") or None,
    )
    full = dict(recipe)
    if loras:
        full["loras"] = [lora.recipe() for lora in output.extras.get("loras", [])] or recipe.get("loras", [])
        full["options"] = output.extras.get("options", recipe.get("options") or {})
    return output.images[0], full


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise InvalidOptionError(f"--option {text!r} must look like key=value (value in JSON, e.g. fuse=true)")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _recipe_from_args(args) -> dict[str, Any]:
    if args.from_png:
        recipe = read_recipe(args.from_png)
        for key in ("seed", "steps", "prompt"):
            if getattr(args, key) is not None:
                recipe[key] = getattr(args, key)
        return recipe
    loras = []
    for index, text in enumerate(args.lora):
        spec = LoraSpec.parse(text)
        entry = {"source": str(spec.source), "weight": spec.weight}
        for field in ("trigger", "concept", "region"):
            values = getattr(args, field)
            if index < len(values):
                entry[field] = [float(v) for v in values[index].split(",")] if field == "region" else values[index]
        loras.append(entry)
    return {
        "model": args.model,
        "prompt": args.prompt or "a photo",
        "negative_prompt": args.negative_prompt,
        "seed": 0 if args.seed is None else args.seed,
        "steps": 25 if args.steps is None else args.steps,
        "guidance": args.guidance,
        "height": args.height,
        "width": args.width,
        "method": args.method,
        "options": dict(_parse_option(text) for text in args.option),
        "loras": loras,
    }


def run(args) -> int:
    recipe = _recipe_from_args(args)
    if args.from_png and args.model:
        recipe["model"] = args.model
    pipe = load_pipeline(recipe.get("model"))
    recipe["model"] = pipe.model_name
    image, full = generate(pipe, recipe)
    path = save_png_with_recipe(image, args.out, full)
    print(f"wrote {path} ({image.width}x{image.height}, method {full.get('method')}, seed {full['seed']})")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate one image with several LoRAs")
    parser.add_argument("--model", help="diffusers folder, hub id, 'tiny' or 'tiny-sdxl' (default: the built-in model)")
    parser.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]", help="repeat per LoRA")
    parser.add_argument("--trigger", action="append", default=[], help="trigger word of the n-th --lora")
    parser.add_argument("--concept", action="append", default=[], help="concept word of the n-th --lora")
    parser.add_argument("--region", action="append", default=[], metavar="T,L,B,R", help="box of the n-th --lora")
    parser.add_argument("--method", default="merge")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method option")
    parser.add_argument("--prompt")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--out", default="out.png")
    parser.add_argument("--from-png", type=Path, help="re-run the recipe stored in a PNG written by loracompose")
    parser.set_defaults(run=run)
