"""The LoRA delta of one adapter on one peft layer, reusing peft's own A/B modules (no weight copies)."""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer


def lora_delta(layer, adapter: str, x: torch.Tensor) -> torch.Tensor | None:
    """scaling * B(A(x)) of `adapter` on `layer`, or None when the layer has no such adapter."""
    if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
        return None
    lora_a = layer.lora_A[adapter]
    lora_b = layer.lora_B[adapter]
    return lora_b(lora_a(x.to(lora_a.weight.dtype))).to(x.dtype) * layer.scaling[adapter]


def base_projection(layer, x: torch.Tensor) -> torch.Tensor:
    """The projection without any adapter (the wrapped base layer when peft wrapped it)."""
    return layer.base_layer(x) if isinstance(layer, LoraLayer) else layer(x)
