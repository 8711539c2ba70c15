"""Adapter state of peft LoRA layers: activate with weights, snapshot/restore, per-sample adapters.

Works on the layers directly (not through diffusers' `set_adapters`) because methods switch
adapters every step, and a full snapshot is what lets the pipeline promise that a call leaves
the model exactly as it found it.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .lora_delta import holds, lora_delta

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

    peft's mixed-batch forward does the work for plain LoRA layers, so N per-LoRA passes become one
    batched forward. What peft cannot batch (DoRA adapters, LoHa and LoKr layers) gets the same
    result from forward hooks adding each adapter's change to its own samples (`lora_delta`); LoHa and
    LoKr layers are switched off meanwhile, since they would apply their active adapters to every sample.
    """
    names = list(adapter_names)
    layers = tuner_layers(model)
    if any(layer.merged for layer in layers):
        raise RuntimeError("per-sample adapters need unfused LoRA weights; call pipe.unfuse_lora() first")
    wanted = sorted(set(names) - {BASE})
    with ExitStack() as stack:
        for layer in layers:
            own = [name for name in wanted if holds(layer, name)]
            if isinstance(layer, LoraLayer):
                hooked = [name for name in own if name in layer.lora_variant]
                peft_names = [BASE if name in hooked else name for name in names]
                stack.enter_context(_names_handed(layer, peft_names))
            else:
                hooked = own
                stack.enter_context(_switched_off(layer))
            if hooked:
                stack.enter_context(_rows_added(layer, {name: _rows(names, name) for name in hooked}))
        yield


def _rows(names: list[str], adapter: str) -> torch.Tensor:
    return torch.tensor([b for b, name in enumerate(names) if name == adapter])


@contextmanager
def _names_handed(layer: BaseTunerLayer, names: list[str]) -> Iterator[None]:
    def hand_names(_module, args, kwargs):
        kwargs["adapter_names"] = names
        return args, kwargs

    handle = layer.register_forward_pre_hook(hand_names, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _switched_off(layer: BaseTunerLayer) -> Iterator[None]:
    active = list(layer.active_adapters)
    layer.set_adapter([], inference_mode=True)
    try:
        yield
    finally:
        layer.set_adapter(active, inference_mode=True)


@contextmanager
def _rows_added(layer: BaseTunerLayer, rows: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Forward hook: out[rows of a] += change of adapter a on those rows' inputs."""

    def add_changes(_module, args, out):
        for adapter, index in rows.items():
            index = index.to(out.device)
            out = out.index_add(0, index, lora_delta(layer, adapter, args[0].index_select(0, index)).to(out.dtype))
        return out

    handle = layer.register_forward_hook(add_changes)
    try:
        yield
    finally:
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
