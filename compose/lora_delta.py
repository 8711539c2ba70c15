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


def dense_change(layer, adapter: str, chunk: int = 1024) -> torch.Tensor | None:
    """`adapter`'s change as a weight shaped like the base layer's (Linear or Conv2d), or None.

    Read off `lora_delta`'s responses to unit inputs, so every adapter type gives its true change.
    A convolution sees one unit impulse per kernel entry, placed where one output position covers
    the whole kernel, `chunk` impulses at a time.
    """
    if adapter_holder(layer, adapter) is None:
        return None
    base = layer.get_base_layer()
    weight = base.weight
    if isinstance(base, torch.nn.Linear):
        return lora_delta(layer, adapter, torch.eye(base.in_features, dtype=weight.dtype, device=weight.device)).T
    if not isinstance(base, torch.nn.Conv2d) or isinstance(base.padding, str) or base.groups != 1:
        return None
    out_channels, in_channels, kh, kw = weight.shape
    (row, height, top), (col, width, left) = [
        _covering_position(*axis) for axis in zip((kh, kw), base.stride, base.padding, base.dilation)
    ]
    entries = torch.arange(in_channels * kh * kw, device=weight.device)
    channel = entries // (kh * kw)
    y = top + entries // kw % kh * base.dilation[0]
    x = left + entries % kw * base.dilation[1]
    responses = []
    for part in entries.split(chunk):
        impulses = torch.zeros(len(part), in_channels, height, width, dtype=weight.dtype, device=weight.device)
        impulses[torch.arange(len(part)), channel[part], y[part], x[part]] = 1
        responses.append(lora_delta(layer, adapter, impulses)[:, :, row, col])
    return torch.cat(responses).T.reshape(out_channels, in_channels, kh, kw)


def _covering_position(kernel: int, stride: int, padding: int, dilation: int) -> tuple[int, int, int]:
    """(output index, input size, input offset) on one axis: that output sees input offset + j * dilation
    through kernel entry j, for every j, without touching the padding."""
    output = -(-padding // stride)
    offset = output * stride - padding
    return output, offset + (kernel - 1) * dilation + 1, offset
