"""Random LoCon, DoRA, LoHa and LoKr files for a pipeline, written as kohya/LyCORIS (or PEFT) write them.

Tests and `loracompose bench` use them: attention projections and, except for plain LoRA, the ResNet
convolutions (`lora_unet_..._resnets_..._conv1`, as LoCon trains them); SDXL files in the original
layout (`input_blocks_...`), as real ones are. Factors are stored as the trainers store them:
LoHa's two Hadamard pairs (convs optionally in CP form, `hada_t1/t2`), LoKr's full first factor and
rank-decomposed second (`lokr_w1`, `lokr_w2_a/b`, or both full), DoRA's per-output magnitude.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from compose.saving import save_adapter
from compose.unet_names import diffusers_to_original

from .tiny import TEXT_TARGETS, UNET_TARGETS

ADAPTER_KINDS = ("LoRA", "LoCon", "DoRA", "LoHa", "LoKr")
CONV_TARGETS = ("conv1", "conv2")


def adapted_layers(pipe, kind: str, text_encoder: bool = False, convs: bool = True) -> list[tuple[str, str, torch.nn.Module]]:
    """(component, dotted name, layer) of every layer a file of this kind adapts (convs: not for plain LoRA)."""
    components = [("unet", pipe.unet, UNET_TARGETS + (CONV_TARGETS if convs and kind != "LoRA" else ()))]
    if text_encoder:
        components += [(c, getattr(pipe, c), TEXT_TARGETS) for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None)]
    layers = []
    for component, model, targets in components:
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and "lora_" not in name:
                name = name.split(".base_layer")[0]  # a layer peft wrapped: its own weights are the wrapped module's
                if name.endswith(targets):
                    layers.append((component, name, module))
    return layers


def random_adapter_parts(
    pipe, kind: str, seed: int, *, rank: int = 4, alpha: float = 8.0, cp: bool = False, full: bool = False,
    text_encoder: bool = False, convs: bool = True, fmt: str = "kohya", strength: float = 0.1,
) -> dict[tuple[str, str], dict[str, torch.Tensor]]:  # fmt: skip
    """{(component, dotted name): {stored part: tensor}}; cp: convs in CP form; full: LoKr of two full factors;
    convs False: attention projections only, as a plain LoRA."""
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}; choose one of {ADAPTER_KINDS}")
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * strength

    layers = {}
    for component, name, module in adapted_layers(pipe, kind, text_encoder, convs):
        weight = module.weight.detach()
        out_features, fan_in, kernel = weight.shape[0], weight[0].numel(), tuple(weight.shape[2:])
        if kind in ("LoRA", "LoCon", "DoRA"):
            parts = {"lora_down.weight": rand(rank, weight.shape[1], *kernel), "lora_up.weight": rand(out_features, rank, *(1,) * len(kernel))}
            if kind == "DoRA":
                row_norms = weight.reshape(out_features, -1).norm(dim=1)
                parts["dora_scale"] = (row_norms * (1 + 3 * rand(out_features).abs())).reshape(out_features, *(1,) * (weight.ndim - 1))
        elif kind == "LoHa":  # factors 3x larger: a Hadamard product of two LoRA-sized products would barely show
            parts = _loha_parts(lambda *shape: 3 * rand(*shape), rank, out_features, weight.shape[1], kernel, cp)
        else:
            parts = _lokr_parts(rand, rank, out_features, weight.shape[1], kernel, cp, full)
        if not (kind == "LoKr" and full):
            parts["alpha"] = torch.tensor(float(alpha))
        layers[(component, name)] = _as_peft_layout(parts) if fmt == "diffusers" else parts
    return layers


def _loha_parts(rand, rank, out_features, in_channels, kernel, cp):
    if cp and kernel:
        pair = lambda: {"t": rand(rank, rank, *kernel), "a": rand(rank, out_features), "b": rand(rank, in_channels)}  # noqa: E731
    else:
        pair = lambda: {"a": rand(out_features, rank), "b": rand(rank, in_channels * math.prod(kernel))}  # noqa: E731
    first, second = pair(), pair()
    names = {"a": "hada_w{}_a", "b": "hada_w{}_b", "t": "hada_t{}"}
    return {names[k].format(i): v for i, factors in ((1, first), (2, second)) for k, v in factors.items()}


def _lokr_parts(rand, rank, out_features, in_channels, kernel, cp, full):
    (out_1, out_2), (in_1, in_2) = _two_factors(out_features), _two_factors(in_channels)
    parts = {"lokr_w1": rand(out_1, in_1) * 10}
    if full:
        parts["lokr_w2"] = rand(out_2, in_2, *kernel)
    elif cp and kernel:
        parts.update(lokr_t2=rand(rank, rank, *kernel), lokr_w2_a=rand(rank, out_2), lokr_w2_b=rand(rank, in_2))
    else:
        parts.update(lokr_w2_a=rand(out_2, rank), lokr_w2_b=rand(rank, in_2 * math.prod(kernel)))
    return parts


def _two_factors(dim: int) -> tuple[int, int]:
    """dim = m * n with m the largest divisor up to sqrt(dim), as LyCORIS splits a LoKr layer's sides."""
    m = max(d for d in range(1, math.isqrt(dim) + 1) if dim % d == 0)
    return m, dim // m


def _as_peft_layout(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's names: lora_A/lora_B, and DoRA's magnitude as `lora_magnitude_vector` (shape (out,) on Linear)."""
    renames = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
    out = {renames.get(part, part): tensor for part, tensor in parts.items()}
    if "dora_scale" in out:
        scale = out.pop("dora_scale")
        out["lora_magnitude_vector"] = scale.flatten() if scale.ndim == 2 else scale.reshape(1, -1, 1, 1)
    return out


def write_random_adapter(
    pipe, path: str | Path, kind: str, seed: int, *, fmt: str = "kohya", trigger: str | None = None,
    concept: str | None = None, **settings,
) -> Path:  # fmt: skip
    """A random file of this kind for `pipe`; `settings` as random_adapter_parts takes them."""
    layers = random_adapter_parts(pipe, kind, seed, fmt=fmt, **settings)
    if fmt == "kohya" and getattr(pipe, "text_encoder_2", None) is not None:
        config = pipe.unet.config
        layers = {
            (component, diffusers_to_original(name, config) if component == "unet" else name): parts
            for (component, name), parts in layers.items()
        }
    metadata = {}
    if fmt == "diffusers":  # PEFT files carry alpha in their adapter config, not in tensors
        config = {f"{c}.lora_alpha": float(parts.pop("alpha")) for (c, _), parts in layers.items() if "alpha" in parts}
        metadata["lora_adapter_metadata"] = json.dumps(config, sort_keys=True)
    return save_adapter(path, layers, fmt=fmt, trigger=trigger, concept=concept, extra_metadata=metadata)
