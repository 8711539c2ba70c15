"""Example settings a first visit can start from, offered when the library has the LoRAs they need.

An example names its LoRAs by trigger and concept word (the built-in toy model's `sks square`,
`zwx circle`, `qpl style`), so it works with any library holding LoRAs with that metadata. Boxes leave
a margin of background around each concept. String options may name an example LoRA as `{trigger}`,
which becomes that LoRA's adapter name (e.g. composer's `background`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .form import LoraSettings, adapter_name
from .library import LoraLibrary


@dataclass(frozen=True)
class ExampleLora:
    trigger: str
    concept: str
    box: tuple[float, float, float, float] | None = None  # (top, left, bottom, right); None: no region


@dataclass(frozen=True)
class Example:
    label: str
    prompt: str
    method: str
    loras: tuple[ExampleLora, ...]
    options: dict[str, Any] = field(default_factory=dict)


_PAIR = (ExampleLora("sks", "square", (0.2, 0.05, 0.8, 0.45)), ExampleLora("zwx", "circle", (0.2, 0.55, 0.8, 0.95)))
_PAIR_PROMPT = "a sks square on the left and a zwx circle on the right"
EXAMPLES = (
    Example("sks square + zwx circle (regional)", _PAIR_PROMPT, "regional", _PAIR),
    Example(
        "… in qpl style (composer)", f"{_PAIR_PROMPT} in qpl style", "composer",
        (*_PAIR, ExampleLora("qpl", "style")), options={"background": "{qpl}"},
    ),  # fmt: skip
)


def example_loras(example: Example, library: LoraLibrary) -> list[LoraSettings] | None:
    """The example's LoRAs as form settings, from the first library entry of each; None if one is missing."""
    settings = []
    for wanted in example.loras:
        words = (wanted.trigger, wanted.concept)
        name = next((name for name, entry in library.entries.items() if (entry.trigger, entry.concept) == words), None)
        if name is None:
            return None
        settings.append(
            LoraSettings(
                name=name,
                trigger=wanted.trigger,
                concept=wanted.concept,
                use_region=wanted.box is not None,
                box=wanted.box or (0.0, 0.0, 1.0, 1.0),
            )
        )
    return settings


def example_options(example: Example, loras: list[LoraSettings]) -> dict[str, Any]:
    """The example's options, with `{trigger}` in string values replaced by that LoRA's adapter name."""
    adapters = {lora.trigger: adapter_name(lora.name) for lora in loras}
    return {
        key: value.format(**adapters) if isinstance(value, str) else value for key, value in example.options.items()
    }
