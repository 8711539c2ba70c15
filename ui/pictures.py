"""Pictures the UI shows besides generated images: region boxes, library cards, masks and maps."""

from __future__ import annotations

import colorsys
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from compose.adapters import BASE
from compose.errors import InvalidRegionError
from compose.regions import Box

from .form import LoraSettings

DISPLAY_SIZE = 256


def font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def colour(index: int) -> tuple[int, int, int]:
    """Distinct, saturated colours for LoRA 0, 1, 2, ... (golden-ratio hue steps)."""
    red, green, blue = colorsys.hsv_to_rgb((index * 0.618) % 1.0, 0.75, 0.95)
    return int(red * 255), int(green * 255), int(blue * 255)


def for_display(image: Image.Image, size: int = DISPLAY_SIZE) -> Image.Image:
    """Small images scaled up by a whole factor with nearest neighbours, so pixels stay sharp."""
    factor = max(1, size // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def region_preview(loras: list[LoraSettings], height: int, width: int, size: int = DISPLAY_SIZE) -> Image.Image:
    """The boxes of the LoRAs that use a region, drawn over an empty frame of the image's shape."""
    scale = size / max(height, width, 1)
    frame_w, frame_h = max(1, round(width * scale)), max(1, round(height * scale))
    picture = Image.new("RGB", (frame_w, frame_h), (245, 245, 245))
    draw = ImageDraw.Draw(picture, "RGBA")
    draw.rectangle([0, 0, frame_w - 1, frame_h - 1], outline=(160, 160, 160))
    if not any(lora.use_region for lora in loras):
        draw.text((10, frame_h // 2 - 8), "no region: tick 'region' on a LoRA", fill=(120, 120, 120), font=font(14))
    for index, lora in enumerate(loras):
        if not lora.use_region:
            continue
        try:
            box = Box(*lora.box)
        except InvalidRegionError:  # reported when generating; the preview just leaves it out
            continue
        red, green, blue = colour(index)
        corners = [box.left * frame_w, box.top * frame_h, box.right * frame_w - 1, box.bottom * frame_h - 1]
        draw.rectangle(corners, fill=(red, green, blue, 60), outline=(red, green, blue, 255), width=3)
        draw.text((corners[0] + 6, corners[1] + 4), lora.name, fill=(red // 2, green // 2, blue // 2, 255), font=font(16))
    return picture


def library_picture(path, size: int = 128) -> Image.Image | None:
    """A library tile from a preview PNG: small pictures scaled up by nearest neighbours, big ones down.

    None when the file cannot be read (the tile then shows the LoRA's name).
    """
    try:
        with Image.open(path) as picture:
            picture = picture.convert("RGB")
    except OSError:
        return None
    if max(picture.size) <= size:
        return for_display(picture, size)
    picture.thumbnail((size, size))
    return picture


def library_card(name: str, size: int = 128) -> Image.Image:
    """Stands in for a LoRA without a preview PNG (or a method that could not run): its name on a tile."""
    tile = Image.new("RGB", (size, size), (232, 236, 241))
    ImageDraw.Draw(tile).text((size // 2, size // 2), name[:12], fill=(60, 60, 60), font=font(20), anchor="mm")
    return tile


def mask_pictures(extras: dict[str, Any], names: list[str]) -> list[tuple[Image.Image, str]]:
    """The per-pixel masks a method reports in `extras["masks"]`, as captioned greyscale pictures.

    Accepted: a tensor (passes, h, w) (or (images, passes, h, w): the first image is shown), or a
    dict {name: (h, w)}. Passes are named by `extras["pass_adapters"]` when the method gives them.
    """
    masks = extras.get("masks")
    if masks is None:
        return []
    if isinstance(masks, dict):
        items = list(masks.items())
    else:
        masks = torch.as_tensor(masks).detach().float().cpu()
        masks = masks[0] if masks.ndim == 4 else masks
        labels = extras.get("pass_adapters") or names
        if len(labels) != len(masks):
            labels = [str(index) for index in range(len(masks))]
        items = [("base" if label in (None, BASE) else label, mask) for label, mask in zip(labels, masks)]
    return [(for_display(_grey(torch.as_tensor(mask).detach().float().cpu()), 128), f"mask: {label}") for label, mask in items]


def _grey(mask: torch.Tensor) -> Image.Image:
    """A mask in [0, 1] as 0..255 grey (not min-max scaled: an all-ones mask is white)."""
    return Image.fromarray(np.uint8(mask.clamp(0, 1).numpy() * 255))

