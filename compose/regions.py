"""Regions of the image (boxes as fractions, or mask images) and their masks at any resolution."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InvalidRegionError


@dataclass(frozen=True)
class Box:
    """A box as fractions of the image: (top, left, bottom, right), each in [0, 1]."""

    top: float
    left: float
    bottom: float
    right: float

    def __post_init__(self):
        values = (self.top, self.left, self.bottom, self.right)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise InvalidRegionError(f"box {values} must hold four finite numbers (top, left, bottom, right)")
        if not all(0.0 <= v <= 1.0 for v in values):
            raise InvalidRegionError(
                f"box {values} must lie inside the image: give (top, left, bottom, right) as fractions in [0, 1]"
            )
        if self.bottom <= self.top or self.right <= self.left:
            raise InvalidRegionError(
                f"box {values} is empty: bottom must be greater than top and right greater than left"
            )

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.top, self.left, self.bottom, self.right)


def as_region(region: Any) -> Box | torch.Tensor | None:
    """Normalise what a user passes as a region: a 4-tuple box, a Box, or a mask image/array/tensor."""
    if region is None or isinstance(region, Box):
        return region
    if isinstance(region, (tuple, list)) and len(region) == 4:
        return Box(*[float(v) for v in region])
    if hasattr(region, "convert"):  # PIL image
        region = np.asarray(region.convert("L"), dtype=np.float32) / 255.0
    if isinstance(region, np.ndarray):
        region = torch.from_numpy(np.asarray(region, dtype=np.float32))
    if isinstance(region, torch.Tensor):
        mask = region.float().squeeze()
        if mask.ndim != 2:
            raise InvalidRegionError(f"a region mask must be 2-D (height, width), got shape {tuple(region.shape)}")
        mask = (mask > 0.5).float()
        if mask.sum() == 0:
            raise InvalidRegionError("the region mask is empty: paint at least one pixel white")
        return mask
    raise InvalidRegionError(
        f"cannot use {type(region).__name__} as a region: pass (top, left, bottom, right) fractions or a mask image"
    )


def box_pixels(box: Box, height: int, width: int) -> tuple[int, int, int, int]:
    """Integer pixel bounds (top, left, bottom, right) of a box on a height x width grid, never empty."""
    top = min(int(math.floor(box.top * height)), height - 1)
    left = min(int(math.floor(box.left * width)), width - 1)
    bottom = max(int(math.ceil(box.bottom * height)), top + 1)
    right = max(int(math.ceil(box.right * width)), left + 1)
    return top, left, bottom, right


def region_mask(region: Box | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Float {0, 1} mask of shape (height, width) for a box or a mask image, resized to that grid."""
    if isinstance(region, Box):
        mask = torch.zeros(height, width)
        top, left, bottom, right = box_pixels(region, height, width)
        mask[top:bottom, left:right] = 1.0
        return mask
    resized = F.interpolate(region[None, None].float(), size=(height, width), mode="area")[0, 0]
    mask = (resized >= 0.5).float()
    if mask.sum() == 0:  # a thin mask must not vanish at coarse layers
        mask = (resized > 0).float()
    return mask


def check_region_fits(region: Box | torch.Tensor, height: int, width: int, what: str) -> None:
    """Fail early when a region covers no pixel of the coarsest grid a method uses."""
    if isinstance(region, Box):
        top, left, bottom, right = (
            region.top * height,
            region.left * width,
            region.bottom * height,
            region.right * width,
        )
        if bottom - top < 0.5 or right - left < 0.5:
            raise InvalidRegionError(
                f"{what}: box {region.as_tuple()} is smaller than one pixel of the {height}x{width} "
                "coarsest attention grid; make it larger"
            )
    elif region_mask(region, height, width).sum() == 0:
        raise InvalidRegionError(f"{what}: the mask covers no pixel of the {height}x{width} grid; make it larger")
