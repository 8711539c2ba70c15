"""The composition loop both drop-in pipelines share (SD 1.x/2.x and SDXL).

Each pipeline keeps its parent's exact `__call__` signature and hands the arguments to
`_compose`; what differs between the model families (input checks, decoding, what a step callback
may read) are a few small methods each pipeline defines.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from compose.adapters import activate, restore, snapshot
from compose.context import DenoiseContext, text_encoders
from compose.errors import InvalidImageArgumentError, UnsupportedArgumentError
from compose.loading import load_adapters, resolve_loras
from compose.methods import build_method


@dataclass
class MultiLoraPipelineOutput(StableDiffusionPipelineOutput):
    """Images plus what the method did: UNet forwards, LoRA passes, and method extras (masks, maps)."""

    method: str | None = None
    unet_calls: int = 0
    unet_passes: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


class MultiLoraPipelineMixin:
    """`_compose`: resolve and check the LoRAs, run the method inside the denoising loop, restore the pipeline.

    A pipeline using it defines `_check_model_inputs`, `_decode_composed` and `_callback_tensors`,
    and lists the keyword arguments composition accepts and those it refuses unless None.
    """

    _composition_arguments: ClassVar[tuple[str, ...]]
    _refused_with_loras: ClassVar[tuple[str, ...]]
    _tuple_has_nsfw_flags: ClassVar[bool] = True  # return_dict=False gives (images, nsfw flags), as the parent does

    def _compose(self, kwargs: dict[str, Any], loras: list, method: str, method_options: Any):
        prompt, negative_prompt = kwargs["prompt"], kwargs["negative_prompt"]
        scheduled = kwargs["timesteps"] is not None or kwargs["sigmas"] is not None  # then the step count is unused
        steps = None if scheduled else kwargs["num_inference_steps"]
        check_image_arguments(self, kwargs["height"], kwargs["width"], steps)
        height = kwargs["height"] or self.unet.config.sample_size * self.vae_scale_factor
        width = kwargs["width"] or self.unet.config.sample_size * self.vae_scale_factor
        generator, output_type = kwargs["generator"], kwargs["output_type"]
        callback, tensor_inputs = kwargs["callback_on_step_end"], kwargs["callback_on_step_end_tensor_inputs"]
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback.tensor_inputs
        self._check_composition_inputs(kwargs)
        self._check_model_inputs(prompt, negative_prompt, height, width, tensor_inputs)
        composer = build_method(method, method_options)
        resolved = resolve_loras(self, loras)
        composer.check(self, prompt, resolved)
        composer.check_size(self, resolved, height, width)

        models = (self.unet, *text_encoders(self))
        processors = dict(self.unet.attn_processors)
        adapter_state = snapshot(models)
        ctx = DenoiseContext(
            pipe=self,
            prompt=prompt,
            negative_prompt=negative_prompt,
            loras=resolved,
            guidance_scale=kwargs["guidance_scale"],
            guidance_rescale=kwargs["guidance_rescale"],
            height=height,
            width=width,
            num_images=kwargs["num_images_per_prompt"] or 1,
            clip_skip=kwargs["clip_skip"],
            cross_attention_kwargs=kwargs["cross_attention_kwargs"],
            generator=generator,
            size_conditions={name: kwargs[name] for name in _SIZE_CONDITIONS if kwargs.get(name) is not None},
        )
        prepared = False
        try:
            load_adapters(self, resolved)
            activate(self.unet, ctx.weights)
            ctx.timesteps, _ = retrieve_timesteps(
                self.scheduler, kwargs["num_inference_steps"], self._execution_device, kwargs["timesteps"],
                kwargs["sigmas"],
            )  # fmt: skip
            negative, embeds = ctx.encode(prompt)
            latents = self.prepare_latents(
                ctx.num_images, self.unet.config.in_channels, height, width, embeds.dtype,
                self._execution_device, generator, kwargs["latents"],
            )  # fmt: skip
            extra_step_kwargs = self.prepare_extra_step_kwargs(generator, kwargs["eta"])
            prepared = True
            ctx.outputs.update(loras=resolved, options=dataclasses.asdict(composer.options))
            composer.prepare(ctx)
            self._num_timesteps = len(ctx.timesteps)
            with self.progress_bar(total=len(ctx.timesteps)) as progress_bar:
                for i, t in enumerate(ctx.timesteps):
                    noise_pred, latents = composer.noise_prediction(ctx, latents, t, i)
                    latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                    if callback is not None:
                        values = {"latents": latents, **self._callback_tensors(ctx, negative, embeds)}
                        outputs = callback(self, i, t, {k: values[k] for k in tensor_inputs})
                        latents = outputs.pop("latents", latents)
                    progress_bar.update()
        finally:
            if prepared:
                composer.release(ctx)
            self.unet.set_attn_processor(processors)
            restore(models, adapter_state)

        image, has_nsfw = self._decode_composed(latents, output_type, generator, embeds.dtype)
        self.maybe_free_model_hooks()
        if not kwargs["return_dict"]:
            return (image, has_nsfw) if self._tuple_has_nsfw_flags else (image,)
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
        for name in self._refused_with_loras:
            if kwargs.get(name) is not None:
                raise UnsupportedArgumentError(
                    f"`{name}` cannot be combined with `loras=`; pass the prompt text (and no IP-Adapter input) instead"
                )
        if (kwargs["cross_attention_kwargs"] or {}).get("scale") is not None:
            raise UnsupportedArgumentError(
                "cross_attention_kwargs['scale'] does not apply to composition; give each LoRA its weight instead"
            )
        if self.unet.config.time_cond_proj_dim is not None:
            raise UnsupportedArgumentError(
                "guidance-distilled UNets (time_cond_proj_dim) are not supported with `loras=`"
            )
        unknown = sorted(set(kwargs) - set(self._composition_arguments))
        if unknown:
            raise UnsupportedArgumentError(f"unexpected keyword argument(s) {unknown} with `loras=`")


def size_multiple(pipe) -> int:
    """Image sides must be multiples of this: diffusers' input check wants 8, the VAE its scale factor
    (anything else is rounded down to whole latent pixels)."""
    return math.lcm(8, pipe.vae_scale_factor)


def check_image_arguments(pipe, height: int | None, width: int | None, steps: int | None) -> None:
    """Sizes and step count before anything runs: 0 steps would save the starting noise as the image."""
    multiple = size_multiple(pipe)
    for name, value in (("height", height), ("width", width)):
        if value is not None and not (isinstance(value, int) and value >= multiple and value % multiple == 0):
            nearest = max(multiple, round(value / multiple) * multiple) if isinstance(value, (int, float)) else multiple
            raise InvalidImageArgumentError(
                f"{name} {value!r} must be a positive multiple of {multiple} pixels, e.g. {nearest} (this model needs it)"
            )
    if steps is not None and not (isinstance(steps, int) and steps >= 1):
        raise InvalidImageArgumentError(f"the number of inference steps must be at least 1, got {steps!r}")


# SDXL's micro-conditioning arguments, handed to DenoiseContext (which turns them into time ids).
_SIZE_CONDITIONS = (
    "original_size crops_coords_top_left target_size negative_original_size negative_crops_coords_top_left "
    "negative_target_size"
).split()
