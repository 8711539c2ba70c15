"""What a method sees of the denoising call: prompts, LoRAs, guidance, and the shared UNet helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from .adapters import BASE, activate, per_sample_adapters
from .spec import ResolvedLora


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
    negative_prompt: str
    loras: list[ResolvedLora]
    guidance_scale: float
    guidance_rescale: float
    height: int
    width: int
    num_images: int
    clip_skip: int | None
    cross_attention_kwargs: dict | None
    generator: Any = None
    timesteps: torch.Tensor | None = None
    unet_calls: int = 0
    unet_passes: int = 0
    outputs: dict[str, Any] = field(default_factory=dict)
    _embeds: dict = field(default_factory=dict)

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

    def encode(self, prompt: str, adapters: Mapping[str, float] | None = None, negative_prompt: str | None = None):
        """(negative, positive) embeddings with exactly these text-encoder adapters active; cached per call."""
        adapters = dict(adapters or {})
        negative_prompt = self.negative_prompt if negative_prompt is None else negative_prompt
        key = (prompt, negative_prompt, tuple(sorted(adapters.items())))
        if key not in self._embeds:
            activate(self.pipe.text_encoder, adapters)
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

    def predict(self, latents: torch.Tensor, t, passes: Sequence[Pass]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(uncond, cond) noise predictions of several passes on the same latents, as ONE batched forward.

        Passes naming adapters run with per-sample adapters; passes with adapter None use whatever
        adapters are active. Without CFG the uncond prediction equals the cond one.
        """
        halves = 2 if self.do_cfg else 1
        model_input = self.pipe.scheduler.scale_model_input(latents, t)
        model_input = model_input.repeat(halves * len(passes), 1, 1, 1)
        embeds = []
        for p in passes:
            embeds += [p.negative_embeds, p.embeds] if self.do_cfg else [p.embeds]
        names = [p.adapter for p in passes]
        self.unet_calls += 1
        self.unet_passes += len(passes)
        forward = lambda: self.unet(  # noqa: E731
            model_input,
            t,
            encoder_hidden_states=torch.cat(embeds),
            cross_attention_kwargs=self.cross_attention_kwargs,
            return_dict=False,
        )[0]
        if all(name is None for name in names):
            eps = forward()
        else:
            if any(name is None for name in names):
                raise ValueError("a batched call mixes explicit adapters with 'whatever is active'")
            batch = latents.shape[0]
            per_sample = [name for name in names for _ in range(halves * batch)]
            with per_sample_adapters(self.unet, per_sample):
                eps = forward()
        chunks = eps.chunk(halves * len(passes))
        if self.do_cfg:
            return [(chunks[2 * k], chunks[2 * k + 1]) for k in range(len(passes))]
        return [(chunk, chunk) for chunk in chunks]

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
