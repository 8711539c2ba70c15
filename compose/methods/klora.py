"""klora: K-LoRA (Ouyang et al., CVPR 2025) — one subject LoRA and one style LoRA in one UNet pass per step.

Every layer the two LoRAs adapt uses, at each step, the full change of exactly one of them: the
subject's while the sum of its K largest absolute entries, divided by a global balance gamma,
beats the style's sum times a scale that grows with the step (K = the two ranks' product). The
ratio of the two sums is fixed per layer, so the whole schedule is computed once per call from
the step count: the step's index in the scheduler's timesteps sets the time, never a counter.
Changes are read from peft's layers (`dense_change`) at the LoRAs' scales (alpha/rank times the
user's weight), so every file layout and adapter type works. The reference replaces the attention
projections only; here every layer the files adapt follows the rule (a layer only one of them
adapts always uses that one). Text-encoder parts apply both, as `merge` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from ..context import Pass
from ..errors import InvalidOptionError
from ..lora_delta import adapter_holder, dense_change, holds
from .base import CompositionMethod, is_whole, require

DEFAULT_BETA = {"s": 0.5, "s*": 1.275}  # the reference's offsets of its two scale patterns


@dataclass
class KloraOptions:
    style_lora: str | None = None  # adapter name of the style LoRA
    style_triggers: tuple[str, ...] = ()  # or: the LoRA whose trigger is one of these is the style
    pattern: Literal["s*", "s"] = "s*"  # style scale: "s" = alpha*p + beta; "s*" (reference default) mod alpha
    alpha: float = 1.5  # slope of the style scale over the progress p in [0, 1)
    beta: float | None = None  # its offset; None: 0.5 for "s", 1.275 for "s*"
    top_k: int | None = None  # entries summed per layer; None: the product of the two LoRAs' ranks there

    def __post_init__(self):
        if isinstance(self.style_triggers, list):
            self.style_triggers = tuple(self.style_triggers)
        require(
            self.style_lora is None or (isinstance(self.style_lora, str) and self.style_lora),
            f"klora option style_lora must name one of the LoRAs, got {self.style_lora!r}",
        )
        require(
            isinstance(self.style_triggers, tuple) and all(isinstance(t, str) and t for t in self.style_triggers),
            f"klora option style_triggers must be a list of trigger words, got {self.style_triggers!r}",
        )
        require(self.pattern in DEFAULT_BETA, f"klora option pattern must be 's' or 's*', got {self.pattern!r}")
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            require(
                (value is None and name == "beta")
                or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)),
                f"klora option {name} must be a finite number, got {value!r}",
            )
        require(self.alpha > 0, f"klora option alpha must be > 0, got {self.alpha!r}")
        require(
            self.top_k is None or is_whole(self.top_k, 1),
            f"klora option top_k must be a whole number >= 1 or None, got {self.top_k!r}",
        )
        if self.beta is None:
            self.beta = DEFAULT_BETA[self.pattern]


def style_scale(progress: float, pattern: str, alpha: float, beta: float) -> float:
    """s(p): how much the style's magnitude counts at progress p (0 at the first step, towards 1 at the last)."""
    scale = alpha * progress + beta
    return scale % alpha if pattern == "s*" else scale


def top_k_sum(change: torch.Tensor, k: int) -> float:
    """Sum of the k largest absolute entries (all of them when there are fewer)."""
    flat = change.detach().abs().flatten().float()
    return float(flat.topk(min(k, flat.numel())).values.sum())


def balance(content: list[torch.Tensor], style: list[torch.Tensor]) -> float:
    """gamma: the mean ratio of the layers' total magnitudes, without outliers (ratios >= 3x the mean).

    Layers where either change is zero have no ratio; without any ratio gamma is 1.
    """
    sums = [(float(c.abs().sum()), float(s.abs().sum())) for c, s in zip(content, style)]
    ratios = [c / s for c, s in sums if c > 0 and s > 0]
    if not ratios:
        return 1.0
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3 * mean]
    return sum(kept) / len(kept)


def style_steps(content: float, style: float, gamma: float, steps: int, options: KloraOptions) -> list[bool]:
    """Per step i, whether a layer with these top-K scores takes the style's change:
    unless content / gamma > s(i / steps) * style."""
    return [
        not content / gamma > style_scale(i / steps, options.pattern, options.alpha, options.beta) * style
        for i in range(steps)
    ]


