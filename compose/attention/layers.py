"""Which attention layers a UNet has, what kind they are and at what resolution they run.

Derived from processor names and the UNet config, so SD 1.x, SDXL and the toy model all work
without hard-coded layer lists.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class AttnLayer:
    name: str  # processor name, as in unet.attn_processors
    cross: bool  # cross-attention (attn2) or self-attention (attn1)
    factor: int  # downsampling of this layer relative to the latent


def attention_layers(unet) -> list[AttnLayer]:
    levels = len(unet.config.down_block_types)
    layers = []
    for name in unet.attn_processors:
        match = re.match(r"(down_blocks|up_blocks)\.(\d+)\.", name)
        if match:
            index = int(match.group(2))
            level = index if match.group(1) == "down_blocks" else levels - 1 - index
        else:  # mid block
            level = levels - 1
        layers.append(AttnLayer(name, ".attn2." in name, 2**level))
    return layers


def layers_near_factor(unet, factor: int, cross: bool = True) -> list[str]:
    """Names of the layers at the available resolution nearest to `factor` (ties go coarser).

    Methods ask for "1/32 of the image" (latent factor 4 on SD 1.5); a small model without that
    resolution gets its nearest one instead of nothing.
    """
    candidates = [layer for layer in attention_layers(unet) if layer.cross == cross]
    if not candidates:
        return []
    best = min({layer.factor for layer in candidates}, key=lambda f: (abs(math.log2(f) - math.log2(factor)), -f))
    return [layer.name for layer in candidates if layer.factor == best]


REFERENCE_MAP_CELLS = 16  # SD 1.5's maps at 512 px: 16x16, 1/32 of the image


def map_factor(unet, latent_hw: tuple[int, int], requested: int | None = None) -> int:
    """The latent downsampling of the cross-attention maps a method reads.

    `requested`: that factor, or the nearest one the UNet has. None: the coarsest resolution whose
    maps still have REFERENCE_MAP_CELLS cells on their short side (SD 1.5 at 512 px: 16x16, at 768 px:
    24x24, SDXL at 1024 px: 32x32: each 1/32 of the image, as the references read), or the finest
    there is on a model too small for that.
    """
    if requested is not None:
        name = layers_near_factor(unet, requested, cross=True)[0]
        return next(layer.factor for layer in attention_layers(unet) if layer.name == name)
    factors = {layer.factor for layer in attention_layers(unet) if layer.cross}
    fine_enough = [f for f in factors if min(layer_grid(latent_hw, f)) >= REFERENCE_MAP_CELLS]
    return max(fine_enough) if fine_enough else min(factors)


def layer_grid(latent_hw: tuple[int, int], factor: int) -> tuple[int, int]:
    """Spatial size of a layer: each stride-2 downsample rounds up."""
    height, width = latent_hw
    while factor > 1:
        height, width, factor = math.ceil(height / 2), math.ceil(width / 2), factor // 2
    return height, width


def install_processors(unet, processors: dict[str, object]) -> None:
    """Replace some processors, keep every other one as it is."""
    current = dict(unet.attn_processors)
    current.update(processors)
    unet.set_attn_processor(current)
