"""MultiLoraStableDiffusionPipeline: StableDiffusionPipeline plus `loras=` and `method=`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers import StableDiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput

from compose.adapters import activate, restore, snapshot
from compose.context import DenoiseContext
from compose.errors import UnsupportedArgumentError
from compose.loading import load_adapters, resolve_loras
from compose.methods import build_method


@dataclass
class MultiLoraPipelineOutput(StableDiffusionPipelineOutput):
    """Images plus what the method did: UNet forwards, LoRA passes, and method extras (masks, maps)."""

    method: str | None = None
    unet_calls: int = 0
    unet_passes: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


class MultiLoraStableDiffusionPipeline(StableDiffusionPipeline):
    """Drop-in StableDiffusionPipeline that composes several LoRAs with a chosen method.

    With ``loras=None`` a call is exactly StableDiffusionPipeline's. After every call (also one
    that raises) the attention processors and the adapters' state are as they were before.
    """

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds=None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        loras: list | None = None,
        method: str = "merge",
        method_options: Any = None,
        **kwargs,
    ):
        parent_kwargs = dict(
            prompt=prompt, height=height, width=width, num_inference_steps=num_inference_steps,
            timesteps=timesteps, sigmas=sigmas, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=latents,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
            output_type=output_type, return_dict=return_dict, cross_attention_kwargs=cross_attention_kwargs,
            guidance_rescale=guidance_rescale, clip_skip=clip_skip, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, **kwargs,
        )  # fmt: skip
        if loras is None:
            return super().__call__(**parent_kwargs)

        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        self._check_composition_inputs(parent_kwargs)
        self.check_inputs(
            prompt, height, width, None, negative_prompt, None, None, None, None, callback_on_step_end_tensor_inputs
        )
        composer = build_method(method, method_options)
        resolved = resolve_loras(self, loras)
        composer.check(self, prompt, resolved)

        models = (self.unet, self.text_encoder)
        processors = dict(self.unet.attn_processors)
        adapter_state = snapshot(models)
        ctx = DenoiseContext(
            pipe=self,
            prompt=prompt,
            negative_prompt=negative_prompt or "",
            loras=resolved,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            height=height,
            width=width,
            num_images=num_images_per_prompt or 1,
            clip_skip=clip_skip,
            cross_attention_kwargs=cross_attention_kwargs,
            generator=generator,
        )
        prepared = False
        try:
            load_adapters(self, resolved)
            activate(self.unet, ctx.weights)
            ctx.timesteps, num_inference_steps = retrieve_timesteps(
                self.scheduler, num_inference_steps, self._execution_device, timesteps, sigmas
            )
            negative, embeds = ctx.encode(prompt)
            latents = self.prepare_latents(
                ctx.num_images, self.unet.config.in_channels, height, width, embeds.dtype,
                self._execution_device, generator, latents,
            )  # fmt: skip
            extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
            prepared = True
            ctx.outputs.update(loras=resolved, options=dataclasses.asdict(composer.options))
            composer.prepare(ctx)
            self._num_timesteps = len(ctx.timesteps)
            with self.progress_bar(total=len(ctx.timesteps)) as progress_bar:
                for i, t in enumerate(ctx.timesteps):
                    noise_pred, latents = composer.noise_prediction(ctx, latents, t, i)
                    latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                    if callback_on_step_end is not None:
                        names = callback_on_step_end_tensor_inputs
                        values = {"latents": latents, "prompt_embeds": embeds, "negative_prompt_embeds": negative}
                        outputs = callback_on_step_end(self, i, t, {k: values[k] for k in names})
                        latents = outputs.pop("latents", latents)
                    progress_bar.update()
        finally:
            if prepared:
                composer.release(ctx)
            self.unet.set_attn_processor(processors)
            restore(models, adapter_state)

        if output_type == "latent":
            image, has_nsfw = latents, None
        else:
            image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
            image, has_nsfw = self.run_safety_checker(image, self._execution_device, embeds.dtype)
        denormalize = [True] * image.shape[0] if has_nsfw is None else [not flag for flag in has_nsfw]
        if output_type != "latent":
            image = self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
        self.maybe_free_model_hooks()
        if not return_dict:
            return image, has_nsfw
        return MultiLoraPipelineOutput(
            images=image,
            nsfw_content_detected=has_nsfw,
            method=composer.name,
            unet_calls=ctx.unet_calls,
            unet_passes=ctx.unet_passes,
            extras=ctx.outputs,
        )

    def _check_composition_inputs(self, kwargs: dict[str, Any]) -> None:
        """Arguments that composition cannot honour fail here, naming the argument and the fix."""
        if not isinstance(kwargs["prompt"], str) or not kwargs["prompt"].strip():
            raise UnsupportedArgumentError(
                "composition needs `prompt` as one non-empty string (methods find trigger words in it); "
                "call the pipeline once per prompt"
            )
        if kwargs["negative_prompt"] is not None and not isinstance(kwargs["negative_prompt"], str):
            raise UnsupportedArgumentError("composition takes `negative_prompt` as one string")
        for name in ("prompt_embeds", "negative_prompt_embeds", "ip_adapter_image", "ip_adapter_image_embeds"):
            if kwargs[name] is not None:
                raise UnsupportedArgumentError(
                    f"`{name}` cannot be combined with `loras=`; pass the prompt text (and no IP-Adapter input) instead"
                )
        if (kwargs["cross_attention_kwargs"] or {}).get("scale") is not None:
            raise UnsupportedArgumentError(
                "cross_attention_kwargs['scale'] does not apply to composition; give each LoRA its weight instead"
            )
        if self.unet.config.time_cond_proj_dim is not None:
            raise UnsupportedArgumentError("guidance-distilled UNets (time_cond_proj_dim) are not supported with `loras=`")
        unknown = sorted(set(kwargs) - set(_SUPPORTED))
        if unknown:
            raise UnsupportedArgumentError(f"unexpected keyword argument(s) {unknown} with `loras=`")


_SUPPORTED = (
    "prompt height width num_inference_steps timesteps sigmas guidance_scale negative_prompt num_images_per_prompt "
    "eta generator latents prompt_embeds negative_prompt_embeds ip_adapter_image ip_adapter_image_embeds output_type "
    "return_dict cross_attention_kwargs guidance_rescale clip_skip callback_on_step_end "
    "callback_on_step_end_tensor_inputs"
).split()
