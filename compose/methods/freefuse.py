"""freefuse: FreeFuse (Liu et al., 2025): each LoRA in a region the base model lays out itself, no boxes.

Before the first step, a short LoRA-free run from the call's starting noise reads one cross-attention
layer (chosen by latent size, like clora's and composer's maps) and that block's self-attention
output, and turns them into one-hot regions (compose.auto_masks). Sampling then starts again from the
same noise with every LoRA's change to the UNet gated to its own region (compose.adapter_gates) and a
cross-attention bias drawing each region toward its own concept's tokens (conditional half only: the
token positions are the prompt's). Text-encoder parts of the LoRAs apply to the whole prompt, as in merge.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from ..adapter_gates import RegionGates, add_gated_changes
from ..adapters import BASE, activate
from ..attention.capture import AttentionStore, CaptureAttnProcessor, OutputCaptureAttnProcessor
from ..attention.layers import attention_layers, install_processors, layer_grid, layers_near_factor, map_factor
from ..attention.token_bias import TokenBiasAttnProcessor, token_bias
from ..auto_masks import concept_attention, contrast, owner_masks, similarity_maps
from ..concept_prompts import ConceptError
from ..context import Pass
from ..tokens import token_positions, word_spans
from .base import STEP, CompositionMethod, is_number, is_step, is_whole, require, step_index
from .tara import masked_kv_modules


@dataclass
class FreefuseOptions:
    collect_steps: int | float = 1 / 3  # LoRA-free steps before the maps are read (10 of 30, as the reference): a
    # fraction of the steps or a count (at most the steps); at least one
    anchor_fraction: float = 0.1  # share of the map's pixels that anchor each concept
    temperature: float = 1000.0  # of the softmax over pixels of each concept's anchor similarity
    bias_own: float = 1.0  # cross-attention logit bias of a region toward its own concept's tokens
    bias_other: float = 1.0  # ... and away from the other concepts' tokens
    background: float = 0.0  # weight of a background channel (the end token's map); 0: every pixel to some LoRA
    map_factor: int | None = None  # latent downsampling of the map layer; None: by the latent size (map_factor)

    def __post_init__(self):
        rules = {
            "collect_steps": (is_step(self.collect_steps) and self.collect_steps > 0, f"{STEP}, above 0"),
            "anchor_fraction": (
                is_number(self.anchor_fraction) and 0 < self.anchor_fraction <= 1, "a number in (0, 1]"
            ),
            "temperature": (is_number(self.temperature) and 0 < self.temperature < float("inf"), "a finite number > 0"),
            **{
                name: (
                    is_number(getattr(self, name)) and 0 <= getattr(self, name) < float("inf"), "a finite number >= 0"
                )
                for name in ("bias_own", "bias_other", "background")
            },
            "map_factor": (self.map_factor is None or is_whole(self.map_factor, 1), "a whole number >= 1 or None"),
        }
        for name, (valid, expected) in rules.items():
            require(valid, f"freefuse option {name} must be {expected}, got {getattr(self, name)!r}")


def concept_text(prompt: str, trigger: str, concept: str | None) -> str:
    """The words that name a LoRA's subject: "sks cat" where the prompt says so, else the trigger alone."""
    phrase = f"{trigger} {concept}" if concept else trigger
    return phrase if word_spans(prompt, phrase) else trigger


def end_position(tokenizer, prompt: str) -> int:
    """Index of the prompt's end token (its attention stands for the background)."""
    return len(tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length)["input_ids"]) - 1


