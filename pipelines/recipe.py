"""Recipes: everything needed to reproduce an image, stored in the PNG itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from compose.errors import ComposeError

RECIPE_KEY = "loracompose"


def save_png_with_recipe(image: Image.Image, path: str | Path, recipe: dict[str, Any]) -> Path:
    """Write the PNG with the recipe as a JSON text chunk (readable by any PNG tool)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text(RECIPE_KEY, json.dumps(recipe, sort_keys=True))
    tmp = path.with_name(path.name + ".part")
    image.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)  # a crash never leaves a half-written image under the real name
    return path


def read_recipe(path: str | Path) -> dict[str, Any]:
    with Image.open(path) as image:
        text = image.text.get(RECIPE_KEY) if hasattr(image, "text") else None
    if not text:
        raise ComposeError(f"{path} carries no loracompose recipe; only PNGs written by loracompose can be re-run")
    return json.loads(text)
