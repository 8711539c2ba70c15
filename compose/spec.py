"""What a user asks for: one LoRA with its weight, trigger word, concept word and region."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidWeightError
from .regions import Box, as_region


USUAL_WEIGHT_LIMIT = 10.0  # LoRA weights are mostly within -2..2; beyond this one overwhelms the model


@dataclass
class LoraSpec:
    """One LoRA to compose.

    source: a local ``.safetensors`` file, a folder holding one, or a hub repository id.
    weight: the adapter's scale. trigger: the rare word that calls the concept (read from the
    file's metadata when not given). concept: the plain class word ("dog") the trigger stands
    for. region: a box (top, left, bottom, right) as fractions of the image, or a mask image.
    """

    source: str | Path
    weight: float = 1.0
    trigger: str | None = None
    concept: str | None = None
    region: Any = None
    name: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None

    def __post_init__(self):
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise InvalidWeightError(
                f"LoRA {self.source}: weight {self.weight!r} is not a finite number; pass e.g. weight=0.8"
            )
        self.weight = float(self.weight)
        if abs(self.weight) > USUAL_WEIGHT_LIMIT:
            warnings.warn(
                f"LoRA {self.source}: weight {self.weight:g} is far outside the usual range "
                f"(-{USUAL_WEIGHT_LIMIT:g} to {USUAL_WEIGHT_LIMIT:g}); the image will likely be noise",
                stacklevel=3,
            )
        self.region = as_region(self.region)

    @classmethod
    def from_dict(cls, entry: dict[str, Any]) -> "LoraSpec":
        """From a recipe or config entry; the file is under "source" (recipes) or "file" (eval configs)."""
        fields = ("weight", "trigger", "concept", "region", "name", "prompt", "negative_prompt")
        return cls(entry["source"] if "source" in entry else entry["file"], **{k: entry[k] for k in fields if k in entry})

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """Parse the command-line form ``FILE[:WEIGHT][@NAME]`` (a name tells apart files of one name)."""
        rest, sep, name = text.rpartition("@")
        if not (sep and rest and re.fullmatch(r"\w[\w-]*", name)):
            rest, name = text, None
        source, sep, weight = rest.rpartition(":")
        if sep and source and _is_number(weight):
            return cls(source, float(weight), name=name)
        return cls(rest, name=name)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass
class ResolvedLora:
    """A LoraSpec after its file was found, checked and hashed; `adapter` is its name in the pipeline."""

    spec: LoraSpec
    path: Path
    sha256: str
    adapter: str
    trigger: str | None
    concept: str | None
    metadata: dict[str, str] = field(default_factory=dict)
    has_text_encoder: bool = False

    @property
    def weight(self) -> float:
        return self.spec.weight

    @property
    def region(self) -> Box | Any:
        return self.spec.region

    def recipe(self) -> dict[str, Any]:
        """What a saved image records about this LoRA so the result can be reproduced."""
        region = self.region.as_tuple() if isinstance(self.region, Box) else None
        return {
            "name": self.adapter,
            "source": str(self.spec.source),
            "weight": self.weight,
            "trigger": self.trigger,
            "concept": self.concept,
            "region": region,
            "prompt": self.spec.prompt,
            "negative_prompt": self.spec.negative_prompt,
            "sha256": self.sha256,
        }
