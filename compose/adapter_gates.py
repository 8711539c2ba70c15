"""Adapters gated per pixel: each adapter's change to a layer's output multiplied by a mask of its own.

The adapters stay inactive in peft; forward hooks add each one's change (`lora_delta`, so every adapter
type) times the gate the caller gives for that adapter and that output. Any layer an adapter touches is
covered this way: linear layers on image tokens, convolutions (LoCon), attention projections alike.
"""

from __future__ import annotations

from typing import Callable, Collection, Sequence

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch.utils.hooks import RemovableHandle

from .lora_delta import holds, lora_delta

# gate(adapter index, layer output) -> a multiplier broadcasting to the output, or None for "ungated"
Gate = Callable[[int, torch.Tensor], torch.Tensor | None]


def add_gated_changes(
    model: torch.nn.Module, adapters: Sequence[str], gate: Gate, ungated: Collection[str] = ()
) -> list[RemovableHandle]:
    """Hooks adding gate(i, out) * change of adapters[i] on every tuner layer that holds it itself.

    ungated: module names whose changes count everywhere (e.g. the text-side projections).
    """
    handles = []
    for name, layer in model.named_modules():
        if not isinstance(layer, BaseTunerLayer):
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
