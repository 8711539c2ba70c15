"""loratorio: LoRAtorio (Foteinopoulou et al., 2025): per-LoRA predictions mixed patch by patch.

Every step runs the base model and each LoRA alone (one batched forward, N+1 passes). Where a
LoRA's conditional prediction turns away from the base model's (low cosine similarity over a
patch), that LoRA knows the patch's content: a SoftMin over the LoRAs' similarities gives each
patch its mix. The unconditional half is mixed with the same weights and pulled back toward the
base model's ("re-centring"). With `top_k`, only the k LoRAs that diverge most in a patch take part.

Patch size, temperature and k are not published: the defaults are provisional, to be chosen by a
sweep on the toy world.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import InvalidOptionError
from .base import CompositionMethod, is_number, is_whole, require
from .composite import pass_predictions


@dataclass
class LoratorioOptions:
    patch_size: int = 2  # latent pixels per patch side; provisional (unpublished), to be chosen by a sweep: 2, 4, 8
    temperature: float = 1.0  # SoftMin temperature; provisional, to be swept; inf weighs the LoRAs alike
    recenter: float = 0.5  # share of the base model's unconditional prediction in the unconditional half
    top_k: int | None = None  # dynamic mode: the k most divergent LoRAs of each patch; provisional; None: static
    batched: bool = True  # one forward with per-sample adapters; False runs the N+1 passes one by one

    def __post_init__(self):
        rules = {
            "patch_size": (is_whole(self.patch_size, 1), "a whole number >= 1"),
            "temperature": (is_number(self.temperature) and self.temperature > 0, "a number > 0 (inf allowed)"),
            "recenter": (is_number(self.recenter) and 0 <= self.recenter <= 1, "a number in [0, 1]"),
            "top_k": (self.top_k is None or is_whole(self.top_k, 1), "a whole number >= 1 or empty"),
            "batched": (isinstance(self.batched, bool), "true or false"),
        }
        for name, (valid, expected) in rules.items():
            require(valid, f"loratorio option {name} must be {expected}, got {getattr(self, name)!r}")


def patch_cosine(a: torch.Tensor, b: torch.Tensor, patch: int, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity of a and b (..., C, h, w) over each non-overlapping patch x patch block, all channels
    together, in fp32: (..., h / patch, w / patch)."""
    a, b = a.float(), b.float()
    products = (a * b, a * a, b * b)
    sums = [patch * patch * F.avg_pool2d(x.reshape(-1, *x.shape[-3:]), patch).sum(dim=-3) for x in products]
    dot, norm_a, norm_b = (s.reshape(*a.shape[:-3], *s.shape[-2:]) for s in sums)
    return dot / (norm_a.sqrt() * norm_b.sqrt()).clamp_min(eps)


def softmin_weights(similarity: torch.Tensor, temperature: float, top_k: int | None = None) -> torch.Tensor:
    """Omega over the LoRAs (dim 0) of each patch: exp(-s / T) normalised, so the most divergent LoRA weighs most.

    top_k: the LoRAs outside the k lowest similarities of a patch get weight 0, the rest are renormalised.
    An infinite temperature weighs the (kept) LoRAs equally.
    """
    logits = -similarity / temperature
    if top_k is not None and top_k < similarity.shape[0]:
        kept = similarity.topk(top_k, dim=0, largest=False).indices
        logits = torch.full_like(logits, -math.inf).scatter(0, kept, logits.gather(0, kept))
    return logits.softmax(dim=0)


def mix(predictions: torch.Tensor, weights: torch.Tensor, patch: int) -> torch.Tensor:
    """sum_i Omega_i * eps_i with Omega (N, ..., h/p, w/p) repeated over each patch's pixels; eps (N, ..., C, h, w)."""
    upsampled = weights.repeat_interleave(patch, dim=-2).repeat_interleave(patch, dim=-1).unsqueeze(-3)
    return (upsampled.to(predictions.dtype) * predictions).sum(dim=0)


class LoratorioMethod(CompositionMethod):
    name = "loratorio"
    options_class = LoratorioOptions

    def check(self, pipe, prompt, loras):
        super().check(pipe, prompt, loras)
        k = self.options.top_k
        if k is not None and k > len(loras):
            raise InvalidOptionError(
                f"loratorio option top_k={k} keeps more LoRAs than the {len(loras)} given; "
                f"use at most {len(loras)}, or leave it empty for the static mode"
            )

    def check_size(self, pipe, loras, height, width):
        latent = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        patch = self.options.patch_size
        if any(side % patch for side in latent):
            fitting = [p for p in range(1, min(latent) + 1) if latent[0] % p == 0 and latent[1] % p == 0]
            raise InvalidOptionError(
                f"loratorio option patch_size={patch} must divide the latent size {latent[0]}x{latent[1]} "
                f"(image {height}x{width}); use one of {fitting} or another image size"
            )

    def prepare(self, ctx):
        self.passes = [ctx.base_pass(), *(ctx.lora_pass(lora) for lora in ctx.loras)]

    def noise_prediction(self, ctx, latents, t, i):
        options = self.options
        pairs = pass_predictions(ctx, latents, t, self.passes, options.batched)
        (base_uncond, base_cond), uncond, cond = pairs[0], *(torch.stack(half) for half in zip(*pairs[1:]))
        similarity = patch_cosine(cond, base_cond.expand_as(cond), options.patch_size)
        weights = softmin_weights(similarity, options.temperature, options.top_k)
        mixed_cond = mix(cond, weights, options.patch_size)
        mixed_uncond = mix(uncond, weights, options.patch_size)
        recentred = options.recenter * base_uncond + (1 - options.recenter) * mixed_uncond
        ctx.outputs["masks"] = weights[:, 0] if latents.shape[0] == 1 else weights.transpose(0, 1)
        return ctx.guide(recentred, mixed_cond), latents
