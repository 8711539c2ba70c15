"""MultiLoraStableDiffusionXLPipeline: StableDiffusionXLPipeline plus `loras=` and `method=`."""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from compose.tokens import check_tokenizers_agree

from .composition import MultiLoraPipelineMixin

__all__ = ["MultiLoraStableDiffusionXLPipeline"]


class MultiLoraStableDiffusionXLPipeline(MultiLoraPipelineMixin, StableDiffusionXLPipeline):
    """Drop-in StableDiffusionXLPipeline that composes several LoRAs with a chosen method.

    The same methods, keywords and output as MultiLoraStableDiffusionPipeline. Both text encoders
    read the one prompt (their hidden states are concatenated per token, so a trigger word sits at
    the same positions for both); LoRA text-encoder parts may target either encoder. With
    ``loras=None`` a call is exactly StableDiffusionXLPipeline's.
    """

    _composition_arguments = (
        "prompt prompt_2 height width num_inference_steps timesteps sigmas denoising_end guidance_scale "
        "negative_prompt negative_prompt_2 num_images_per_prompt eta generator latents prompt_embeds "
        "negative_prompt_embeds pooled_prompt_embeds negative_pooled_prompt_embeds ip_adapter_image "
        "ip_adapter_image_embeds output_type return_dict cross_attention_kwargs guidance_rescale original_size "
        "crops_coords_top_left target_size negative_original_size negative_crops_coords_top_left negative_target_size "
        "clip_skip callback_on_step_end callback_on_step_end_tensor_inputs"
    ).split()
    _refused_with_loras = (
        "prompt_2 negative_prompt_2 prompt_embeds negative_prompt_embeds pooled_prompt_embeds "
        "negative_pooled_prompt_embeds ip_adapter_image ip_adapter_image_embeds denoising_end"
    ).split()
    _tuple_has_nsfw_flags = False

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds=None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        loras: list | None = None,
        method: str = "merge",
        method_options: Any = None,
        **kwargs,
    ):
        parent_kwargs = dict(
            prompt=prompt, prompt_2=prompt_2, height=height, width=width, num_inference_steps=num_inference_steps,
            timesteps=timesteps, sigmas=sigmas, denoising_end=denoising_end, guidance_scale=guidance_scale,
            negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            num_images_per_prompt=num_images_per_prompt, eta=eta, generator=generator, latents=latents,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            ip_adapter_image=ip_adapter_image, ip_adapter_image_embeds=ip_adapter_image_embeds,
            output_type=output_type, return_dict=return_dict, cross_attention_kwargs=cross_attention_kwargs,
            guidance_rescale=guidance_rescale, original_size=original_size,
            crops_coords_top_left=crops_coords_top_left, target_size=target_size,
            negative_original_size=negative_original_size,
            negative_crops_coords_top_left=negative_crops_coords_top_left, negative_target_size=negative_target_size,
            clip_skip=clip_skip, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, **kwargs,
        )  # fmt: skip
        if loras is None:
            return super().__call__(**parent_kwargs)
        return self._compose(parent_kwargs, loras, method, method_options)

    def _check_model_inputs(self, prompt, negative_prompt, height, width, tensor_inputs) -> None:
        self.check_inputs(prompt, None, height, width, None, negative_prompt, callback_on_step_end_tensor_inputs=tensor_inputs)
        check_tokenizers_agree([self.tokenizer, self.tokenizer_2], [prompt, negative_prompt or ""])

    def _callback_tensors(self, ctx, negative, embeds) -> dict[str, torch.Tensor]:
        added = ctx.added_conditions([embeds])
        return {"prompt_embeds": embeds, "add_text_embeds": added["text_embeds"], "add_time_ids": added["time_ids"]}

    def _decode_composed(self, latents, output_type, generator, dtype):
        """(images, None) as StableDiffusionXLPipeline decodes them: fp16 VAEs upcast, latent statistics, watermark."""
        if output_type == "latent":
            return latents, None
        vae = self.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast
        if upcast:
            vae.to(torch.float32)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            as_channels = lambda values: torch.tensor(values).view(1, -1, 1, 1).to(latents)  # noqa: E731
            latents = latents * as_channels(std) / vae.config.scaling_factor + as_channels(mean)
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        if upcast:
            vae.to(torch.float16)
        if self.watermark is not None:
            image = self.watermark.apply_watermark(image)
        return self.image_processor.postprocess(image, output_type=output_type), None
