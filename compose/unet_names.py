"""UNet layer names in the original (SGM/LDM) layout, which kohya SDXL LoRA files use, and diffusers' names.

`input_blocks.4.1.transformer_blocks.0.attn2.to_k` is `down_blocks.1.attentions.0.transformer_blocks.0.
attn2.to_k` in diffusers. The block numbering depends on the layers per block and on which levels
have attention, so the table is built from the UNet config: SDXL, SD 1.x and test models alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Inside a block, the original and diffusers names of the same layer (only ResNets and resamplers differ).
_RENAMES = {
    "resnet": {
        "in_layers.0": "norm1",
        "in_layers.2": "conv1",
        "emb_layers.1": "time_emb_proj",
        "out_layers.0": "norm2",
        "out_layers.3": "conv2",
        "skip_connection": "conv_shortcut",
    },
    "downsampler": {"op": "conv"},
    "upsampler": {},
    "attention": {},
}
# Layers outside the down/mid/up blocks.
_TOP_LEVEL = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_ORIGINAL_BLOCK = re.compile(r"^(input_blocks_\d+_\d+|output_blocks_\d+_\d+|middle_block_\d+)(?:_(.+))?$")


@dataclass(frozen=True)
class BlockName:
    original: str  # e.g. input_blocks.4.1
    diffusers: str  # e.g. down_blocks.1.attentions.0
    kind: str  # resnet, attention, downsampler, upsampler


def _per_level(value, levels: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def block_names(config) -> list[BlockName]:
    """Every block of a UNet2DConditionModel under both names, from its config."""
    levels = len(config.down_block_types)
    layers = _per_level(config.layers_per_block, levels)
    names, index = [], 1
    for level, block_type in enumerate(config.down_block_types):
        attention = "Attn" in block_type
        for j in range(layers[level]):
            names.append(BlockName(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}", "resnet"))
            if attention:
                names.append(BlockName(f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}", "attention"))
            index += 1
        if level < levels - 1:
            names.append(BlockName(f"input_blocks.{index}.0", f"down_blocks.{level}.downsamplers.0", "downsampler"))
            index += 1
    if config.mid_block_type is not None:
        names.append(BlockName("middle_block.0", "mid_block.resnets.0", "resnet"))
        if "Attn" in config.mid_block_type:
            names.append(BlockName("middle_block.1", "mid_block.attentions.0", "attention"))
            names.append(BlockName("middle_block.2", "mid_block.resnets.1", "resnet"))
        else:
            names.append(BlockName("middle_block.1", "mid_block.resnets.1", "resnet"))
    index = 0
    for level, block_type in enumerate(config.up_block_types):
        attention = "Attn" in block_type
        count = list(reversed(layers))[level] + 1
        for j in range(count):
            names.append(BlockName(f"output_blocks.{index}.0", f"up_blocks.{level}.resnets.{j}", "resnet"))
            if attention:
                names.append(BlockName(f"output_blocks.{index}.1", f"up_blocks.{level}.attentions.{j}", "attention"))
            if j == count - 1 and level < levels - 1:
                slot = 2 if attention else 1
                names.append(BlockName(f"output_blocks.{index}.{slot}", f"up_blocks.{level}.upsamplers.0", "upsampler"))
            index += 1
    return names


def original_to_diffusers_key(key: str, config) -> str | None:
    """A kohya-style underscored layer key in the original layout as a diffusers key, or None if it is not one.

    `input_blocks_4_1_transformer_blocks_0_attn2_to_k` -> `down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k`.
    """
    for original, diffusers in _TOP_LEVEL.items():
        if key == original.replace(".", "_"):
            return diffusers.replace(".", "_")
    match = _ORIGINAL_BLOCK.match(key)
    if not match:
        return None
    prefix, rest = match.groups()
    for block in block_names(config):
        if block.original.replace(".", "_") == prefix:
            renames = {k.replace(".", "_"): v for k, v in _RENAMES[block.kind].items()}
            rest = renames.get(rest, rest) if rest else rest
            return block.diffusers.replace(".", "_") + (f"_{rest}" if rest else "")
    return None


def diffusers_to_original(name: str, config) -> str:
    """A dotted diffusers module name in the original layout (names outside the table stay as they are)."""
    for original, diffusers in _TOP_LEVEL.items():
        if name == diffusers:
            return original
    for block in block_names(config):
        if name.startswith(block.diffusers + "."):
            rest = name[len(block.diffusers) + 1 :]
            inverse = {v: k for k, v in _RENAMES[block.kind].items()}
            return f"{block.original}.{inverse.get(rest, rest)}"
    return name
