"""clora: CLoRA (Meral et al., 2024): per-LoRA passes, contrastive latent updates, mask-fused predictions.

Every step runs the base model and each concept LoRA on its own prompt as one batched forward,
reads their cross-attention maps at 1/32 of the image, and (early on) nudges the latent so that
the maps of different concepts separate. Each LoRA's prediction then only counts where its own
concept attends; the base model fills the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adapters import BASE, tuner_layers
from ..attention.capture import AttentionStore, CaptureAttnProcessor
from ..attention.layers import attention_layers, install_processors, layer_grid, layers_near_factor
from ..concept_prompts import Concept, ConceptError, MissingConceptError, concept_prompts, infer_concept
from ..context import Pass
from ..contrastive import concept_token_loss, loss_bounds, sample_labels, separation
from ..errors import InvalidOptionError
from ..lora_delta import lora_delta
from ..masks import MORPHOLOGY, attention_masks, fuse_noise_predictions
from .base import CompositionMethod, require

MAP_FACTOR = 4  # latent downsampling of the maps CLoRA reads: 1/32 of the image (16x16 at 512 px)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_step(value) -> bool:
    """A step given as a count (int >= 0) or as a fraction of the steps (float in [0, 1])."""
    if isinstance(value, bool):
        return False
    return (isinstance(value, int) and value >= 0) or (isinstance(value, float) and 0.0 <= value <= 1.0)


def step_index(value: int | float, steps: int) -> int:
    """A count stays as is; a fraction of `steps` rounds down (0.5 of 50 steps -> 25)."""
    return value if isinstance(value, int) else math.floor(value * steps)


@dataclass
class CloraOptions:
    step_size: float = 20.0  # latent step per update (the paper's value for SD 1.5)
    max_iter_to_alter: int | float = 0.5  # steps i < this update the latent: a count, or a fraction of the steps
    refinement_steps: tuple[int | float, ...] = (0.0, 0.2, 0.4)  # steps that repeat the update ({0,10,20} of 50)
    refinement_rounds: int = 20  # at most this many updates at a refinement step
    # A speed option: updates stop (rounds end, update steps are skipped) once the last maps' separation
    # reaches this; 0 = all concept maps coincide, 1 = each concept's maps identical and disjoint from the
    # others'. None (default) runs every update of the schedule, as the reference does; on the toy world
    # 0.5 halves the time but draws the sks concept in 0/32 images instead of 11/32.
    target_separation: float | None = None
    tau: float = 0.5  # NT-Xent temperature
    alpha: float = 0.35  # mask threshold, relative to each token map's peak
    morphology: str = "none"  # 3x3 clean-up of each mask: none, dilate, erode, open, close
    apply_mask_after: int | float = 0.1  # before this step the predictions are averaged (all masks on)
    use_uncond_maps: bool = False  # average the unconditional half's maps in, as the reference does
    recompute_after_update: bool = True  # predict on the updated latent (the reference reuses the stale one)
    style_lora: str | None = None  # name of a LoRA added to every pass instead of getting a pass of its own
    style_weight: float | None = None  # its weight; None keeps the LoRA's own weight

    def __post_init__(self):
        if isinstance(self.refinement_steps, list):
            self.refinement_steps = tuple(self.refinement_steps)
        step = "a step count (int >= 0) or a fraction of the steps (float in [0, 1])"
        rules = {
            "step_size": (_is_number(self.step_size) and self.step_size >= 0, "a number >= 0"),
            "max_iter_to_alter": (_is_step(self.max_iter_to_alter), step),
            "refinement_steps": (
                isinstance(self.refinement_steps, tuple) and all(_is_step(s) for s in self.refinement_steps),
                f"a list, each {step}",
            ),
            "refinement_rounds": (
                isinstance(self.refinement_rounds, int)
                and not isinstance(self.refinement_rounds, bool)
                and self.refinement_rounds >= 1,
                "a whole number >= 1",
            ),
            "target_separation": (
                self.target_separation is None or (_is_number(self.target_separation) and 0 < self.target_separation <= 1),
                "a number in (0, 1] or None",
            ),
            "tau": (_is_number(self.tau) and self.tau > 0, "a number > 0"),
            "alpha": (_is_number(self.alpha) and 0 <= self.alpha < 1, "a number in [0, 1)"),
            "morphology": (self.morphology in MORPHOLOGY, f"one of {MORPHOLOGY}"),
            "apply_mask_after": (_is_step(self.apply_mask_after), step),
            "use_uncond_maps": (isinstance(self.use_uncond_maps, bool), "true or false"),
            "recompute_after_update": (isinstance(self.recompute_after_update, bool), "true or false"),
            "style_lora": (self.style_lora is None or isinstance(self.style_lora, str), "the name of one of the LoRAs"),
            "style_weight": (self.style_weight is None or _is_number(self.style_weight), "a number"),
        }
        for name, (valid, expected) in rules.items():
            require(valid, f"clora option {name} must be {expected}, got {getattr(self, name)!r}")


class CloraMethod(CompositionMethod):
    name = "clora"
    options_class = CloraOptions

    def check(self, pipe, prompt, loras):
        super().check(pipe, prompt, loras)
        self.style, self.concept_loras = self._split(loras)
        concepts = [self._concept(prompt, lora) for lora in self.concept_loras]
        self.plan = concept_prompts(pipe.tokenizer, prompt, concepts)

    def trigger_prompt(self, prompt, lora):
        """A concept LoRA's derived prompt gets its trigger written in (`derive_prompts`), its own prompt is used
        as given; the style LoRA rides on every pass of the user's prompt."""
        return prompt if lora.adapter == self.options.style_lora else lora.spec.prompt

    def _split(self, loras):
        """(style LoRA or None, concept LoRAs)."""
        names = [lora.adapter for lora in loras]
        if self.options.style_lora is not None and self.options.style_lora not in names:
            raise InvalidOptionError(
                f"clora option style_lora '{self.options.style_lora}' names none of the LoRAs {names}"
            )
        style = next((lora for lora in loras if lora.adapter == self.options.style_lora), None)
        concept_loras = [lora for lora in loras if lora is not style]
        if not concept_loras:
            raise ConceptError("clora needs at least one concept LoRA besides the style LoRA")
        return style, concept_loras

    @staticmethod
    def _concept(prompt, lora) -> Concept:
        word = lora.concept or infer_concept(lora.spec.prompt or prompt, lora.trigger)
        if not word:
            raise MissingConceptError(
                f"clora needs the concept word of LoRA '{lora.adapter}' (the plain class word its trigger stands for, "
                "e.g. 'dog') to find its attention map; pass LoraSpec(..., concept='dog')"
            )
        return Concept(lora.adapter, lora.trigger, word, lora.spec.prompt)

    def prepare(self, ctx):
        style_text, self._hooks = {}, []
        if self.style is not None:
            style_weight = self.style.weight if self.options.style_weight is None else self.options.style_weight
            style_text = {self.style.adapter: style_weight} if self.style.has_text_encoder else {}
            self._hooks = add_adapter_to_every_pass(ctx.unet, self.style.adapter, style_weight)
        self.passes = [Pass(BASE, *ctx.encode(self.plan.prompts[0], style_text))]
        for lora, prompt in zip(self.concept_loras, self.plan.prompts[1:]):
            own_text = {lora.adapter: lora.weight} if lora.has_text_encoder else {}
            self.passes.append(Pass(lora.adapter, *ctx.encode(prompt, own_text | style_text)))

        self.layers = layers_near_factor(ctx.unet, MAP_FACTOR, cross=True)
        factor = next(layer.factor for layer in attention_layers(ctx.unet) if layer.name == self.layers[0])
        self.grid = layer_grid(ctx.latent_hw, factor)
        self.store = AttentionStore()
        install_processors(ctx.unet, {name: CaptureAttnProcessor(self.store, name) for name in self.layers})

        steps = len(ctx.timesteps)
        self.update_until = step_index(self.options.max_iter_to_alter, steps)
        self.refine_at = {step_index(s, steps) for s in self.options.refinement_steps}
        self.mask_from = step_index(self.options.apply_mask_after, steps)
        self.bounds = loss_bounds(sample_labels(self.plan.concept_tokens), self.options.tau)
        self.separation = None  # of the latest maps; None before the first forward
        ctx.outputs.update(
            prompts=list(self.plan.prompts), pass_adapters=[p.adapter for p in self.passes], losses=[], separations=[]
        )

    def noise_prediction(self, ctx, latents, t, i):
        pairs, losses = None, []
        if i < self.update_until and len(self.concept_loras) > 1:
            rounds = self.options.refinement_rounds if i in self.refine_at else 1
            for _ in range(rounds):
                if self._separated():
                    break
                latents, pairs, loss = self._update_latents(ctx, latents, t)
                losses.append(loss)
                self.separation = separation(loss / latents.shape[0], self.bounds)
        if pairs is None:
            pairs = ctx.predict(latents, t, self.passes)
        maps = self._maps(latents.shape[0], 2 if ctx.do_cfg else 1)
        self.separation = self._separation(maps)
        ctx.outputs["separations"].append(self.separation)
        if i >= self.mask_from:
            masks = attention_masks(maps, self.plan.mask_tokens, self.options.alpha, self.options.morphology)
        else:
            masks = torch.ones(maps.shape[:-1], dtype=maps.dtype, device=maps.device)
        uncond = fuse_noise_predictions(torch.stack([u for u, _ in pairs]), masks)
        cond = fuse_noise_predictions(torch.stack([c for _, c in pairs]), masks)
        single = latents.shape[0] == 1  # one image: (K, h, w); several: (images, K, h, w)
        ctx.outputs["masks"] = masks[:, 0] if single else masks.transpose(0, 1)
        ctx.outputs["attention_maps"] = maps[:, 0] if single else maps.transpose(0, 1)
        ctx.outputs["losses"].append(losses)
        return ctx.guide(uncond, cond), latents

    def _separated(self) -> bool:
        target = self.options.target_separation
        return target is not None and self.separation is not None and self.separation >= target

    def _separation(self, maps: torch.Tensor) -> float:
        """Separation of the concept maps (K, images, h, w, T), from the loss averaged over images as in updates."""
        tokens, tau = self.plan.concept_tokens, self.options.tau
        loss = sum(float(concept_token_loss(image_maps, tokens, tau)) for image_maps in maps.unbind(1))
        return separation(loss / maps.shape[1], self.bounds)

    def _update_latents(self, ctx, latents, t):
        """One gradient step on the contrastive loss: (new latents, predictions or None, loss).

        With recompute_after_update the forward only computes what the loss reads (conditional
        half, cut after the map layers); without it, it is the full CFG forward whose (then stale)
        predictions the reference uses, returned here.
        """
        pairs = None

        def loss_of(z):
            nonlocal pairs
            self.store.clear()
            if self.options.recompute_after_update:
                both_halves = self.options.use_uncond_maps and ctx.do_cfg
                ctx.predict(z, t, self.passes, cond_only=not both_halves, stop_after=self.layers)
            else:
                both_halves = ctx.do_cfg
                pairs = ctx.predict(z, t, self.passes)
            maps = self._maps(z.shape[0], 2 if both_halves else 1)
            tokens, tau = self.plan.concept_tokens, self.options.tau
            return sum(concept_token_loss(image_maps, tokens, tau) for image_maps in maps.unbind(1))

        self.store.keep_grad = True
        try:
            loss, grad = ctx.latent_gradient(latents, loss_of)
        finally:
            self.store.keep_grad = False
            self.store.maps = {name: probs.detach() for name, probs in self.store.maps.items()}
        kept = None if pairs is None else [(u.detach(), c.detach()) for u, c in pairs]
        return latents - self.options.step_size * grad, kept, loss

    def _maps(self, images: int, halves: int) -> torch.Tensor:
        """Head- and layer-averaged maps (K, images, h, w, tokens) of the cond half (or both halves)."""
        stored = self.store.mean(self.layers)
        maps = stored.view(len(self.passes), halves, images, *self.grid, stored.shape[-1])
        return maps.mean(dim=1) if self.options.use_uncond_maps else maps[:, -1]

    def release(self, ctx):
        for hook in self._hooks:
            hook.remove()


def add_adapter_to_every_pass(unet, adapter: str, weight: float):
    """Forward hooks adding `adapter`'s delta to every sample, on top of the per-sample adapters.

    peft's mixed batches give each sample one adapter; a style LoRA has to ride along on all of them.
    """
    layers = [layer for layer in tuner_layers(unet) if adapter in getattr(layer, "lora_A", {})]
    for layer in layers:
        layer.set_scale(adapter, weight)  # the loop's snapshot restores the scale afterwards
    add_delta = lambda layer, args, out: out + lora_delta(layer, adapter, args[0])  # noqa: E731
    return [layer.register_forward_hook(add_delta) for layer in layers]
