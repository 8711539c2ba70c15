"""What the form holds, turned into a recipe (the schema `loracompose generate` reads and writes).

The recipe is the one description of a request: the UI runs it with `pipelines.generate.generate`,
stores it in the PNG, and prints it as the pipeline call that reproduces the image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from compose.errors import ComposeError, InvalidRegionError, TriggerNotInPromptError
from compose.methods import build_method
from compose.regions import Box
from compose.tokens import require_word

from .library import LoraLibrary


@dataclass(frozen=True)
class LoraSettings:
    """One selected LoRA as the form shows it; `box` is (top, left, bottom, right) fractions."""

    name: str
    weight: float = 1.0
    trigger: str = ""
    concept: str = ""
    use_region: bool = False
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)


def strip_box(index: int, count: int) -> tuple[float, float, float, float]:
    """Default region of the index-th of `count` LoRAs: side-by-side vertical strips, left to right."""
    return (0.0, round(index / count, 3), 1.0, round((index + 1) / count, 3))


def arrange(selection: list[str], previous: list[LoraSettings], library: LoraLibrary) -> list[LoraSettings]:
    """Settings for the newly selected LoRAs: kept ones keep theirs, new ones start from their metadata.

    A box still at its default strip is re-split, so two LoRAs picked one after the other get halves.
    """
    kept = {settings.name: (index, settings) for index, settings in enumerate(previous)}
    arranged = []
    for index, name in enumerate(selection):
        if name in kept:
            old_index, settings = kept[name]
            if settings.box == strip_box(old_index, len(previous)):
                settings = replace(settings, box=strip_box(index, len(selection)))
            arranged.append(settings)
            continue
        entry = library.get(name)
        arranged.append(
            LoraSettings(
                name=name,
                trigger=entry.trigger or "",
                concept=entry.concept or "",
                box=strip_box(index, len(selection)),
            )
        )
    return arranged


def suggest_prompt(loras: list[LoraSettings]) -> str:
    """A prompt naming every selected concept by its trigger: "a sks cat and a zwx dog"."""
    parts = [" ".join(word for word in ("a", lora.trigger, lora.concept or lora.name) if word) for lora in loras]
    return " and ".join(parts)


def adapter_name(library_name: str) -> str:
    return re.sub(r"\W", "_", library_name)


def build_recipe(
    *,
    model: str,
    prompt: str,
    negative_prompt: str,
    seed: int,
    steps: int,
    guidance: float,
    height: int,
    width: int,
    method: str,
    options: dict[str, Any],
    loras: list[LoraSettings],
    library: LoraLibrary,
) -> dict[str, Any]:
    """Validate the form and return its recipe; every problem raises a ComposeError naming the fix."""
    if not loras:
        raise ComposeError("no LoRA selected: choose at least one LoRA from the library")
    if not prompt or not prompt.strip():
        raise ComposeError("the prompt is empty: describe the image, with each LoRA's trigger word")
    build_method(method, options)  # unknown method or bad option values fail here
    entries = []
    for lora in loras:
        region = None
        if lora.use_region:
            try:
                region = [float(side) for side in Box(*lora.box).as_tuple()]
            except InvalidRegionError as error:
                raise InvalidRegionError(f"LoRA '{lora.name}': {error}") from error
        entries.append(
            {
                "name": adapter_name(lora.name),
                "source": str(library.get(lora.name).path),
                "weight": float(lora.weight),
                "trigger": lora.trigger.strip() or None,
                "concept": lora.concept.strip() or None,
                "region": region,
            }
        )
    return {
        "model": model,
        "prompt": prompt.strip(),
        "negative_prompt": negative_prompt.strip() or None,
        "seed": int(seed),
        "steps": int(steps),
        "guidance": float(guidance),
        "height": int(height),
        "width": int(width),
        "method": method,
        "options": options,
        "loras": entries,
    }


def check_triggers(tokenizer, recipe: dict[str, Any]) -> None:
    """A trigger word the form names must be in the prompt, for every method (a missing one is a slip)."""
    for lora in recipe["loras"]:
        if lora["trigger"]:
            try:
                require_word(tokenizer, recipe["prompt"], lora["trigger"], lora["name"])
            except TriggerNotInPromptError as error:
                raise TriggerNotInPromptError(f"{error} (or clear its trigger field to use it without one)") from error


def with_method(recipe: dict[str, Any], method: str, options: dict[str, Any]) -> dict[str, Any]:
    return {**recipe, "method": method, "options": options}


def python_code(recipe: dict[str, Any]) -> str:
    """The pipeline call `pipelines.generate.generate` makes for this recipe, as code a user can run."""
    lines = [
        "import torch",
        "from compose import LoraSpec",
        "from pipelines.loading import load_pipeline",
        "",
        f"pipe = load_pipeline({recipe['model']!r})",
        "image = pipe(",
        f"    {recipe['prompt']!r},",
    ]
    if recipe.get("negative_prompt"):
        lines.append(f"    negative_prompt={recipe['negative_prompt']!r},")
    lines += [
        f"    num_inference_steps={recipe['steps']},",
        f"    guidance_scale={recipe['guidance']},",
        f"    height={recipe['height']},",
        f"    width={recipe['width']},",
        f"    generator=torch.Generator().manual_seed({recipe['seed']}),",
        "    loras=[",
    ]
    for lora in recipe["loras"]:
        arguments = [repr(lora["source"]), f"weight={lora['weight']}"]
        arguments += [f"{key}={lora[key]!r}" for key in ("trigger", "concept") if lora.get(key)]
        if lora.get("region"):
            arguments.append(f"region={tuple(lora['region'])!r}")
        arguments.append(f"name={lora['name']!r}")
        lines.append(f"        LoraSpec({', '.join(arguments)}),")
    lines += ["    ],", f"    method={recipe['method']!r},"]
    if recipe.get("options"):
        lines.append(f"    method_options={recipe['options']!r},")
    lines += [").images[0]", 'image.save("out.png")']
    return "\n".join(lines) + "\n"
