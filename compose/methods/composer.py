"""composer: LoRA-Composer (Yang et al., 2024) — each concept LoRA in its own region, one UNet pass per step.

Concept injection: in every cross-attention layer, pixels inside region k attend to region k's
prompt through LoRA k's to_k/to_v/to_out deltas (RegionCrossAttnProcessor); everything else uses
the base weights (plus an optional background LoRA over the whole image). With `all_layers`, the
LoRA's changes to every other layer it touches (self-attention, feed-forward, convolutions) act too,
gated to its region (compose.adapter_gates): for LoRAs that carry their concept beyond cross-attention,
as LoCon files do. Concept isolation:
self-attention between different regions is masked (RegionIsolationAttnProcessor). Before the
loop the initial noise is re-arranged so each concept starts where it already attends; in the
early steps the latent takes one gradient step on the region losses (compose.region_guidance).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..adapter_gates import RegionGates, add_gated_changes
from ..adapters import activate
from ..attention.layers import attention_layers, install_processors, layer_grid, layers_near_factor, map_factor
from ..attention.regions import (
    MapRecorder,
    RegionCrossAttnProcessor,
    RegionIsolationAttnProcessor,
    RegionState,
    isolation_mask,
)
from ..context import Pass
from ..errors import InvalidOptionError, InvalidRegionError
from ..region_guidance import composer_loss, reinitialize_latents, smoothing_for
from ..regions import check_region_fits, region_mask
from ..tokens import token_positions, word_spans
from .base import STEP, CompositionMethod, is_step, is_whole, require, step_index


@dataclass
class ComposerOptions:
    background: str | None = None  # adapter name of a LoRA without region, merged into the base everywhere
    isolation: bool = True  # mask self-attention between different regions
    reinit: bool = True  # re-arrange the initial noise before the loop
    guidance: bool = True  # loss-guided latent updates in the early steps
    guidance_steps: int | float = 0.5  # at most these first steps get an update: a fraction of the steps, or a count
    patience: int = 5  # from this step on, guidance stops for good once the loss rises
    step_size: float = 20.0  # eta_i = step_size * sqrt(s_i), s = linspace(1, 0.5, steps)
    fg_weight: float = 8.0  # L_fg, concept enhancement (0 switches it off)
    fill_weight: float = 2.0  # L_fill, region filling (0 switches it off)
    reg_weight: float = 10.0  # L_reg, region perceptual restriction (0 switches it off)
    map_factor: int | None = None  # latent downsampling of the maps re-init and losses read; None: by the latent size
    all_layers: bool = False  # also each LoRA's other layers, gated to its region (False: cross-attention only, as published)

    def __post_init__(self):
        require(
            self.background is None or (isinstance(self.background, str) and self.background),
            f"composer option background must name a LoRA adapter, got {self.background!r}",
        )
        for flag in ("isolation", "reinit", "guidance", "all_layers"):
            value = getattr(self, flag)
            require(isinstance(value, bool), f"composer option {flag} must be true or false, got {value!r}")
        require(
            is_step(self.guidance_steps), f"composer option guidance_steps must be {STEP}, got {self.guidance_steps!r}"
        )
        require(
            is_whole(self.patience, 0), f"composer option patience must be a whole number >= 0, got {self.patience!r}"
        )
        require(
            self.map_factor is None or is_whole(self.map_factor, 1),
            f"composer option map_factor must be a whole number >= 1 or None, got {self.map_factor!r}",
        )
        for number in ("step_size", "fg_weight", "fill_weight", "reg_weight"):
            value = getattr(self, number)
            require(
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0,
                f"composer option {number} must be a finite number >= 0, got {value!r}",
            )


def default_regional_prompt(prompt: str, trigger: str, concept: str | None) -> str:
    """The phrase of the global prompt that holds the trigger ("a sks cat" in "a sks cat and a zwx dog").

    Phrases end at commas, semicolons, "and" and "with"; without the trigger in the prompt the
    regional prompt is "a <trigger> <concept>".
    """
    for phrase in re.split(r"[,;]|\s+(?:and|with)\s+", prompt):
        if word_spans(phrase, trigger):
            return phrase.strip()
    return " ".join(["a", trigger] + ([concept] if concept else []))


def guidance_continues(i: int, loss: float, previous: float | None, patience: int) -> bool:
    """After step i: keep guiding unless, from step `patience` on, the loss rose (then stop for good)."""
    return not (i >= patience and previous is not None and loss > previous)


class ComposerMethod(CompositionMethod):
    name = "composer"
    options_class = ComposerOptions

    def check(self, pipe, prompt, loras):
        background = self.options.background
        names = [lora.adapter for lora in loras]
        if background is not None and background not in names:
            raise InvalidOptionError(
                f"composer option background={background!r} names no LoRA of this call; use one of {names}"
            )
        for lora in loras:
            if lora.adapter == background:
                if lora.region is not None:
                    raise InvalidRegionError(
                        f"background LoRA '{lora.adapter}' covers the whole image; remove its region"
                    )
                continue
            if lora.region is None:
                raise InvalidRegionError(
                    f"composer needs a region for LoRA '{lora.adapter}': pass LoraSpec(..., region=(top, left, "
                    "bottom, right)) as fractions or a mask image, or name it with option background="
                )
        if all(lora.adapter == background for lora in loras):
            raise InvalidOptionError("composer needs at least one LoRA with a region")
        super().check(pipe, prompt, loras)

    def needs_trigger(self, lora):
        """A region LoRA's trigger spells its regional prompt's tokens; the background may have none."""
        return lora.adapter != self.options.background

    def trigger_prompt(self, prompt, lora):
        return prompt if lora.adapter == self.options.background else self._regional_prompt(prompt, lora)

    def check_size(self, pipe, loras, height, width):
        """Every box must cover at least one pixel of the coarsest attention grid."""
        latent_hw = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        coarsest = layer_grid(latent_hw, max(layer.factor for layer in attention_layers(pipe.unet)))
        for lora in loras:
            if lora.adapter != self.options.background:
                check_region_fits(lora.region, *coarsest, f"LoRA '{lora.adapter}'")

    def prepare(self, ctx):
        layers = attention_layers(ctx.unet)
        self._regional = [lora for lora in ctx.loras if lora.adapter != self.options.background]
        background = next((l for l in ctx.loras if l.adapter == self.options.background), None)
        activate(ctx.unet, {background.adapter: background.weight} if background else {})
        self._global = ctx.encode_for(background) if background else ctx.encode(ctx.prompt)
        self._encode_regional_prompts(ctx)
        self.state = RegionState([lora.adapter for lora in self._regional], self._contexts)
        self._install_processors(ctx, layers)
        self._hooks = self._gate_other_layers(ctx, layers) if self.options.all_layers else []

        factor = map_factor(ctx.unet, ctx.latent_hw, self.options.map_factor)
        self._map_cross = layers_near_factor(ctx.unet, factor, cross=True)
        self._map_self = layers_near_factor(ctx.unet, factor, cross=False)
        self._map_hw = layer_grid(ctx.latent_hw, factor)
        self._guidance_steps = step_index(self.options.guidance_steps, len(ctx.timesteps))
        self._map_masks = [region_mask(lora.region, *self._map_hw).to(ctx.unet.device) for lora in self._regional]
        options = self.options
        self._guiding = options.guidance and any((options.fg_weight, options.fill_weight, options.reg_weight))
        self._previous_loss = None
        ctx.outputs["composer_losses"] = []

    def _gate_other_layers(self, ctx, layers):
        """Hooks adding each region LoRA's change outside cross-attention, inside its region (overlaps shared)."""
        masks = torch.stack([region_mask(lora.region, *ctx.latent_hw) for lora in self._regional]).to(ctx.unet.device)
        masks = (masks / masks.sum(dim=0).clamp(min=1))[:, None]
        cross = {
            f"{layer.name.removesuffix('.processor')}.{projection}"
            for layer in layers if layer.cross for projection in ("to_q", "to_k", "to_v", "to_out.0")
        }  # fmt: skip
        gates = RegionGates(ctx.unet, ctx.latent_hw, masks.to(ctx.unet.dtype))
        return add_gated_changes(ctx.unet, [lora.adapter for lora in self._regional], gates, skip=cross)

    def release(self, ctx):
        for hook in getattr(self, "_hooks", []):
            hook.remove()
        self._hooks = []

    def _encode_regional_prompts(self, ctx):
        """Once per call: each region's (CFG and conditional) embeddings and its concept token positions."""
        self._contexts, self._cond_contexts, self._tokens = [], [], []
        for lora in self._regional:
            prompt = self._regional_prompt(ctx.prompt, lora)
            adapters = {lora.adapter: lora.weight} if lora.has_text_encoder else {}
            negative, embeds = ctx.encode(prompt, adapters, negative_prompt=lora.spec.negative_prompt)
            self._contexts.append(torch.cat([negative, embeds]) if ctx.do_cfg else embeds)
            self._cond_contexts.append(embeds)
            words = [lora.trigger] + ([lora.concept] if lora.concept else [])
            self._tokens.append(sorted({p for w in words for p in token_positions(ctx.pipe.tokenizer, prompt, w)}))

    def _install_processors(self, ctx, layers):
        """Injection in every cross-attention layer, isolation in every self-attention layer.

        Masks are built once per layer resolution and shared by the layers of that resolution.
        """
        regions = [lora.region for lora in self._regional]
        masks = {}
        for factor in {layer.factor for layer in layers}:
            grid = layer_grid(ctx.latent_hw, factor)
            masks[factor] = torch.stack([region_mask(r, *grid).flatten() > 0 for r in regions]).to(ctx.unet.device)
        allowed = {factor: isolation_mask(m) if self.options.isolation else None for factor, m in masks.items()}
        processors = {
            layer.name: RegionCrossAttnProcessor(self.state, masks[layer.factor], layer.name)
            if layer.cross
            else RegionIsolationAttnProcessor(allowed[layer.factor], self.state, layer.name)
            for layer in layers
        }
        install_processors(ctx.unet, processors)

    def noise_prediction(self, ctx, latents, t, i):
        if i == 0 and self.options.reinit:
            latents = self.reinitialize(ctx, latents, t)
        if self._guiding and i < self._guidance_steps:
            latents = self.guided_update(ctx, latents, t, i)
        self.state.contexts = self._contexts
        negative, embeds = self._global
        [(uncond, cond)] = ctx.predict(latents, t, [Pass(None, negative, embeds)])
        return ctx.guide(uncond, cond), latents

    def reinitialize(self, ctx, latents, t):
        """One conditional forward; each region gets the noise patch its concept tokens already favour."""
        recorder = self._record(ctx, latents, t, keep_grad=False)
        scores = [
            F.interpolate(maps.sum(dim=1, keepdim=True), size=ctx.latent_hw, mode="bilinear")[:, 0]
            for maps in self._token_maps(recorder)
        ]
        masks = [region_mask(lora.region, *ctx.latent_hw).to(latents.device) for lora in self._regional]
        return reinitialize_latents(latents, scores, masks)

    def guided_update(self, ctx, latents, t, i):
        """One gradient step of the region losses on the latent; autograd only here, w.r.t. the latent only."""
        options = self.options
        value, grad = ctx.latent_gradient(latents, lambda z: self.loss(ctx, z, t))
        s = torch.linspace(1.0, 0.5, len(ctx.timesteps))[i].item()
        latents = latents - options.step_size * math.sqrt(s) * grad
        ctx.outputs["composer_losses"].append(value)
        self._guiding = guidance_continues(i, value, self._previous_loss, options.patience)
        self._previous_loss = value
        return latents

    def loss(self, ctx, latents, t):
        """The region loss L of the latents at timestep t (differentiable when autograd is on)."""
        options = self.options
        recorder = self._record(ctx, latents, t, keep_grad=torch.is_grad_enabled(), self_maps=options.reg_weight > 0)
        return composer_loss(
            self._token_maps(recorder),
            recorder.self_maps.mean() if options.reg_weight else None,
            self._map_masks,
            options.fg_weight,
            options.fill_weight,
            options.reg_weight,
            blur=smoothing_for(self._map_hw),
        )

    def _record(self, ctx, latents, t, keep_grad, self_maps=False):
        """Conditional forward with the regional processors recording maps, cut after the last map read."""
        self.state.contexts = self._cond_contexts
        recorder = MapRecorder(len(self._regional), self._map_cross, self._map_self if self_maps else (), keep_grad)
        self.state.recorder = recorder
        negative, embeds = self._global
        try:
            ctx.predict(latents, t, [Pass(None, negative, embeds)], cond_only=True, stop_after=recorder.layers)
        finally:
            self.state.recorder = None
        return recorder

    def _token_maps(self, recorder):
        """Per region, (batch, concept tokens, h, w) regional cross-attention, layers and heads averaged."""
        return [
            store.mean()[:, :, tokens].transpose(1, 2).reshape(-1, len(tokens), *self._map_hw)
            for store, tokens in zip(recorder.cross, self._tokens)
        ]

    def _regional_prompt(self, prompt, lora):
        return lora.spec.prompt or default_regional_prompt(prompt, lora.trigger, lora.concept)
