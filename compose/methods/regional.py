"""regional: latent couple / MultiDiffusion — each LoRA's guided prediction pasted inside its own region.

The baseline Regional Prompter's latent mode and ComfyUI's latent couple give: every step, each LoRA
alone on its region's prompt (its `LoraSpec.prompt`, else the global one) and the base model on the
global prompt run as one batched forward with per-sample adapters; inside region i the image takes
LoRA i's prediction, outside every region the base's. Where regions overlap, the covering LoRAs are
averaged (each weight divided by the coverage), so the weights sum to 1 at every pixel. Without a
pixel left to the base (and no `base_ratio`), the base pass is not run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InvalidRegionError
from ..masks import fuse_noise_predictions
from ..region_guidance import gaussian_smooth
from ..regions import check_region_fits, region_mask
from .base import CompositionMethod, is_whole, require
from .composite import pass_predictions


@dataclass
class RegionalOptions:
    feather: int = 0  # latent pixels over which each region's edge fades (0: hard edges)
    base_ratio: float = 0.0  # share of the base prediction inside every region (Regional Prompter's base ratio)
    batched: bool = True  # one forward with per-sample adapters; False runs the passes one by one

    def __post_init__(self):
        require(is_whole(self.feather, 0), f"regional option feather must be a whole number >= 0, got {self.feather!r}")
        require(
            isinstance(self.base_ratio, (int, float))
            and not isinstance(self.base_ratio, bool)
            and math.isfinite(self.base_ratio)
            and 0.0 <= self.base_ratio <= 1.0,
            f"regional option base_ratio must be a number in [0, 1], got {self.base_ratio!r}",
        )
        require(isinstance(self.batched, bool), f"regional option batched must be true or false, got {self.batched!r}")


def feathered(mask: torch.Tensor, feather: int) -> torch.Tensor:
    """The mask with its edge blurred over about `feather` pixels (a Gaussian of sigma feather / 2)."""
    return mask if feather == 0 else gaussian_smooth(mask, 2 * feather + 1, feather / 2)


def paste_weights(masks: torch.Tensor, base_ratio: float = 0.0) -> torch.Tensor:
    """(N + 1, h, w) weights of [base, LoRA 1..N] from N region masks in [0, 1]; they sum to 1 at every pixel.

    Coverage c = sum of the masks: where c >= 1 the covering LoRAs share the pixel in proportion to their
    masks, where c < 1 the base takes the rest. base_ratio moves that share of every LoRA's weight to the base.
    """
    coverage = masks.sum(dim=0)
    loras = masks / coverage.clamp(min=1.0)
    base = 1.0 - loras.sum(dim=0)
    return torch.cat([(base + base_ratio * loras.sum(dim=0))[None], (1.0 - base_ratio) * loras])


class RegionalMethod(CompositionMethod):
    name = "regional"
    options_class = RegionalOptions

    def check(self, pipe, prompt, loras):
        for lora in loras:
            if lora.region is None:
                raise InvalidRegionError(
                    f"regional needs a region for LoRA '{lora.adapter}': pass LoraSpec(..., region=(top, left, "
                    "bottom, right)) as fractions, or a mask image; (0, 0, 1, 1) is the whole image"
                )
        super().check(pipe, prompt, loras)

    def trigger_prompt(self, prompt, lora):
        return lora.spec.prompt or prompt

    def check_size(self, pipe, loras, height, width):
        """Every region must cover at least one latent pixel, where the predictions are pasted."""
        latent_hw = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        for lora in loras:
            check_region_fits(lora.region, *latent_hw, f"LoRA '{lora.adapter}'")

    def prepare(self, ctx):
        feather = self.options.feather
        masks = torch.stack([feathered(region_mask(lora.region, *ctx.latent_hw), feather) for lora in ctx.loras])
        weights = paste_weights(masks, self.options.base_ratio)
        self.passes = [ctx.lora_pass(lora, lora.spec.prompt) for lora in ctx.loras]
        if bool(weights[0].any()):
            self.passes.insert(0, ctx.base_pass())
        else:
            weights = weights[1:]
        self.weights = weights.to(ctx.unet.device)
        ctx.outputs["masks"] = self.weights

    def noise_prediction(self, ctx, latents, t, i):
        pairs = pass_predictions(ctx, latents, t, self.passes, self.options.batched)
        guided = torch.stack([ctx.guide(uncond, cond) for uncond, cond in pairs])
        weights = self.weights[:, None].expand(-1, latents.shape[0], -1, -1)
        return fuse_noise_predictions(guided, weights), latents
