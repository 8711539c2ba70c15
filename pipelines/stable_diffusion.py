"""MultiLoraStableDiffusionPipeline: StableDiffusionPipeline plus `loras=` and `method=`."""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import StableDiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from .composition import MultiLoraPipelineMixin, MultiLoraPipelineOutput

__all__ = ["MultiLoraPipelineOutput", "MultiLoraStableDiffusionPipeline"]


class MultiLoraStableDiffusionPipeline(MultiLoraPipelineMixin, StableDiffusionPipeline):
    """Drop-in StableDiffusionPipeline that composes several LoRAs with a chosen method.

    With ``loras=None`` a call is exactly StableDiffusionPipeline's. After every call (also one
    that raises) the attention processors and the adapters' state are as they were before.
    """

    _composition_arguments = (
        "prompt height width num_inference_steps timesteps sigmas guidance_scale negative_prompt num_images_per_prompt "
        "eta generator latents prompt_embeds negative_prompt_embeds ip_adapter_image ip_adapter_image_embeds "
        "output_type return_dict cross_attention_kwargs guidance_rescale clip_skip callback_on_step_end "
        "callback_on_step_end_tensor_inputs"
    ).split()
    _refused_with_loras = ("prompt_embeds", "negative_prompt_embeds", "ip_adapter_image", "ip_adapter_image_embeds")

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
        return self._compose(parent_kwargs, loras, method, method_options)

    def _check_model_inputs(self, prompt, negative_prompt, height, width, tensor_inputs) -> None:
        self.check_inputs(prompt, height, width, None, negative_prompt, None, None, None, None, tensor_inputs)

    def _callback_tensors(self, ctx, negative, embeds) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}

    def _decode_composed(self, latents, output_type, generator, dtype):
        """(images, NSFW flags) as StableDiffusionPipeline decodes them."""
        if output_type == "latent":
            return latents, None
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        image, has_nsfw = self.run_safety_checker(image, self._execution_device, dtype)
        denormalize = [True] * image.shape[0] if has_nsfw is None else [not flag for flag in has_nsfw]
        return self.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize), has_nsfw

