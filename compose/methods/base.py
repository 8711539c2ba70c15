"""The shape every composition method has, and option parsing shared by all of them."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch

from ..context import DenoiseContext
from ..errors import InvalidOptionError
from ..spec import ResolvedLora
from ..tokens import require_word


@dataclasses.dataclass
class NoOptions:
    """For methods without options."""


class CompositionMethod:
    """A small strategy object the pipeline's loop calls; set-up and restore happen in the loop.

    check: validate inputs before anything is loaded or denoised.
    prepare: activate adapters, install processors, encode extra prompts.
    noise_prediction: the guided noise prediction for step i (and the latents, maybe updated).
    release: undo what prepare did that the loop's snapshot cannot (e.g. fused weights).
    """

    name: ClassVar[str]
    options_class: ClassVar[type] = NoOptions
    needs_triggers: ClassVar[bool] = False  # the method finds each LoRA's trigger tokens, so each must have one

    def __init__(self, options: Any = None):
        self.options = parse_options(self.options_class, options, self.name)

    def check_size(self, pipe, loras: list[ResolvedLora], height: int, width: int) -> None:
        """Checks that need the image size in pixels; like `check`, they run before any LoRA loads."""

    def check(self, pipe, prompt: str, loras: list[ResolvedLora]) -> None:
        """A LoRA with a trigger word draws its concept only where that word is in the prompt it is given."""
        for lora in loras:
            if not lora.trigger:
                if self.needs_trigger(lora):
                    raise InvalidOptionError(
                        f"method '{self.name}' needs a trigger word for LoRA '{lora.adapter}' and its file has none "
                        "in its metadata; pass LoraSpec(..., trigger='sks')"
                    )
                continue
            text = self.trigger_prompt(prompt, lora)
            if text is not None:
                require_word(pipe.tokenizer, text, lora.trigger, lora.adapter)

    def needs_trigger(self, lora: ResolvedLora) -> bool:
        return self.needs_triggers

    def trigger_prompt(self, prompt: str, lora: ResolvedLora) -> str | None:
        """The prompt that must hold `lora`'s trigger; None when the method writes the trigger in itself."""
        return prompt

    def prepare(self, ctx: DenoiseContext) -> None:
        pass

    def noise_prediction(self, ctx: DenoiseContext, latents: torch.Tensor, t, i: int):
        raise NotImplementedError

    def release(self, ctx: DenoiseContext) -> None:
        pass


def parse_options(options_class: type, options: Any, method: str):
    """An options dataclass from None, an instance, or a dict; unknown keys name the valid ones."""
    if options is None:
        return options_class()
    if isinstance(options, options_class):
        return options
    if isinstance(options, dict):
        valid = {f.name for f in dataclasses.fields(options_class)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise InvalidOptionError(
                f"method '{method}' has no option(s) {unknown}; valid options: {sorted(valid) or 'none'}"
            )
        try:
            return options_class(**options)
        except TypeError as error:
            raise InvalidOptionError(f"method '{method}': {error}") from error
    raise InvalidOptionError(
        f"method '{method}' takes options as a dict or {options_class.__name__}, not {type(options).__name__}"
    )


def require(condition: bool, message: str) -> None:
    """Option validation in __post_init__: one line per rule."""
    if not condition:
        raise InvalidOptionError(message)


def is_whole(value, minimum: int) -> bool:
    """An int (not a bool) >= minimum."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_number(value) -> bool:
    """An int or float (not a bool) that is not NaN; rules that allow infinity say so."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def is_step(value) -> bool:
    """A step given as a count (int >= 0) or as a fraction of the steps (float in [0, 1])."""
    if isinstance(value, bool):
        return False
    return (isinstance(value, int) and value >= 0) or (isinstance(value, float) and 0.0 <= value <= 1.0)


STEP = "a step count (int >= 0) or a fraction of the steps (float in [0, 1])"  # what is_step accepts, for messages


def step_index(value: int | float, steps: int) -> int:
    """A count stays as is; a fraction of `steps` rounds down (0.5 of 50 steps -> 25)."""
    return value if isinstance(value, int) else math.floor(value * steps)
