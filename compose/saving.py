"""Write LoRA weights as safetensors, in diffusers/PEFT or kohya layout, with rank/alpha kept.

A LoRA whose alpha differs from its rank loads back at the wrong scale unless the file says
so: diffusers files carry the adapter config as metadata, kohya files carry `.alpha` tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from .loading import CONCEPT_KEY, TRIGGER_KEY

KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}  # SDXL: lora_te1_


def save_lora(
    path: str | Path,
    layers: Mapping[tuple[str, str], tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    alpha: float,
    *,
    fmt: str = "diffusers",
    trigger: str | None = None,
    concept: str | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save {(component, dotted module name): (A, B)} with one rank and alpha for every layer."""
    if fmt == "diffusers":
        parts = {where: {"lora_A.weight": down, "lora_B.weight": up} for where, (down, up) in layers.items()}
    else:
        parts = {
            where: {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(float(alpha))}
            for where, (down, up) in layers.items()
        }
    metadata = dict(extra_metadata or {})
    if fmt == "diffusers":
        config = {}
        for component in sorted({component for component, _ in layers}):
            targets = sorted({module for comp, module in layers if comp == component})
            config.update({f"{component}.r": rank, f"{component}.lora_alpha": alpha, f"{component}.target_modules": targets})
        metadata.setdefault("lora_adapter_metadata", json.dumps(config, sort_keys=True))
    return save_adapter(path, parts, fmt=fmt, trigger=trigger, concept=concept, extra_metadata=metadata)


def save_adapter(
    path: str | Path,
    layers: Mapping[tuple[str, str], Mapping[str, torch.Tensor]],
    *,
    fmt: str = "diffusers",
    trigger: str | None = None,
    concept: str | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save {(component, dotted module name): {part: tensor}} under `<layer>.<part>` keys of either layout.

    Parts are named as the file stores them (`lora_down.weight`, `hada_w1_a`, `alpha`, ...).
    """
    if fmt not in ("diffusers", "kohya"):
        raise ValueError(f"unknown LoRA file format {fmt!r}; use 'diffusers' or 'kohya'")
    path = Path(path)
    components = {component for component, _ in layers}
    tensors = {
        f"{layer_stem(component, module, fmt, components)}.{part}": tensor.detach().contiguous().cpu()
        for (component, module), parts in layers.items()
        for part, tensor in parts.items()
    }
    metadata = {"format": "pt"}
    if trigger:
        metadata[TRIGGER_KEY] = trigger
    if concept:
        metadata[CONCEPT_KEY] = concept
    metadata.update(extra_metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def layer_stem(component: str, module: str, fmt: str, components) -> str:
    """`unet.down_blocks.0...to_q` (diffusers) or `lora_unet_down_blocks_0_..._to_q` (kohya; SDXL: lora_te1_)."""
    if fmt == "diffusers":
        return f"{component}.{module}"
    name = module if component == "unet" else "text_model." + module.removeprefix("text_model.")
    prefix = "lora_te1_" if component == "text_encoder" and "text_encoder_2" in components else KOHYA_PREFIXES[component]
    return prefix + name.replace(".", "_")
