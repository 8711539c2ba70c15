"""`loracompose generate`: one image from a prompt and LoRAs, saved with its recipe.

Everything is checked before any image is made: the recipe's fields, the output path, the image
size and step count on the loaded model, and that each LoRA a recipe names is still the file it
recorded (by sha256).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from compose.errors import ChangedLoraError, InvalidOptionError
from compose.loading import file_sha256, resolve_source
from compose.spec import LoraSpec

from .composition import check_image_arguments
from .loading import load_pipeline, recipe_model
from .recipe import InvalidRecipeError, check_png_path, check_recipe, read_recipe, save_png_with_recipe

CHANGED_KEY = "accepted_changed_loras"


def generate(pipe, recipe: dict[str, Any]):
    """Run one recipe; returns (image, full recipe with LoRA hashes, resolved options and a portable model name)."""
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
    if recipe.get("model"):
        full["model"] = recipe_model(recipe["model"])
    if loras:
        full["loras"] = [lora.recipe() for lora in output.extras.get("loras", [])] or recipe.get("loras", [])
        full["options"] = output.extras.get("options", recipe.get("options") or {})
    return output.images[0], full


def changed_loras(recipe: dict[str, Any]) -> list[dict[str, str]]:
    """The LoRAs whose file no longer has the sha256 the recipe recorded (it was changed or swapped)."""
    changed = []
    for entry in recipe.get("loras", []):
        recorded = entry.get("sha256")
        now = file_sha256(resolve_source(entry["source"])) if recorded else None
        if now != recorded:
            changed.append(dict(name=entry.get("name"), source=entry["source"], recorded=recorded, now=now))
    return changed


def _refuse_changed(changed: list[dict[str, str]], png: Path) -> None:
    files = "; ".join(
        f"LoRA '{c['name']}' ({c['source']}) has sha256 {c['now'][:12]}..., the recipe recorded {c['recorded'][:12]}..."
        for c in changed
    )
    raise ChangedLoraError(
        f"{png} was made with other LoRA files: {files}. The image would differ; restore the recorded files, or "
        "pass --accept-changed-loras to use these (the new recipe records that)"
    )


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise InvalidOptionError(f"--option {text!r} must look like key=value (value in JSON, e.g. fuse=true)")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _box(text: str) -> list[float]:
    """--region T,L,B,R as four numbers (the range is checked with the LoRA)."""
    try:
        box = [float(value) for value in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise argparse.ArgumentTypeError(f"takes four numbers T,L,B,R (fractions of the image), got {text!r}")
    return box


def _recipe_from_args(args) -> tuple[dict[str, Any], Any]:
    """(recipe, origin): `origin(field)` names where a field came from, for `check_recipe`'s messages."""
    if args.from_png:
        recipe = read_recipe(args.from_png)
        overridden = {key for key in ("seed", "steps", "prompt") if getattr(args, key) is not None}
        if isinstance(recipe, dict):
            recipe.update({key: getattr(args, key) for key in overridden})
            recipe.pop(CHANGED_KEY, None)
            if args.model:
                recipe["model"] = args.model
        return recipe, lambda field: f"--{field}" if field in overridden else f"the recipe in {args.from_png}"
    if args.prompt is None:
        raise InvalidRecipeError("--prompt is needed (or --from-png to re-run a saved image)")
    for flag in ("trigger", "concept", "region"):
        if len(getattr(args, flag)) > len(args.lora):
            raise InvalidRecipeError(
                f"{len(getattr(args, flag))} --{flag} values for {len(args.lora)} --lora; the n-th --{flag} belongs "
                "to the n-th --lora"
            )
    loras = []
    for index, text in enumerate(args.lora):
        spec = LoraSpec.parse(text)
        entry = {"source": str(spec.source), "weight": spec.weight, "name": spec.name}
        for flag in ("trigger", "concept", "region"):
            if index < len(getattr(args, flag)):
                entry[flag] = getattr(args, flag)[index]
        loras.append(entry)
    recipe = {
        "model": args.model,
        "prompt": args.prompt,
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
    return recipe, lambda field: f"--{field.replace('_', '-')}"


def run(args) -> int:
    recipe, origin = _recipe_from_args(args)
    check_recipe(recipe, origin)
    out = check_png_path(args.out)
    changed = changed_loras(recipe) if args.from_png else []
    if changed and not args.accept_changed_loras:
        _refuse_changed(changed, args.from_png)
    pipe = load_pipeline(recipe.get("model"))
    recipe["model"] = pipe.model_name
    check_image_arguments(pipe, recipe.get("height"), recipe.get("width"), recipe["steps"])
    image, full = generate(pipe, recipe)
    if changed:
        full[CHANGED_KEY] = changed
    path = save_png_with_recipe(image, out, full)
    print(f"wrote {path} ({image.width}x{image.height}, method {full.get('method')}, seed {full['seed']})")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate one image with several LoRAs")
    parser.add_argument(
        "--model", help="diffusers folder, hub id, 'toyworld', 'tiny' or 'tiny-sdxl' (default: the built-in toyworld)"
    )
    parser.add_argument(
        "--lora", action="append", default=[], metavar="FILE[:WEIGHT][@NAME]",
        help="repeat per LoRA; @NAME names it (needed for files of one name, e.g. pytorch_lora_weights)",
    )  # fmt: skip
    parser.add_argument("--trigger", action="append", default=[], help="trigger word of the n-th --lora")
    parser.add_argument("--concept", action="append", default=[], help="concept word of the n-th --lora")
    parser.add_argument(
        "--region", action="append", default=[], type=_box, metavar="T,L,B,R", help="box of the n-th --lora"
    )
    parser.add_argument("--method", default="merge")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method option")
    parser.add_argument("--prompt")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--out", default="out.png", help="a .png file (the recipe is stored in a PNG text chunk)")
    parser.add_argument("--from-png", type=Path, help="re-run the recipe stored in a PNG written by loracompose")
    parser.add_argument(
        "--accept-changed-loras", action="store_true",
        help="with --from-png: run even if a LoRA file's sha256 differs from the recorded one (the new recipe says so)",
    )  # fmt: skip
    parser.set_defaults(run=run)