def map_layer(unet, factor: int) -> str:
    """The cross-attention layer whose maps lay out the image: the decoder's first attention block at that
    resolution, a third of the way into its transformer layers (SDXL at 1024 px: up_blocks.0.attentions.0,
    transformer_blocks.3 of 10, the reference's layer)."""
    names = layers_near_factor(unet, factor, cross=True)
    decoder = [name for name in names if name.startswith("up_blocks.")] or names
    block = decoder[0].split(".transformer_blocks.")[0]
    depth = [name for name in decoder if name.startswith(f"{block}.transformer_blocks.")]
    return depth[(len(depth) - 1) // 3]


@contextmanager
def scheduler_copy(pipe) -> Iterator:
    """Within the block the pipeline samples with a copy of its scheduler (a schedule of its own, input
    scaling included); the call's scheduler is untouched, as if those steps had not run."""
    scheduler = pipe.scheduler
    pipe.scheduler = copy.deepcopy(scheduler)
    try:
        yield pipe.scheduler
    finally:
        pipe.scheduler = scheduler


class FreefuseMethod(CompositionMethod):
    name = "freefuse"
    options_class = FreefuseOptions
    needs_triggers = True

    def check(self, pipe, prompt, loras):
        super().check(pipe, prompt, loras)
        self.token_sets = [
            token_positions(pipe.tokenizer, prompt, concept_text(prompt, lora.trigger, lora.concept)) for lora in loras
        ]
        for index, tokens in enumerate(self.token_sets):
            earlier = self.token_sets.index(tokens)
            if earlier != index:
                words = concept_text(prompt, loras[index].trigger, loras[index].concept)
                raise ConceptError(
                    f"LoRAs '{loras[earlier].adapter}' and '{loras[index].adapter}' are named by the same words of the "
                    f"prompt ('{words}'), so freefuse cannot tell their regions apart; give each its own trigger word "
                    "and write both in the prompt"
                )
        self.end = end_position(pipe.tokenizer, prompt)

    def prepare(self, ctx):
        activate(ctx.unet, {})  # the LoRAs act only through their gates (installed once the masks are known)
        self.adapters = [lora.adapter for lora in ctx.loras]
        self.base_pass = Pass(None, *ctx.encode(ctx.prompt))
        text_parts = {lora.adapter: lora.weight for lora in ctx.loras if lora.has_text_encoder}
        self.lora_pass = Pass(None, *ctx.encode(ctx.prompt, text_parts))
        self.factor = map_factor(ctx.unet, ctx.latent_hw, self.options.map_factor)
        self.cross_layer = map_layer(ctx.unet, self.factor)
        self.self_layer = self.cross_layer.replace(".attn2.", ".attn1.")
        self.collect = min(len(ctx.timesteps), max(1, step_index(self.options.collect_steps, len(ctx.timesteps))))
        self.hooks, self.masks = [], None

    def noise_prediction(self, ctx, latents, t, i):
        if i == 0:
            self.masks = self.find_masks(ctx, latents)
            self.route(ctx)
        [(uncond, cond)] = ctx.predict(latents, t, [self.lora_pass])
        return ctx.guide(uncond, cond), latents

    def find_masks(self, ctx, latents) -> torch.Tensor:
        """One-hot owners (LoRAs + 1, images, h, w) at latent size, row 0 the background, from a LoRA-free run
        of `collect` steps from these latents; the last step only runs up to the map layer."""
        store, features = AttentionStore(), {}
        layers = {self.cross_layer, self.self_layer}
        original = {name: processor for name, processor in ctx.unet.attn_processors.items() if name in layers}
        install_processors(ctx.unet, {
            self.cross_layer: CaptureAttnProcessor(store, self.cross_layer),
            self.self_layer: OutputCaptureAttnProcessor(features, self.self_layer),
        })  # fmt: skip
        with scheduler_copy(ctx.pipe) as scheduler:
            steps = ctx.pipe.prepare_extra_step_kwargs(torch.Generator(latents.device).manual_seed(0), 0.0)
            for t in ctx.timesteps[: self.collect - 1]:
                [(uncond, cond)] = ctx.predict(latents, t, [self.base_pass])
                latents = scheduler.step(ctx.guide(uncond, cond), t, latents, **steps, return_dict=False)[0]
            ctx.predict(latents, ctx.timesteps[self.collect - 1], [self.base_pass], cond_only=True, stop_after=layers)
        install_processors(ctx.unet, original)

        options = self.options
        token_sets = self.token_sets + ([[self.end]] if options.background else [])
        scores = contrast(concept_attention(store.maps[self.cross_layer], token_sets))
        maps = similarity_maps(scores, features[self.self_layer], options.anchor_fraction, options.temperature)
        background = options.background * maps[-1] if options.background else None
        owners = owner_masks(maps[: len(self.token_sets)], background)
        grid = layer_grid(ctx.latent_hw, self.factor)
        owners = owners.view(*owners.shape[:2], *grid)
        masks = F.interpolate(owners, size=ctx.latent_hw, mode="nearest") if grid != ctx.latent_hw else owners
        ctx.outputs.update(masks=masks[:, 0] if masks.shape[1] == 1 else masks.transpose(0, 1))
        ctx.outputs.update(pass_adapters=[BASE, *self.adapters])
        return masks

    def route(self, ctx):
        """Gate every LoRA to its region and bias every cross-attention layer toward the region's tokens."""
        halves = 2 if ctx.do_cfg else 1
        gates = RegionGates(ctx.unet, ctx.latent_hw, self.masks[1:], halves)
        self.hooks = add_gated_changes(ctx.unet, self.adapters, gates, masked_kv_modules(ctx.unet))
        options = self.options
        if not (options.bias_own or options.bias_other):
            return
        processors = {}
        for layer in attention_layers(ctx.unet):
            if layer.cross:
                h, w = layer_grid(ctx.latent_hw, layer.factor)
                masks = gates.at(h, w)[:, -self.masks.shape[1] :].flatten(2)  # the conditional rows
                length = self.lora_pass.embeds.shape[1]
                bias = token_bias(masks, self.token_sets, length, options.bias_own, options.bias_other)
                rows = torch.cat([torch.zeros_like(bias), bias]) if halves == 2 else bias
                processors[layer.name] = TokenBiasAttnProcessor(rows)
        install_processors(ctx.unet, processors)

    def release(self, ctx):
        for hook in getattr(self, "hooks", []):
            hook.remove()
        self.hooks, self.masks = [], None
