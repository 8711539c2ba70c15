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
    if fmt not in ("diffusers", "kohya"):
        raise ValueError(f"unknown LoRA file format {fmt!r}; use 'diffusers' or 'kohya'")
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    metadata = {"format": "pt"}
    components = sorted({component for component, _ in layers})
    for (component, module), (down, up) in layers.items():
        down, up = down.detach().contiguous().cpu(), up.detach().contiguous().cpu()
        if fmt == "diffusers":
            tensors[f"{component}.{module}.lora_A.weight"] = down
            tensors[f"{component}.{module}.lora_B.weight"] = up
        else:
            name = module if component == "unet" else "text_model." + module.removeprefix("text_model.")
            prefix = "lora_te1_" if component == "text_encoder" and "text_encoder_2" in components else None
            stem = (prefix or KOHYA_PREFIXES[component]) + name.replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = down
            tensors[f"{stem}.lora_up.weight"] = up
            tensors[f"{stem}.alpha"] = torch.tensor(float(alpha))
    if fmt == "diffusers":
        config = {}
        for component in components:
            targets = sorted({module for comp, module in layers if comp == component})
            config.update({f"{component}.r": rank, f"{component}.lora_alpha": alpha, f"{component}.target_modules": targets})
        metadata["lora_adapter_metadata"] = json.dumps(config, sort_keys=True)
    if trigger:
        metadata[TRIGGER_KEY] = trigger
    if concept:
        metadata[CONCEPT_KEY] = concept
    metadata.update(extra_metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path
