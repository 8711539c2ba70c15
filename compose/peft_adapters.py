"""DoRA, LoHa and LoKr files as peft adapters of their own type (diffusers' loader reads plain LoRAs only).

peft's layers compute each type's change; they are filled with the file's factors exactly as the
trainer stored them, whatever factorisation it chose (LoKr's factor sizes, CP/Tucker convs), and
with the scale kohya and LyCORIS define: alpha / rank, alpha = rank when the file has none, and 1
for a LoKr layer of two full factors.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from peft.tuners.lycoris_utils import LycorisLayer
from safetensors import safe_open
from torch import nn

from .errors import CorruptLoraFileError, UnsupportedAdapterTypeError
from .lora_delta import adapter_holder
from .lora_keys import AdapterLayer, LoraLayerShape


def load_typed_adapter(
    model: nn.Module,
    path,
    component: str,
    kind: str,
    targets: Mapping[str, tuple[LoraLayerShape, AdapterLayer]],
    adapter: str,
    metadata: Mapping[str, str],
    kohya: bool,
) -> None:
    """Add `adapter` to `model` on the layers `targets` names ({dotted module name: (shape, parts)})."""
    with safe_open(str(path), "pt") as handle:
        tensors = {
            name: {part: handle.get_tensor(key) for part, (key, _) in parts.parts.items()}
            for name, (_, parts) in targets.items()
        }
    default_alpha = _metadata_alpha(metadata, component)
    scales = {name: _rank_and_alpha(shape, tensors[name].get("alpha"), default_alpha) for name, (shape, _) in targets.items()}
    inject_adapter_in_model(_config(kind, scales, tensors), model, adapter_name=adapter)  # adds to model.peft_config
    model._hf_peft_config_loaded = True  # diffusers and transformers then manage the adapter like their own
    for name, factors in tensors.items():
        holder = adapter_holder(model.get_submodule(name), adapter)
        if kind == "DoRA":
            _fill_dora(holder, adapter, factors, path, name, kohya)
        else:
            _fill_lycoris(holder, adapter, factors)


@contextmanager
def lycoris_layers_lifted(models: Iterable[nn.Module]) -> Iterator[None]:
    """Within the block, LoHa/LoKr layers step aside, so LoRA layers peft adds go below them (both then apply).

    peft's LoRA layers cannot wrap a LoHa/LoKr convolution; LoHa/LoKr layers wrap anything.
    """
    lifted = []
    for model in models:
        for name, outer in list(model.named_modules()):
            if isinstance(outer, LycorisLayer) and ".base_layer" not in name:
                inner = outer
                while isinstance(inner.base_layer, LycorisLayer):
                    inner = inner.base_layer
                parent, _, attribute = name.rpartition(".")
                parent = model.get_submodule(parent)
                setattr(parent, attribute, inner.base_layer)
                lifted.append((parent, attribute, outer, inner))
    try:
        yield
    finally:
        for parent, attribute, outer, inner in reversed(lifted):
            inner.base_layer = getattr(parent, attribute)
            setattr(parent, attribute, outer)


def _metadata_alpha(metadata: Mapping[str, str], component: str) -> float | None:
    """diffusers/PEFT files keep alpha in their adapter config metadata instead of `.alpha` tensors."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
        value = config.get(f"{component}.lora_alpha", config.get(f"{component}.alpha"))
    except (json.JSONDecodeError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def _rank_and_alpha(shape: LoraLayerShape, alpha: torch.Tensor | None, default_alpha: float | None) -> tuple[int, float]:
    if shape.rank is None:  # LoKr of two full factors: no scaling at all
        return 1, 1.0
    if alpha is not None:
        return shape.rank, float(alpha)
    return shape.rank, float(default_alpha if default_alpha is not None else shape.rank)


def _config(kind: str, scales: Mapping[str, tuple[int, float]], tensors: Mapping[str, dict]):
    """One peft config: the most common rank and alpha, patterns for the layers that differ."""
    rank, alpha = Counter(scales.values()).most_common(1)[0][0]
    rank_pattern = {re.escape(name): r for name, (r, _) in scales.items() if r != rank}
    alpha_pattern = {re.escape(name): a for name, (_, a) in scales.items() if a != alpha}
    targets = sorted(scales)
    if kind == "DoRA":
        return LoraConfig(
            r=rank, lora_alpha=alpha, use_dora=True, target_modules=targets, rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
        )  # fmt: skip
    config_class = LoHaConfig if kind == "LoHa" else LoKrConfig
    cp = any("hada_t1" in factors or "lokr_t2" in factors for factors in tensors.values())
    return config_class(
        r=rank, alpha=alpha, target_modules=targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        use_effective_conv2d=cp,
    )  # fmt: skip


def _fill_lycoris(holder, adapter: str, factors: Mapping[str, torch.Tensor]) -> None:
    """Replace the factors peft created with the file's: peft's LoHa/LoKr read whichever ones are present."""
    weight = holder.get_base_layer().weight
    for part in holder.adapter_layer_names:
        if adapter in getattr(holder, part):
            del getattr(holder, part)[adapter]
    for part, tensor in factors.items():
        if part != "alpha":
            getattr(holder, part)[adapter] = nn.Parameter(tensor.to(weight), requires_grad=False)


def _fill_dora(holder, adapter: str, factors: Mapping[str, torch.Tensor], path, name: str, kohya: bool) -> None:
    for part, module in (("down", holder.lora_A[adapter]), ("up", holder.lora_B[adapter])):
        _copy(module.weight, factors[part], path, name)
    magnitude = holder.lora_magnitude_vector[adapter].weight
    stored = factors["magnitude"]
    out_features = holder.get_base_layer().weight.shape[0]
    per_output = stored.shape == magnitude.shape if not kohya else stored.shape[0] == out_features
    if not per_output or stored.numel() != out_features:
        raise UnsupportedAdapterTypeError(
            f"{path}: layer {name} is DoRA with its magnitude over input features (shape {list(stored.shape)}, as older "
            "LyCORIS versions wrote with wd_on_out=False); only the per-output magnitude peft uses is supported"
        )
    _copy(magnitude, stored.reshape(magnitude.shape), path, name)


def _copy(parameter: torch.Tensor, tensor: torch.Tensor, path, name: str) -> None:
    if tensor.shape != parameter.shape:
        raise CorruptLoraFileError(
            f"{path}: layer {name} stores a factor of shape {list(tensor.shape)} where {list(parameter.shape)} fits; "
            "the file is damaged"
        )
    with torch.no_grad():
        parameter.copy_(tensor)

