"""merge: every LoRA active at once with its weight (the loop activates them); one UNet pass per step."""

from __future__ import annotations

from dataclasses import dataclass

from ..context import Pass
from .base import CompositionMethod, require


@dataclass
class MergeOptions:
    fuse: bool = False  # fuse the weighted deltas into the base weights for the call (faster), unfused after

    def __post_init__(self):
        require(isinstance(self.fuse, bool), f"merge option fuse must be true or false, got {self.fuse!r}")


class MergeMethod(CompositionMethod):
    name = "merge"
    options_class = MergeOptions

    def prepare(self, ctx):
        self._embeds = ctx.encode(ctx.prompt, {l.adapter: l.weight for l in ctx.loras if l.has_text_encoder})
        if self.options.fuse:
            ctx.pipe.fuse_lora(components=["unet"], adapter_names=list(ctx.weights))

    def noise_prediction(self, ctx, latents, t, i):
        negative, embeds = self._embeds
        [(uncond, cond)] = ctx.predict(latents, t, [Pass(None, negative, embeds)])
        return ctx.guide(uncond, cond), latents

    def release(self, ctx):
        if self.options.fuse:
            ctx.pipe.unfuse_lora(components=["unet"])
