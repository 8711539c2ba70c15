"""What a method sees of the denoising call: prompts, LoRAs, guidance, and the shared UNet helpers.

SD 1.x/2.x and SDXL look the same to a method: `encode` returns (negative, positive) hidden states
either way, and `forward`/`predict` add SDXL's pooled text embeddings and time ids for exactly the
prompts whose hidden states they are given.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping, Sequence

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from .adapters import BASE, activate, per_sample_adapters
from .attention import truncation
from .deep_cache import shallow_forward
from .spec import ResolvedLora


def text_encoders(pipe) -> list:
    """The pipeline's text encoders: one for SD 1.x/2.x, two for SDXL."""
    return [model for model in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if model]


def uses_text_time(unet) -> bool:
    """SDXL-style UNets condition on the pooled text embedding and the size/crop time ids too."""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


CALL_NEGATIVE = object()  # DenoiseContext.encode: "the negative prompt of the call"


@dataclass(frozen=True)
class Pass:
    """One CFG pass of the UNet: which adapter (None = whatever is active, BASE = none) on which embeddings."""

    adapter: str | None
    negative_embeds: torch.Tensor
    embeds: torch.Tensor


@dataclass
class DenoiseContext:
    pipe: Any
    prompt: str
    negative_prompt: str | None  # None: the pipeline's own default (SD: "", SDXL: zeros when configured so)
    loras: list[ResolvedLora]
    guidance_scale: float
    guidance_rescale: float
    height: int
    width: int
    num_images: int
    clip_skip: int | None
    cross_attention_kwargs: dict | None
    generator: Any = None
    size_conditions: dict[str, Any] = field(default_factory=dict)  # SDXL: original_size, target_size, ... (pixels)
    timesteps: torch.Tensor | None = None
    unet_calls: int = 0
    unet_passes: int = 0
    outputs: dict[str, Any] = field(default_factory=dict)
    _embeds: dict = field(default_factory=dict)
    _pooled: dict = field(default_factory=dict)  # id(hidden states) -> (pooled embeds, negative?) on SDXL
    _time_ids: tuple | None = None

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def latent_hw(self) -> tuple[int, int]:
        factor = self.pipe.vae_scale_factor
        return self.height // factor, self.width // factor

    @property
    def weights(self) -> dict[str, float]:
        return {lora.adapter: lora.weight for lora in self.loras}

    def encode(self, prompt: str, adapters: Mapping[str, float] | None = None, negative_prompt: Any = CALL_NEGATIVE):
        """(negative, positive) embeddings with exactly these text-encoder adapters active; cached per call.

        negative_prompt: by default the call's; None for none at all (SD: "", SDXL: zeros when configured so).
        """
        adapters = dict(adapters or {})
        negative_prompt = self.negative_prompt if negative_prompt is CALL_NEGATIVE else negative_prompt
        key = (prompt, negative_prompt, tuple(sorted(adapters.items())))
        if key not in self._embeds:
            for encoder in text_encoders(self.pipe):
                activate(encoder, adapters)
            if uses_text_time(self.unet):
                embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
                    prompt=prompt,
                    device=self.pipe._execution_device,
                    num_images_per_prompt=self.num_images,
                    do_classifier_free_guidance=True,
                    negative_prompt=negative_prompt,
                    clip_skip=self.clip_skip,
                )
                # the cache below keeps both tensors alive, so their ids stay theirs for the whole call
                self._pooled[id(negative)] = (negative_pooled, True)
                self._pooled[id(embeds)] = (pooled, False)
            else:
                embeds, negative = self.pipe.encode_prompt(
                    prompt,
                    self.pipe._execution_device,
                    self.num_images,
                    True,
                    negative_prompt,
                    clip_skip=self.clip_skip,
                )
            self._embeds[key] = (negative, embeds)
        return self._embeds[key]

    def encode_for(self, lora: ResolvedLora, prompt: str | None = None):
        """Embeddings of a prompt with only this LoRA's text-encoder part (if any) active."""
        adapters = {lora.adapter: lora.weight} if lora.has_text_encoder else {}
        return self.encode(self.prompt if prompt is None else prompt, adapters)

    def predict(
        self,
        latents: torch.Tensor,
        t,
        passes: Sequence[Pass],
        *,
        cond_only: bool = False,
        stop_after: Collection[str] = (),
        deep_features: Sequence[torch.Tensor] | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """(uncond, cond) noise predictions of several passes on the same latents, as ONE batched forward.

        Passes naming adapters run with per-sample adapters; passes with adapter None use whatever
        adapters are active. Without CFG, or with `cond_only` (a loss reads only the conditional
        half's maps), the uncond prediction equals the cond one. `stop_after`: attention layers after
        which the forward ends, returning None (the caller wanted their maps). `deep_features`: one
        per pass (its CFG halves stacked) for DeepCache's shallow pass (compose.deep_cache), which is
        not counted as a UNet call. Gradients reach `latents` when autograd is on (`latent_gradient`).
        """
        halves = 2 if self.do_cfg and not cond_only else 1
        model_input = self.pipe.scheduler.scale_model_input(latents, t)
        model_input = model_input.repeat(halves * len(passes), 1, 1, 1)
        embeds = []
        for p in passes:
            embeds += [p.negative_embeds, p.embeds] if halves == 2 else [p.embeds]
        names = [p.adapter for p in passes]
        if deep_features is None:
            self.unet_calls += 1
            self.unet_passes += len(passes)
        deep = None if deep_features is None else torch.cat(list(deep_features))
        with ExitStack() as stack:
            if any(name is not None for name in names):
                if any(name is None for name in names):
                    raise ValueError("a batched call mixes explicit adapters with 'whatever is active'")
                batch = latents.shape[0]
                stack.enter_context(per_sample_adapters(self.unet, [n for n in names for _ in range(halves * batch)]))
            stack.enter_context(truncation.stop_after(self.unet, stop_after))
            try:
                eps = self.forward(model_input, t, embeds, deep)
            except truncation.ForwardTruncated:
                return None
        chunks = eps.chunk(halves * len(passes))
        if halves == 2:
            return [(chunks[2 * k], chunks[2 * k + 1]) for k in range(len(passes))]
        return [(chunk, chunk) for chunk in chunks]

    @staticmethod
    def latent_gradient(latents: torch.Tensor, loss_of) -> tuple[float, torch.Tensor]:
        """(loss, d loss / d latents) of `loss_of(latents)`: autograd is on for this one evaluation only."""
        with torch.enable_grad():
            leaf = latents.detach().requires_grad_(True)
            loss = loss_of(leaf)
            (grad,) = torch.autograd.grad(loss, leaf)
        return float(loss), grad

    def forward(
        self, sample: torch.Tensor, t, hidden_states: Sequence[torch.Tensor], deep_feature: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The UNet on `sample` with these encoded prompts stacked along the batch (and their added conditions);
        given a deep feature, only its outermost blocks (`compose.deep_cache.shallow_forward`)."""
        if deep_feature is not None:
            return shallow_forward(
                self.unet, sample, t, torch.cat(list(hidden_states)), deep_feature, self.cross_attention_kwargs,
                self.added_conditions(hidden_states),
            )  # fmt: skip
        return self.unet(
            sample,
            t,
            encoder_hidden_states=torch.cat(list(hidden_states)),
            cross_attention_kwargs=self.cross_attention_kwargs,
            added_cond_kwargs=self.added_conditions(hidden_states),
            return_dict=False,
        )[0]

    def added_conditions(self, hidden_states: Sequence[torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """SDXL's `added_cond_kwargs` for a batch made of these prompts' hidden states (None on SD 1.x/2.x).

        Each prompt brings its own pooled embedding; negative prompts get the negative time ids.
        """
        if not uses_text_time(self.unet):
            return None
        negative_ids, positive_ids = self.time_ids()
        pooled, time_ids = [], []
        for states in hidden_states:
            if id(states) not in self._pooled:
                raise ValueError("on SDXL, encode every prompt with DenoiseContext.encode: it keeps the pooled embeds")
            embeds, negative = self._pooled[id(states)]
            pooled.append(embeds)
            time_ids.append((negative_ids if negative else positive_ids).repeat(states.shape[0], 1))
        return {"text_embeds": torch.cat(pooled), "time_ids": torch.cat(time_ids)}

    def time_ids(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(negative, positive) SDXL time ids: original size, crop corner, target size (defaults: the image size)."""
        if self._time_ids is None:
            given = self.size_conditions
            positive = self._size_ids(
                given.get("original_size"), given.get("crops_coords_top_left"), given.get("target_size")
            )
            negative = positive
            if given.get("negative_original_size") and given.get("negative_target_size"):
                negative = self._size_ids(
                    given["negative_original_size"],
                    given.get("negative_crops_coords_top_left"),
                    given["negative_target_size"],
                )
            self._time_ids = (negative, positive)
        return self._time_ids

    def _size_ids(self, original, crop, target) -> torch.Tensor:
        size, encoder = (self.height, self.width), self.pipe.text_encoder_2
        ids = self.pipe._get_add_time_ids(
            tuple(original or size), tuple(crop or (0, 0)), tuple(target or size),
            dtype=encoder.dtype, text_encoder_projection_dim=encoder.config.projection_dim,
        )  # fmt: skip
        return ids.to(self.pipe._execution_device)

    def guide(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Classifier-free guidance (and guidance rescale), as StableDiffusionPipeline does it."""
        if not self.do_cfg:
            return cond
        eps = uncond + self.guidance_scale * (cond - uncond)
        if self.guidance_rescale > 0.0:
            eps = rescale_noise_cfg(eps, cond, guidance_rescale=self.guidance_rescale)
        return eps

    def base_pass(self) -> Pass:
        """The base model (no adapter) on the global prompt."""
        negative, embeds = self.encode(self.prompt)
        return Pass(BASE, negative, embeds)

    def lora_pass(self, lora: ResolvedLora, prompt: str | None = None) -> Pass:
        """One LoRA alone, on its own text-encoder embeddings."""
        negative, embeds = self.encode_for(lora, prompt)
        return Pass(lora.adapter, negative, embeds)
