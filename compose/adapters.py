"""Adapter state of peft LoRA layers: activate with weights, snapshot/restore, per-sample adapters.

Works on the layers directly (not through diffusers' `set_adapters`) because methods switch
adapters every step, and a full snapshot is what lets the pipeline promise that a call leaves
the model exactly as it found it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

BASE = "__base__"  # peft's name for "no adapter" in a per-sample adapter list


def tuner_layers(model: nn.Module | None) -> list[BaseTunerLayer]:
    if model is None:
        return []
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def activate(model: nn.Module | None, weights: Mapping[str, float]) -> None:
    """Make exactly these adapters active at these weights (alpha/rank scaling kept by peft)."""
    for layer in tuner_layers(model):
        present = [name for name in weights if name in layer.scaling]
        layer.set_adapter(present, inference_mode=True)
        for name in present:
            layer.set_scale(name, weights[name])
        layer._disable_adapters = False


@dataclass
class AdapterState:
    """Per layer: active adapters, disabled flag and scaling of every adapter."""

    layers: dict[int, tuple[list[str], bool, dict[str, float]]]


def snapshot(models: Sequence[nn.Module | None]) -> AdapterState:
    layers = {}
    for model in models:
        for layer in tuner_layers(model):
            layers[id(layer)] = (list(layer.active_adapters), layer.disable_adapters, dict(layer.scaling))
    return AdapterState(layers)


def restore(models: Sequence[nn.Module | None], state: AdapterState) -> None:
    """Put every layer back as the snapshot saw it; layers created since then end with no adapter active."""
    for model in models:
        for layer in tuner_layers(model):
            active, disabled, scaling = state.layers.get(id(layer), ([], False, {}))
            layer.set_adapter(active, inference_mode=True)
            layer.scaling.update({name: value for name, value in scaling.items() if name in layer.scaling})
            layer._disable_adapters = disabled


@contextmanager
def per_sample_adapters(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[None]:
    """Within the block, sample b of every forward uses adapter `adapter_names[b]` (BASE for none).

    peft's mixed-batch forward does the work; the hooks only hand every LoRA layer the list, so N
    per-LoRA passes become one batched forward.
    """
    names = list(adapter_names)
    layers = tuner_layers(model)
    merged = [layer for layer in layers if layer.merged]
    if merged:
        raise RuntimeError("per-sample adapters need unfused LoRA weights; call pipe.unfuse_lora() first")

    def hand_names(_module, args, kwargs):
        kwargs["adapter_names"] = names
        return args, kwargs

    handles = [layer.register_forward_pre_hook(hand_names, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


FusedWeights = list[tuple[BaseTunerLayer, torch.Tensor]]


def fuse_active(layers: Iterable[BaseTunerLayer]) -> FusedWeights:
    """Merge each layer's active adapters into a copy of its weight; `unfuse` puts the original back.

    Keeping the original (instead of subtracting the delta again, as unmerging does) restores the
    model bit for bit: the subtraction's rounding error changed later images visibly.
    """
    fused = []
    for layer in layers:
        weight = layer.get_base_layer().weight
        original = weight.data
        weight.data = original.clone()
        layer.merge(adapter_names=list(layer.active_adapters))
        fused.append((layer, original))
    return fused


def unfuse(fused: FusedWeights) -> None:
    for layer, original in reversed(fused):
        layer.unmerge()
        layer.get_base_layer().weight.data = original
