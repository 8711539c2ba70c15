"""Which attention maps the map-reading methods (clora, composer) read by default, by latent size."""

from __future__ import annotations

import pytest
from diffusers import UNet2DConditionModel

from compose.attention.layers import layer_grid, map_factor

DOWN, CROSS_DOWN = "DownBlock2D", "CrossAttnDownBlock2D"
UP, CROSS_UP = "UpBlock2D", "CrossAttnUpBlock2D"
LAYOUTS = {  # the real models' block layouts, at a few channels each
    "sd15": ((CROSS_DOWN,) * 3 + (DOWN,), (UP,) + (CROSS_UP,) * 3),
    "sdxl": ((DOWN, CROSS_DOWN, CROSS_DOWN), (CROSS_UP, CROSS_UP, UP)),
    "toy": ((CROSS_DOWN,) * 3, (CROSS_UP,) * 3),
}


def unet(layout: str) -> UNet2DConditionModel:
    down, up = LAYOUTS[layout]
    return UNet2DConditionModel(
        sample_size=8, down_block_types=down, up_block_types=up, block_out_channels=(8,) * len(down),
        layers_per_block=1, norm_num_groups=8, cross_attention_dim=8, attention_head_dim=2,
    )  # fmt: skip


@pytest.mark.parametrize(
    "layout, latent, factor, grid",
    [
        ("sd15", (64, 64), 4, (16, 16)),  # 512 px: the papers' 16x16 maps, 1/32 of the image
        ("sd15", (96, 64), 4, (24, 16)),  # 768x512 px: still 1/32 of the image, as the references read
        ("sd15", (32, 32), 2, (16, 16)),  # 256 px: 1/32 would be 8x8; the 16x16 maps exist
        ("sdxl", (128, 128), 4, (32, 32)),  # 1024 px: 1/32 of the image, as the SDXL reference reads
        ("toy", (16, 16), 1, (16, 16)),  # the toy model: its finest maps
    ],
)
def test_default_maps_are_the_coarsest_with_16_cells(layout, latent, factor, grid):
    model = unet(layout)
    assert map_factor(model, latent) == factor
    assert layer_grid(latent, factor) == grid


def test_a_requested_factor_is_kept_or_replaced_by_the_nearest_that_exists():
    assert map_factor(unet("sd15"), (64, 64), 2) == 2
    assert map_factor(unet("sdxl"), (128, 128), 1) == 2  # SDXL has no attention at full latent resolution
    assert map_factor(unet("toy"), (16, 16), 16) == 4
