"""switch: one LoRA active per step, rotating every `switch_step` steps in the given order."""

from __future__ import annotations

from dataclasses import dataclass

from .base import CompositionMethod, require


@dataclass
class SwitchOptions:
    switch_step: int = 5  # steps each LoRA stays active before the next one takes over

    def __post_init__(self):
        require(
            isinstance(self.switch_step, int) and not isinstance(self.switch_step, bool) and self.switch_step >= 1,
            f"switch option switch_step must be a whole number >= 1, got {self.switch_step!r}",
        )


def active_index(step: int, switch_step: int, count: int) -> int:
    """The LoRA active at `step`; the switch happens before the step (no off-by-one)."""
    return (step // switch_step) % count


class SwitchMethod(CompositionMethod):
    name = "switch"
    options_class = SwitchOptions

    def noise_prediction(self, ctx, latents, t, i):
        lora = ctx.loras[active_index(i, self.options.switch_step, len(ctx.loras))]
        ctx.outputs.setdefault("active_adapters", []).append(lora.adapter)
        [(uncond, cond)] = ctx.predict(latents, t, [ctx.lora_pass(lora)])
        return ctx.guide(uncond, cond), latents
