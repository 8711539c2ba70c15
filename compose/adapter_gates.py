"""Adapters gated per pixel: each adapter's change to a layer's output multiplied by a mask of its own.

The adapters stay inactive in peft; forward hooks add each one's change (`lora_delta`, so every adapter
type) times the gate the caller gives for that adapter and that output. Any layer an adapter touches is
covered this way: linear layers on image tokens, convolutions (LoCon), attention projections alike.
"""

from __future__ import annotations

from typing import Callable, Collection, Sequence

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.utils.hooks import RemovableHandle

from .attention.layers import attention_layers, layer_grid
from .lora_delta import holds, lora_delta

# gate(adapter index, layer output) -> a multiplier broadcasting to the output, or None for "ungated"
Gate = Callable[[int, torch.Tensor], torch.Tensor | None]


def add_gated_changes(
    model: torch.nn.Module, adapters: Sequence[str], gate: Gate, ungated: Collection[str] = (),
    skip: Collection[str] = (),
) -> list[RemovableHandle]:
    """Hooks adding gate(i, out) * change of adapters[i] on every tuner layer that holds it itself.

    ungated: module names whose changes count everywhere (e.g. the text-side projections).
    skip: module names left alone (their changes are applied elsewhere, or not at all).
    """
    handles = []
    for name, layer in model.named_modules():
        if not isinstance(layer, BaseTunerLayer) or name.split(".base_layer")[0] in skip:
            continue
        held = [(index, adapter) for index, adapter in enumerate(adapters) if holds(layer, adapter)]
        if held:
            layer_gate = None if name.split(".base_layer")[0] in ungated else gate
            handles.append(layer.register_forward_hook(_gated_adder(held, layer_gate)))
    return handles


def _gated_adder(held: list[tuple[int, str]], gate: Gate | None):
    def add_changes(layer, args, out):
        for index, adapter in held:
            change = lora_delta(layer, adapter, args[0]).to(out.dtype)
            weight = None if gate is None else gate(index, out)
            out = out + (change if weight is None else weight.to(out.dtype) * change)
        return out

    return add_changes


class RegionGates:
    """A `Gate` from per-LoRA masks at latent size, resized (bilinearly, once per grid) to each layer's output.

    masks: (LoRAs, images or 1, h, w) in [0, 1]; halves: how many copies of the images the UNet batch holds
    (2 under classifier-free guidance). Feature maps (B, C, H, W) and image tokens (B, pixels, C) are
    gated; other outputs (time embeddings) are not spatial and stay ungated.
    """

    def __init__(self, unet, latent_hw: tuple[int, int], masks: torch.Tensor, halves: int = 1):
        factors = {1, *(layer.factor for layer in attention_layers(unet))}
        self.grids = {h * w: (h, w) for h, w in (layer_grid(latent_hw, factor) for factor in factors)}
        self.masks, self.halves, self.resized = masks, halves, {}

    def at(self, h: int, w: int) -> torch.Tensor:
        """The masks at (h, w), repeated over the batch's halves: (LoRAs, batch, h, w)."""
        if (h, w) not in self.resized:
            masks = self.masks
            if masks.shape[-2:] != (h, w):
                masks = F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)
            self.resized[h, w] = masks.repeat(1, self.halves, 1, 1)
        return self.resized[h, w]

    def __call__(self, index: int, out: torch.Tensor) -> torch.Tensor | None:
        if out.ndim == 4:
            return self.at(*out.shape[-2:])[index][:, None]
        if out.ndim == 3:
            return self.at(*self.grids[out.shape[1]])[index].flatten(1)[..., None]
        return None
