"""The change one adapter makes to one layer's output, for every adapter type peft holds (no weight copies).

Methods that apply a LoRA themselves (token masks, region injection, per-sample batches peft cannot
run) ask here instead of assuming `B @ A`: plain LoRA/LoCon, DoRA, LoHa and LoKr each compute their
change with peft's own modules. Layers may be nested (a LoHa adapter wrapping a LoRA layer wrapping
the Linear) when files of different types adapt the same layer.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lycoris_utils import LycorisLayer
from peft.tuners.tuners_utils import BaseTunerLayer


def holds(layer, adapter: str) -> bool:
    """Does this very tuner layer (not one it wraps) store `adapter`?"""
    if isinstance(layer, LycorisLayer):
        return adapter in layer._available_adapters
    return isinstance(layer, LoraLayer) and adapter in layer.lora_A


def adapter_holder(layer, adapter: str) -> BaseTunerLayer | None:
    """The tuner layer in `layer`'s chain of wrapped layers that stores `adapter`, or None."""
    while isinstance(layer, BaseTunerLayer):
        if holds(layer, adapter):
            return layer
        layer = layer.base_layer
    return None


def lora_delta(layer, adapter: str, x: torch.Tensor) -> torch.Tensor | None:
    """What `adapter` at its current scale adds to `layer`'s output for input x, or None when it is not there."""
    holder = adapter_holder(layer, adapter)
    if holder is None:
        return None
    if isinstance(holder, LycorisLayer):
        return holder._get_delta_activations(adapter, x).to(x.dtype)
    if adapter in holder.lora_variant:  # DoRA: the magnitude rescales the base output too
        base = holder.get_base_layer()(x)
        return holder.lora_variant[adapter].forward(holder, active_adapter=adapter, x=x, result=base) - base
    lora_a, lora_b = holder.lora_A[adapter], holder.lora_B[adapter]
    return lora_b(lora_a(x.to(lora_a.weight.dtype))).to(x.dtype) * holder.scaling[adapter]


def base_projection(layer, x: torch.Tensor) -> torch.Tensor:
    """The projection without any adapter (the innermost wrapped layer when peft wrapped it)."""
    return layer.get_base_layer()(x) if isinstance(layer, BaseTunerLayer) else layer(x)
