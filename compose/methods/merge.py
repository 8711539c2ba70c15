"""merge: every LoRA active at once with its weight (the loop activates them); one UNet pass per step."""

from __future__ import annotations

from dataclasses import dataclass

from ..adapters import fuse_active, tuner_layers, unfuse
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
        active = [layer for layer in tuner_layers(ctx.unet) if layer.active_adapters]
        self._fused = fuse_active(active) if self.options.fuse else []

    def noise_prediction(self, ctx, latents, t, i):
        negative, embeds = self._embeds
        [(uncond, cond)] = ctx.predict(latents, t, [Pass(None, negative, embeds)])
        return ctx.guide(uncond, cond), latents

    def release(self, ctx):
        unfuse(self._fused)
