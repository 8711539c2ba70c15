"""tara: token-aware LoRA (TARA); each LoRA's cross-attention k/v delta acts only at its trigger tokens.

One UNet pass per step. Every other projection (queries, outputs, self-attention, anything else
a LoRA touches) gets the ordinary weighted sum of the LoRAs, optionally fused into the weights.
The masked keys/values act on the fixed text only, so they are projected once per call in
`prepare`, for the conditional and unconditional embeddings, and reused at every step.

Choices: by default the masks apply to the conditional half only and the unconditional half
gets the base model's keys/values (the reference also masks the unconditional half at the
prompt's trigger positions: `mask_uncond=True`). A LoRA with a text-encoder part (TARA trains
none) gets it applied when the prompt is encoded, as `merge` does. Fusing keeps one copy of the
fused layers' weights for the call, so the model is restored bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from ..adapters import fuse_active, unfuse
from ..attention.layers import attention_layers, install_processors
from ..attention.token_mask import TokenMaskedLoraAttnProcessor, positions_mask
from ..context import Pass
from ..tokens import require_word
from .base import CompositionMethod, require


@dataclass
class TaraOptions:
    mask_uncond: bool = False  # also add the masked k/v deltas in the unconditional half (as the reference does)
    fuse: bool = True  # fuse the unmasked LoRA deltas into the weights for the call (faster); originals put back

    def __post_init__(self):
        for name in ("mask_uncond", "fuse"):
            value = getattr(self, name)
            require(isinstance(value, bool), f"tara option {name} must be true or false, got {value!r}")


def trigger_masks(tokenizer, prompt: str, loras, length: int = 77) -> dict[str, torch.Tensor]:
    """{adapter: 0/1 vector over the prompt's tokens}, ones at every token of the LoRA's trigger word."""
    return {
        lora.adapter: positions_mask(require_word(tokenizer, prompt, lora.trigger, lora.adapter), length)
        for lora in loras
    }


def batch_masks(
    masks: dict[str, torch.Tensor], num_images: int, cfg: bool, mask_uncond: bool
) -> dict[str, torch.Tensor]:
    """Per-row masks for the UNet batch [uncond x num_images, cond x num_images] (cond rows only without CFG)."""
    rows = {}
    for adapter, mask in masks.items():
        cond = mask.expand(num_images, -1)
        uncond = cond if mask_uncond else torch.zeros_like(cond)
        rows[adapter] = torch.cat([uncond, cond]) if cfg else cond
    return rows


def masked_kv_modules(unet) -> set[str]:
    """Module names of the cross-attention to_k/to_v layers (the ones TARA masks)."""
    names = set()
    for layer in attention_layers(unet):
        if layer.cross:
            stem = layer.name.removesuffix(".processor")
            names |= {f"{stem}.to_k", f"{stem}.to_v"}
    return names


class TaraMethod(CompositionMethod):
    name = "tara"
    options_class = TaraOptions
    needs_triggers = True

    def prepare(self, ctx):
        unet = ctx.unet
        text_adapters = {lora.adapter: lora.weight for lora in ctx.loras if lora.has_text_encoder}
        self._embeds = ctx.encode(ctx.prompt, text_adapters)
        negative, embeds = self._embeds
        masks = trigger_masks(ctx.pipe.tokenizer, ctx.prompt, ctx.loras, embeds.shape[1])
        ctx.outputs["trigger_masks"] = masks
        rows = batch_masks(masks, embeds.shape[0], ctx.do_cfg, self.options.mask_uncond)
        context = torch.cat([negative, embeds]) if ctx.do_cfg else embeds
        processors = {}
        for layer in attention_layers(unet):
            if layer.cross:
                processor = TokenMaskedLoraAttnProcessor(rows)
                processor.precompute(unet.get_submodule(layer.name.removesuffix(".processor")), context)
                processors[layer.name] = processor
        install_processors(unet, processors)
        self._fused = []
        if self.options.fuse:
            masked = masked_kv_modules(unet)
            self._fused = fuse_active(
                module
                for name, module in unet.named_modules()
                if isinstance(module, BaseTunerLayer)
                and name.split(".base_layer")[0] not in masked  # nor the layers a masked LoHa/LoKr wraps
                and module.active_adapters
            )

    def noise_prediction(self, ctx, latents, t, i):
        negative, embeds = self._embeds
        [(uncond, cond)] = ctx.predict(latents, t, [Pass(None, negative, embeds)])
        return ctx.guide(uncond, cond), latents

    def release(self, ctx):
        unfuse(getattr(self, "_fused", []))
        self._fused = []
