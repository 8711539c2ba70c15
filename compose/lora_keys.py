"""What each tensor of a LoRA file is: which layer it adapts, which adapter type it belongs to, and its part.

Trainers name the same pieces differently (kohya/LyCORIS `lora_unet_..._to_q.lora_down.weight`,
diffusers/PEFT `unet....to_q.lora_A.weight`), so every key is split into (component, layer, part)
and every layer is then classified by the parts it has: LoRA/LoCon, DoRA, LoHa or LoKr. Types this
toolkit cannot compose (IA3, OFT, GLoRA, full fine-tune differences, ...) are recognised by their
parts too, so a user is told what the file is instead of "no LoRA weights".
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

from .errors import CorruptLoraFileError, NoLoraKeysError, UnsupportedAdapterTypeError

_KOHYA_KEY = re.compile(r"^lora_(unet|te|te1|te2)_([^.]+)\.(.+)$")
_DIFFUSERS_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)$")
_KOHYA_COMPONENTS = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}

# Part names as stored -> one spelling (peft's own parameter names, `down`/`up` for the LoRA pair).
_PARTS = {
    "lora_down.weight": "down", "lora_A.weight": "down", "lora.down.weight": "down",
    "lora_linear_layer.down.weight": "down",
    "lora_up.weight": "up", "lora_B.weight": "up", "lora.up.weight": "up", "lora_linear_layer.up.weight": "up",
    "dora_scale": "magnitude", "lora_magnitude_vector": "magnitude", "lora_magnitude_vector.weight": "magnitude",
    "alpha": "alpha",
    **{name: name for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    **{name: name for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")},
}  # fmt: skip
# Parts of adapter types that cannot be composed here, by the name users know them under.
_UNSUPPORTED_PARTS = {
    "on_input": "IA3", "ia3_l": "IA3",
    "diff": "a full fine-tune difference (LyCORIS 'full')", "diff_b": "a full fine-tune difference (LyCORIS 'full')",
    "w_norm": "a normalisation-layer fine-tune (LyCORIS 'norm')", "b_norm": "a normalisation-layer fine-tune (LyCORIS 'norm')",
    "oft_blocks": "OFT", "oft_diag": "OFT", "oft_r": "OFT", "boft_R": "BOFT", "boft_s": "BOFT",
    "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA",
    "lora_mid.weight": "LoCon with a CP/Tucker middle factor (lora_mid)",
    "vera_lambda_b": "VeRA", "vera_lambda_d": "VeRA",
}  # fmt: skip
_PART_PATTERN = re.compile(
    r"^(.+)\.(" + "|".join(re.escape(p) for p in sorted([*_PARTS, *_UNSUPPORTED_PARTS], key=len, reverse=True)) + r")$"
)
# Files that are whole models or embeddings, by the start of their keys.
_NOT_ADAPTERS = {
    "model.diffusion_model.": "a full Stable Diffusion checkpoint",
    "conditioner.embedders.": "a full SDXL checkpoint",
    "first_stage_model.": "a full Stable Diffusion checkpoint",
    "down_blocks.": "a UNet's full weights",
    "conv_in.": "a UNet's full weights",
    "text_model.": "a text encoder's full weights",
    "emb_params": "a textual inversion embedding",
    "string_to_param": "a textual inversion embedding",
    "clip_l": "a textual inversion embedding",
}
_REQUIRED = {  # per type: the parts a layer needs, each one of a few alternatives
    "LoRA": [("down",), ("up",)],
    "LoHa": [("hada_w1_a",), ("hada_w1_b",), ("hada_w2_a",), ("hada_w2_b",)],
    "LoKr": [("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")],
}


@dataclass(frozen=True)
class LoraLayerShape:
    """One adapted layer as stored: adapter type, rank (None for a LoKr of two full factors), the layer's
    fan-in (input features; a conv's input channels times its kernel size) and output features."""

    rank: int | None
    in_features: int
    out_features: int
    kind: str = "LoRA"


@dataclass(frozen=True)
class AdapterLayer:
    """Where each part of one layer's adapter is in the file: {part: (tensor key, shape)}."""

    parts: dict[str, tuple[str, list[int]]]

    def shape(self, part: str) -> list[int]:
        return self.parts[part][1]


def split_key(key: str) -> tuple[str, str, str, bool] | None:
    """(component, dotted-or-underscored layer name, part, kohya layout?) of one tensor key, or None."""
    kohya = _KOHYA_KEY.match(key)
    if kohya:
        prefix, module, part = kohya.groups()
        part = part.replace(".default", "")
        return (_KOHYA_COMPONENTS[prefix], module, part, True) if part in _PARTS or part in _UNSUPPORTED_PARTS else None
    diffusers = _DIFFUSERS_KEY.match(key.replace(".default.", ".").removesuffix(".default"))
    if diffusers:
        component, rest = diffusers.groups()
        split = _PART_PATTERN.match(rest)
        if split:
            return component, split.group(1), split.group(2), False
    return None


def adapter_layers(path, header: dict[str, dict], module_key) -> tuple[dict[tuple[str, str], AdapterLayer], bool]:
    """{(component, module_key(layer)): AdapterLayer} of a file, and whether it is in kohya layout.

    Raises UnsupportedAdapterTypeError naming the type when any layer is of a type that cannot be
    composed (leaving it out would give a wrong image), NoLoraKeysError when nothing is an adapter.
    """
    layers: dict[tuple[str, str], dict[str, tuple[str, list[int]]]] = {}
    unsupported: Counter = Counter()
    kohya = False
    for key, entry in header.items():
        split = split_key(key)
        if split is None:
            continue
        component, module, part, is_kohya = split
        kohya |= is_kohya
        if part in _UNSUPPORTED_PARTS:
            unsupported[_UNSUPPORTED_PARTS[part]] += 1
            continue
        layers.setdefault((component, module_key(module)), {})[_PARTS[part]] = (key, list(entry.get("shape", [])))
    if unsupported:
        kind, count = unsupported.most_common(1)[0]
        raise UnsupportedAdapterTypeError(
            f"{path} is {_article(kind)} file ({count} layers); it cannot be composed here. Supported: LoRA, LoCon, "
            "LoHa, LoKr and DoRA files (diffusers/PEFT or kohya/LyCORIS layout); convert or extract it as a LoRA"
        )
    if not layers:
        raise NoLoraKeysError(_not_an_adapter_message(path, header))
    return {where: AdapterLayer(parts) for where, parts in layers.items()}, kohya


def _article(kind: str) -> str:
    return kind if kind.startswith(("a ", "an ")) else f"an {kind}" if kind[0] in "AEIOU" else f"a {kind}"


def _not_an_adapter_message(path, header: dict[str, dict]) -> str:
    for start, what in _NOT_ADAPTERS.items():
        if any(key.startswith(start) for key in header):
            return (
                f"{path} is {what}, not a LoRA: it holds no adapter weights (its keys start with '{start}'). "
                "Pass a model folder as --model, or a LoRA file here"
            )
    sample = sorted(header)[:3]
    return (
        f"{path} holds no LoRA weights in a known format (diffusers/PEFT 'lora_A/lora_B', kohya 'lora_unet_...lora_down', "
        f"LyCORIS 'hada_'/'lokr_' parts); its first keys are {sample}"
    )


def layer_kind(path, where: tuple[str, str], layer: AdapterLayer) -> str:
    """LoRA (also LoCon: conv layers), DoRA, LoHa or LoKr, from the parts the layer has; damaged layers refused."""
    parts = set(layer.parts) - {"alpha"}
    kinds = {"LoHa" if p.startswith("hada_") else "LoKr" if p.startswith("lokr_") else "LoRA" for p in parts - {"magnitude"}}
    if len(kinds) != 1:
        raise CorruptLoraFileError(f"{path}: layer {where[1]} has parts of {sorted(kinds) or 'no'} adapter type(s); the file is damaged")
    [kind] = kinds
    for alternatives in _REQUIRED[kind]:
        if not parts & set(alternatives):
            raise CorruptLoraFileError(f"{path}: layer {where[1]} lacks its {alternatives[0]} part; the file is damaged")
    if "magnitude" in parts:
        if kind != "LoRA":
            raise CorruptLoraFileError(f"{path}: layer {where[1]} has a DoRA magnitude on a {kind}; the file is damaged")
        return "DoRA"
    return kind


def layer_shape(path, where: tuple[str, str], layer: AdapterLayer) -> LoraLayerShape:
    """Rank, fan-in and output features of one layer's dense change, from the stored factor shapes alone."""
    kind = layer_kind(path, where, layer)
    try:
        if kind in ("LoRA", "DoRA"):
            down, up = layer.shape("down"), layer.shape("up")
            return LoraLayerShape(down[0], math.prod(down[1:]), up[0], kind)
        if kind == "LoHa":
            w1_a, w1_b = layer.shape("hada_w1_a"), layer.shape("hada_w1_b")
            if "hada_t1" in layer.parts:  # CP form for convs: t1 (r, r, kh, kw), w1_a (r, out), w1_b (r, in)
                t1 = layer.shape("hada_t1")
                return LoraLayerShape(t1[0], w1_b[1] * math.prod(t1[2:]), w1_a[1], kind)
            return LoraLayerShape(w1_b[0], w1_b[1], w1_a[0], kind)
        return _lokr_shape(layer)
    except IndexError as error:
        raise CorruptLoraFileError(f"{path}: layer {where[1]} has factors of impossible shapes; the file is damaged") from error


def _lokr_shape(layer: AdapterLayer) -> LoraLayerShape:
    """The Kronecker product of w1 (a, b) and w2 (c, d[, kh, kw]) is (a*c, b*d[, kh, kw])."""
    if "lokr_w1" in layer.parts:
        out_1, in_1 = layer.shape("lokr_w1")[:2]
    else:
        out_1, in_1 = layer.shape("lokr_w1_a")[0], layer.shape("lokr_w1_b")[1]
    if "lokr_w2" in layer.parts:
        w2 = layer.shape("lokr_w2")
        out_2, in_2 = w2[0], math.prod(w2[1:])
    elif "lokr_t2" in layer.parts:  # CP form: t2 (r, r, kh, kw), w2_a (r, c), w2_b (r, d)
        t2 = layer.shape("lokr_t2")
        out_2, in_2 = layer.shape("lokr_w2_a")[1], layer.shape("lokr_w2_b")[1] * math.prod(t2[2:])
    else:
        out_2, in_2 = layer.shape("lokr_w2_a")[0], layer.shape("lokr_w2_b")[1]
    return LoraLayerShape(lokr_rank(layer), in_1 * in_2, out_1 * out_2, "LoKr")


def lokr_rank(layer: AdapterLayer) -> int | None:
    """LyCORIS's rank of a LoKr layer: that of its decomposed factor (w2 first); None when both are full."""
    for part in ("lokr_w2_b", "lokr_w1_b"):
        if part in layer.parts:
            return layer.shape(part)[0]
    return None