def adapted_projections(unet, adapters: tuple[str, ...]) -> dict[str, list[BaseTunerLayer]]:
    """{module name: its chain of tuner layers, outermost first} for every layer holding any of the adapters."""
    chains: dict[str, list[BaseTunerLayer]] = {}
    for name, module in unet.named_modules():
        if isinstance(module, BaseTunerLayer):
            chains.setdefault(name.split(".base_layer")[0], []).append(module)
    return {name: chain for name, chain in chains.items() if any(holds(l, a) for l in chain for a in adapters)}


def layer_rank(layer, adapter: str) -> int:
    """The rank of `adapter` where this layer (or one it wraps) holds it."""
    return adapter_holder(layer, adapter).r[adapter]


class KloraMethod(CompositionMethod):
    name = "klora"
    options_class = KloraOptions

    def check(self, pipe, prompt, loras):
        super().check(pipe, prompt, loras)
        self._roles(loras)

    def _roles(self, loras):
        """(content LoRA, style LoRA), or an error saying how to name the style."""
        names = [lora.adapter for lora in loras]
        if len(loras) != 2:
            raise InvalidOptionError(f"klora composes one subject LoRA and one style LoRA; got {len(loras)}: {names}")
        options = self.options
        if options.style_lora is not None:
            styles = [lora for lora in loras if lora.adapter == options.style_lora]
            if not styles:
                raise InvalidOptionError(
                    f"klora option style_lora '{options.style_lora}' names none of the LoRAs {names}"
                )
        else:
            styles = [lora for lora in loras if lora.trigger in options.style_triggers]
            if len(styles) != 1:
                raise InvalidOptionError(
                    f"klora needs to know which of the LoRAs {names} is the style; {len(styles)} of their triggers "
                    f"{[lora.trigger for lora in loras]} are in style_triggers {list(options.style_triggers)}: "
                    "pass style_lora='<adapter name>' or style_triggers=['<style trigger>']"
                )
        [content] = [lora for lora in loras if lora is not styles[0]]
        return content, styles[0]

    def prepare(self, ctx):
        content, style = self._roles(ctx.loras)
        self._embeds = ctx.encode(ctx.prompt, {l.adapter: l.weight for l in ctx.loras if l.has_text_encoder})
        self._adapters = (content.adapter, style.adapter)
        self._chains = adapted_projections(ctx.unet, self._adapters)
        changes = {name: [dense_change(chain[0], a) for a in self._adapters] for name, chain in self._chains.items()}
        both = {name: pair for name, pair in changes.items() if None not in pair}
        gamma = balance([c for c, _ in both.values()], [s for _, s in both.values()])
        steps = len(ctx.timesteps)
        self.schedule = {name: [changes[name][0] is None] * steps for name in changes}  # one LoRA there: that one
        for name, (c, s) in both.items():
            k = self.options.top_k or math.prod(layer_rank(self._chains[name][0], a) for a in self._adapters)
            self.schedule[name] = style_steps(top_k_sum(c, k), top_k_sum(s, k), gamma, steps, self.options)
        self._current: dict[str, bool] = {}
        ctx.outputs.update(klora_gamma=gamma, klora_roles={"content": content.adapter, "style": style.adapter})
        ctx.outputs.update(klora_schedule=self.schedule, klora_style_layers=[])

    def noise_prediction(self, ctx, latents, t, i):
        """Step i of the scheduler's timesteps: each layer gets the adapter its schedule names for i."""
        for name, uses_style in self.schedule.items():
            if self._current.get(name) != uses_style[i]:
                chosen = self._adapters[uses_style[i]]
                for layer in self._chains[name]:
                    layer.set_adapter([chosen] if holds(layer, chosen) else [], inference_mode=True)
                self._current[name] = uses_style[i]
        ctx.outputs["klora_style_layers"].append(sum(s[i] for s in self.schedule.values()))
        negative, embeds = self._embeds
        [(uncond, cond)] = ctx.predict(latents, t, [Pass(None, negative, embeds)])
        return ctx.guide(uncond, cond), latents
