"""clora: CLoRA (Meral et al., 2024): per-LoRA passes, contrastive latent updates, mask-fused predictions.

Every step runs the base model and each concept LoRA on its own prompt as one batched forward,
reads their cross-attention maps (1/32 of the image on SD 1.5: `map_factor`), and (early on) nudges the latent so that
the maps of different concepts separate. Each LoRA's prediction then only counts where its own
concept attends; the base model fills the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adapters import BASE, tuner_layers
from ..attention.capture import AttentionStore, CaptureAttnProcessor
from ..attention.layers import install_processors, layer_grid, layers_near_factor, map_factor
from ..concept_prompts import Concept, ConceptError, MissingConceptError, concept_prompts, infer_concept
from ..context import Pass
from ..contrastive import concept_token_loss, loss_bounds, sample_labels, separation
from ..errors import InvalidOptionError
from ..lora_delta import holds, lora_delta
from ..masks import MORPHOLOGY, attention_masks, fuse_noise_predictions
from .base import STEP, CompositionMethod, is_step, is_whole, require, step_index

# The gradient RMS the paper's step size meets on SD 1.5 at 512 px (64x64 latent, 16x16 maps), taken as
# the one that makes its step 20 move a unit-RMS latent by 1% per update. An estimate, the constant to
# correct once measured on SD 1.5: on the toy model (8x8 maps, low contrast) the gradient is ~10x larger
# and step 20 moves the latent by 8-11% per update.
PAPER_GRADIENT_RMS = 5e-4


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square of each image of a batch, shaped to broadcast over it."""
    return x.pow(2).mean(dim=tuple(range(1, x.ndim)), keepdim=True).sqrt()


def latent_step(latents: torch.Tensor, grad: torch.Tensor, step_size: float, relative: bool = True) -> torch.Tensor:
    """The latents after one descent step on the contrastive loss.

    relative: each image moves along its gradient by step_size * PAPER_GRADIENT_RMS of its own RMS,
    whatever the maps' contrast (the loss reads min-max normalised maps, so its gradient grows as
    1 / (max - min)) and the latent's size; where the gradient has SD 1.5's RMS and the latent unit
    RMS, that is exactly the paper's z - step_size * grad. Not relative: the paper's step as is.
    """
    if not relative:
        return latents - step_size * grad
    direction = grad / _rms(grad).clamp_min(torch.finfo(grad.dtype).tiny)
    return latents - step_size * PAPER_GRADIENT_RMS * _rms(latents) * direction


@dataclass
class CloraOptions:
    step_size: float = 20.0  # latent step per update, in the paper's units (see latent_step)
    max_iter_to_alter: int | float = 0.5  # steps i < this update the latent: a count, or a fraction of the steps
    refinement_steps: tuple[int | float, ...] = (0.0, 0.2, 0.4)  # steps that repeat the update ({0,10,20} of 50)
    refinement_rounds: int = 20  # at most this many updates at a refinement step
    # A speed option: updates stop (rounds end, update steps are skipped) once the last maps' separation
    # reaches this; 0 = all concept maps coincide, 1 = each concept's maps identical and disjoint from the
    # others'. None (default) runs every update of the schedule, as the reference does; on the toy world
    # 0.5 halves the time but draws the sks concept in 0/32 images instead of 11/32.
    target_separation: float | None = None
    # The reference's loss-threshold stop: a refinement step's rounds end (after the first) once the maps'
    # separation reaches this; None runs every round.
    refinement_stop: float | None = None
    tau: float = 0.5  # NT-Xent temperature
    alpha: float = 0.35  # mask threshold, relative to each token map's peak
    morphology: str = "none"  # 3x3 clean-up of each mask: none, dilate, erode, open, close
    apply_mask_after: int | float = 0.1  # before this step the predictions are averaged (all masks on)
    use_uncond_maps: bool = False  # average the unconditional half's maps in, as the reference does
    recompute_after_update: bool = True  # predict on the updated latent (the reference reuses the stale one)
    relative_step: bool = True  # same relative change at any map contrast and size; False: the paper's absolute step
    style_lora: str | None = None  # name of a LoRA added to every pass instead of getting a pass of its own
    style_weight: float | None = None  # its weight; None keeps the LoRA's own weight
    map_factor: int | None = None  # latent downsampling of the maps read; None: chosen by the latent size (map_factor)

    def __post_init__(self):
        if isinstance(self.refinement_steps, list):
            self.refinement_steps = tuple(self.refinement_steps)
        rules = {
            "step_size": (_is_number(self.step_size) and self.step_size >= 0, "a number >= 0"),
            "max_iter_to_alter": (is_step(self.max_iter_to_alter), STEP),
            "refinement_steps": (
                isinstance(self.refinement_steps, tuple) and all(is_step(s) for s in self.refinement_steps),
                f"a list, each {STEP}",
            ),
            "refinement_rounds": (is_whole(self.refinement_rounds, 1), "a whole number >= 1"),
            **{
                name: (value is None or (_is_number(value) and 0 < value <= 1), "a number in (0, 1] or None")
                for name, value in (
                    ("target_separation", self.target_separation),
                    ("refinement_stop", self.refinement_stop),
                )
            },
            "tau": (_is_number(self.tau) and self.tau > 0, "a number > 0"),
            "alpha": (_is_number(self.alpha) and 0 <= self.alpha < 1, "a number in [0, 1)"),
            "morphology": (self.morphology in MORPHOLOGY, f"one of {MORPHOLOGY}"),
            "apply_mask_after": (is_step(self.apply_mask_after), STEP),
            **{
                flag: (isinstance(getattr(self, flag), bool), "true or false")
                for flag in ("relative_step", "use_uncond_maps", "recompute_after_update")
            },
            "style_lora": (self.style_lora is None or isinstance(self.style_lora, str), "the name of one of the LoRAs"),
            "style_weight": (self.style_weight is None or _is_number(self.style_weight), "a number"),
            "map_factor": (self.map_factor is None or is_whole(self.map_factor, 1), "a whole number >= 1 or None"),
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

        factor = map_factor(ctx.unet, ctx.latent_hw, self.options.map_factor)
        self.layers = layers_near_factor(ctx.unet, factor, cross=True)
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
            for round in range(rounds):
                if self._separated(self.options.target_separation) or (
                    round and self._separated(self.options.refinement_stop)
                ):
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

    def _separated(self, target: float | None) -> bool:
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
        return latent_step(latents, grad, self.options.step_size, self.options.relative_step), kept, loss

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
    layers = [layer for layer in tuner_layers(unet) if holds(layer, adapter)]
    for layer in layers:
        layer.set_scale(adapter, weight)  # the loop's snapshot restores the scale afterwards
    add_delta = lambda layer, args, out: out + lora_delta(layer, adapter, args[0])  # noqa: E731
    return [layer.register_forward_hook(add_delta) for layer in layers]
