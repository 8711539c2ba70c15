"""composite: average of the per-LoRA CFG predictions; N passes per step, batched into one forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CompositionMethod, require


@dataclass
class CompositeOptions:
    batched: bool = True  # one forward with per-sample adapters; False runs the N passes one by one

    def __post_init__(self):
        require(isinstance(self.batched, bool), f"composite option batched must be true or false, got {self.batched!r}")


def pass_predictions(ctx, latents, t, passes, batched: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(uncond, cond) of each pass: one forward with per-sample adapters, or one forward per pass."""
    if batched:
        return ctx.predict(latents, t, passes)
    return [pair for p in passes for pair in ctx.predict(latents, t, [p])]


def composite_prediction(ctx, latents, t, loras, batched: bool) -> list[torch.Tensor]:
    """Guided prediction of each LoRA alone (shared with methods built on composite)."""
    pairs = pass_predictions(ctx, latents, t, [ctx.lora_pass(lora) for lora in loras], batched)
    return [ctx.guide(uncond, cond) for uncond, cond in pairs]


class CompositeMethod(CompositionMethod):
    name = "composite"
    options_class = CompositeOptions

    def noise_prediction(self, ctx, latents, t, i):
        predictions = composite_prediction(ctx, latents, t, ctx.loras, self.options.batched)
        return torch.stack(predictions).mean(dim=0), latents
