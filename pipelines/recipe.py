"""Recipes: everything needed to reproduce an image, stored in the PNG itself."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from compose.errors import ComposeError
from compose.methods import build_method

RECIPE_KEY = "loracompose"


class InvalidRecipeError(ComposeError, ValueError):
    """A recipe, read from a PNG or built from the command line, lacks a field or holds a wrong value."""


class OutputPathError(ComposeError):
    """The image cannot be written where it was asked to go."""


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _text_or_none(value) -> bool:
    return value is None or isinstance(value, str)


# field: (required, valid, what a valid value is); sizes and step counts the model checks (check_image_arguments).
_FIELDS: dict[str, tuple[bool, Callable[[Any], bool], str]] = {
    "prompt": (True, lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string"),
    "seed": (True, _whole, "a whole number"),
    "steps": (True, _whole, "a whole number"),
    "guidance": (True, _number, "a number"),
    "negative_prompt": (False, _text_or_none, "a string"),
    "model": (False, _text_or_none, "a string"),
    "height": (False, lambda v: v is None or _whole(v), "a whole number"),
    "width": (False, lambda v: v is None or _whole(v), "a whole number"),
    "method": (False, lambda v: isinstance(v, str), "a method name"),
    "options": (False, lambda v: v is None or isinstance(v, dict), "a table of method options"),
    "loras": (False, lambda v: isinstance(v, list), "a list of LoRA entries"),
}
_LORA_TEXT_FIELDS = ("name", "trigger", "concept", "prompt", "negative_prompt", "sha256")


def check_recipe(recipe: Any, origin: Callable[[str], str]) -> None:
    """Every field a run reads, checked before the model loads; `origin(field)` says where a field came from
    (the PNG's recipe or a command-line flag) so the message points at what to fix."""
    if not isinstance(recipe, dict):
        raise InvalidRecipeError(f"{origin('')} holds {type(recipe).__name__}, not a recipe table")
    for field, (required, valid, expected) in _FIELDS.items():
        if field not in recipe:
            if required:
                raise InvalidRecipeError(f"{origin(field)} has no {field}")
        elif not valid(recipe[field]):
            raise InvalidRecipeError(f"{origin(field)}: {field} must be {expected}, got {recipe[field]!r}")
    for index, entry in enumerate(recipe.get("loras", [])):
        where = f"{origin('loras')}: LoRA {index + 1}"
        if not isinstance(entry, dict) or not isinstance(entry.get("source"), str):
            raise InvalidRecipeError(f"{where} must be a table with its file under 'source', got {entry!r}")
        wrong = next((key for key in _LORA_TEXT_FIELDS if not _text_or_none(entry.get(key))), None)
        if wrong:
            raise InvalidRecipeError(f"{where}: {wrong} must be a string, got {entry[wrong]!r}")
    build_method(recipe.get("method", "merge"), recipe.get("options") or None)  # an unknown name or option fails


def check_png_path(path: str | Path) -> Path:
    """Where the image goes, checked before anything is generated.

    Only .png: the recipe is a PNG text chunk, and a JPEG (or WebP) would silently drop it, so that
    image could never be re-run; convert the PNG afterwards when another format is needed.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise OutputPathError(
            f"--out {path}: images are saved as PNG, whose text chunk holds the recipe (other formats would lose "
            f"it); name the file {path.with_suffix('.png').name}"
        )
    if path.is_dir():
        raise OutputPathError(f"--out {path} is a folder; pass a file name such as {path / 'out.png'}")
    folder = next(parent for parent in path.absolute().parents if parent.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise OutputPathError(f"cannot write {path}: {folder} is not a folder this user can write to")
    return path


def save_png_with_recipe(image: Image.Image, path: str | Path, recipe: dict[str, Any]) -> Path:
    """Write the PNG with the recipe as a JSON text chunk (readable by any PNG tool)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text(RECIPE_KEY, json.dumps(recipe, sort_keys=True))
    tmp = path.with_name(path.name + ".part")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        tmp.replace(path)  # a crash never leaves a half-written image under the real name
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_recipe(path: str | Path) -> Any:
    """The JSON a PNG written by loracompose carries (its fields are checked by `check_recipe`)."""
    try:
        with Image.open(path) as image:
            text = image.text.get(RECIPE_KEY) if image.format == "PNG" else None
    except FileNotFoundError as error:
        raise InvalidRecipeError(f"{path} does not exist; pass a PNG written by loracompose") from error
    except (UnidentifiedImageError, OSError) as error:
        raise InvalidRecipeError(f"{path} is not a readable PNG image; pass a PNG written by loracompose") from error
    if not text:
        raise InvalidRecipeError(f"{path} carries no loracompose recipe; only PNGs loracompose wrote can be re-run")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidRecipeError(f"the recipe in {path} is not valid JSON ({error}); the file was altered") from error
