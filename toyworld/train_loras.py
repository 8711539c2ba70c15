"""Train the toy world's concept LoRAs with the project's trainer, and measure their gates.

    python -m toyworld.train_loras --out toyworld/loras            # train all, then measure
    python -m toyworld.train_loras --out toyworld/loras --measure  # measure the shipped files only

Each concept comes in two variants: `<trigger>.safetensors`, a plain LoRA for every method, and
`<trigger>_tara.safetensors`, trained with TARA's token mask for the `tara` method. The joint
LoRAs (`sks_zwx`, `zwx_ohwx`) are each trained on scenes holding both of a benchmark pair's
concepts: the ceiling a composition method is measured against.

They are trained as concept LoRAs for real models are: a small rank and learning rate for the
model's width, scenes that show the concept beside other objects with the trigger anywhere in the
caption, and (an option) DreamBooth's prior preservation on plain scenes. Deterministic: scenes,
LoRA initialisation and noise stream are seeded.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import toyworld
from compose import LoraSpec
from compose.adapters import activate, restore, snapshot
from compose.loading import load_adapters, resolve_loras
from compose.methods.tara import masked_kv_modules
from compose.training.tara import LAYER_SETS, TaraTrainingOptions, checkpoint_dir, train_tara
from pipelines.loading import load_pipeline
from toyworld.judge import judge
from toyworld.measure import GENERATION, rate
from toyworld.world import CONCEPTS, STYLE_TRIGGERS, base_scene, concept_scene, joint_scene

CLASS_WORDS = {trigger: concept.word for trigger, concept in CONCEPTS.items()}
# Joint LoRAs: name -> the concepts their scenes hold (the first is the file's trigger).
JOINT = {"sks_zwx": ("sks", "zwx"), "zwx_ohwx": ("zwx", "ohwx")}
SCENES = 256
PRIOR_SCENES = 256
# Rank 8 of widths 32-128: a larger share of the width than rank 8-16 is of SD 1.5's 320-1280, because
# rank 4 drew half as many rings at the same steps. LoCon (the ResNet convolutions too), because attention
# alone did not learn the new forms (toyworld/loras/RECIPE.md has the ladder).
TRAINING = dict(steps=1500, lr=1e-3, rank=8, alpha=8.0, batch_size=16, seed=0, checkpoint_every=250, layers="locon")
# variant: (file suffix, trainer's token_mask, method it is measured with)
VARIANTS = {"plain": ("", False, "merge"), "tara": ("_tara", True, "tara")}
# The base object a concept is shown beside: another class, so the judge tells them apart.
NEIGHBOUR = {"sks": "red circle", "zwx": "blue square", "vrn": "red circle", "ohwx": "blue square"}
LOW_WEIGHT = 0.7


def lora_file(folder: Path, name: str, variant: str = "plain") -> Path:
    return folder / f"{name}{VARIANTS[variant][0]}.safetensors"


def training_pairs(name: str, count: int = SCENES) -> list[tuple[np.ndarray, str]]:
    """Rendered scenes with the renderer's captions: one concept in context, or a joint pair."""
    scenes = [joint_scene(JOINT[name], s) if name in JOINT else concept_scene(name, s) for s in range(count)]
    return [(scene.image, scene.caption) for scene in scenes]


def prior_pairs(count: int = PRIOR_SCENES) -> list[tuple[np.ndarray, str]]:
    """Plain scenes of the base model's world (held out from its training seeds) as class images."""
    scenes = [base_scene(10**7 + s) for s in range(count)]
    return [(scene.image, scene.caption) for scene in scenes]


def train_one(pipe, name: str, out: Path, variant: str, prior: bool, training: dict = TRAINING) -> float:
    """Train one file and return its seconds; a rerun resumes from the checkpoint beside it."""
    trigger = JOINT[name][0] if name in JOINT else name
    path = lora_file(out, name, variant)
    options = TaraTrainingOptions(
        rare_token=trigger, class_word=CLASS_WORDS[trigger], token_mask=VARIANTS[variant][1], **training
    )
    began = time.perf_counter()
    train_tara(pipe, training_pairs(name), path, options, progress=False, resume=True,
               prior=prior_pairs() if prior else None)
    for leftover in checkpoint_dir(path).glob("*"):
        leftover.unlink()
    checkpoint_dir(path).rmdir()
    return time.perf_counter() - began


def generate(pipe, prompt: str, seeds, loras: list[LoraSpec] | None = None, method: str = "merge") -> list[Image.Image]:
    """One image per seed, all seeds in one batch."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    kwargs = dict(loras=loras, method=method) if loras else {}
    return pipe(prompt, num_images_per_prompt=len(generators), generator=generators, **GENERATION, **kwargs).images


def concept_rate(images, trigger: str) -> float:
    return sum(judge(image).has_concept(trigger) for image in images) / len(images)


def has_item(reading, item: str) -> bool:
    """A concept trigger or a 'colour shape' base object."""
    if item in CONCEPTS:
        return reading.has_concept(item)
    colour, shape = item.split()
    return reading.has(shape, colour)


@dataclass(frozen=True)
class Gate:
    """One judged measurement: a prompt, the LoRA's weight, and the items every image must show."""

    name: str
    prompt: str
    items: tuple[str, ...]
    weight: float = 1.0
    minimum: float = 0.0


def gates(trigger: str) -> list[Gate]:
    """The gates a concept LoRA must pass: alone, beside a base object, no bleed, and at a lower weight."""
    word = CLASS_WORDS[trigger]
    if trigger in STYLE_TRIGGERS:
        scene = "a red circle on the left and a blue square on the right"
        return [
            Gate("alone", f"a red circle in {trigger} {word}", (trigger, "red circle"), minimum=0.9),
            Gate("beside", f"{scene} in {trigger} {word}", (trigger, "red circle", "blue square"), minimum=0.7),
            Gate("no_trigger", scene, ("red circle", "blue square"), minimum=0.8),
            Gate("weight_0.7", f"a red circle in {trigger} {word}", (trigger,), LOW_WEIGHT, minimum=0.7),
        ]
    other = NEIGHBOUR[trigger]
    concept = f"{trigger} {word}"
    return [
        Gate("alone", f"a {concept}", (trigger,), minimum=0.9),
        Gate("beside", f"a {concept} on the left and a {other} on the right", (trigger, other), minimum=0.7),
        Gate("beside_swapped", f"a {other} on the left and a {concept} on the right", (trigger, other), minimum=0.7),
        Gate("no_trigger", f"a {other} on the left and a yellow triangle on the right",
             (other, "yellow triangle"), minimum=0.8),
        Gate("weight_0.7", f"a {concept}", (trigger,), LOW_WEIGHT, minimum=0.7),
    ]


def joint_gate(name: str) -> Gate:
    a, b = JOINT[name]
    prompt = f"a {a} {CLASS_WORDS[a]} on the left and a {b} {CLASS_WORDS[b]} on the right"
    return Gate("both", prompt, JOINT[name], minimum=0.8)


@contextmanager
def always_on(pipe, path: Path, weight: float, token_masked: bool = False):
    """The LoRA loaded and active for every token, as diffusers' own `load_lora_weights` leaves it:
    how bleed is seen when no composition method (which all want the trigger) is involved.

    A token-masked LoRA's cross-attention key/value change acts only at its trigger, so with no
    trigger in the prompt it acts nowhere: those layers are switched off, the rest stay on."""
    loras = resolve_loras(pipe, [LoraSpec(str(path), weight=weight)])
    state = snapshot([pipe.unet])
    load_adapters(pipe, loras)
    adapter = loras[0].adapter
    activate(pipe.unet, {adapter: weight})
    if token_masked:
        for name in masked_kv_modules(pipe.unet):
            layer = pipe.unet.get_submodule(name)
            if adapter in getattr(layer, "scaling", {}):
                layer.set_scale(adapter, 0.0)
    try:
        yield
    finally:
        restore([pipe.unet], state)


def measure_gate(pipe, gate: Gate, seeds, path: Path | None, method: str) -> tuple[dict, list[Image.Image]]:
    """A gate's judged rate. The trigger-free gate runs the LoRA always on, with no method."""
    if path and gate.name == "no_trigger":
        with always_on(pipe, path, gate.weight, token_masked=method == "tara"):
            images = generate(pipe, gate.prompt, seeds)
    else:
        images = generate(pipe, gate.prompt, seeds, [LoraSpec(str(path), weight=gate.weight)] if path else None, method)
    passed = [all(has_item(judge(image), item) for item in gate.items) for image in images]
    return {**rate(passed), "minimum": gate.minimum, "prompt": gate.prompt, "weight": gate.weight}, images


def measure(pipe, out: Path, names, variants, seeds) -> tuple[dict, list[list[Image.Image]]]:
    """{file stem: {gate: figures}} and the images, one row per gate; the base model's rates for comparison."""
    figures, rows = {}, []
    for name in names:
        for variant in variants if name not in JOINT else ["plain"]:
            path = lora_file(out, name, variant)
            checks = [joint_gate(name)] if name in JOINT else gates(name)
            figures[path.stem] = {}
            for gate in checks:
                result, images = measure_gate(pipe, gate, seeds, path, VARIANTS[variant][2])
                figures[path.stem][gate.name] = result
                rows.append(images)
            shown = "  ".join(f"{g} {r['rate']:.0%}" for g, r in figures[path.stem].items())
            print(f"{path.stem}: {shown}", flush=True)
    return figures, rows


def relative_change(path: Path, pipe) -> dict[str, float]:
    """Median and max over layers of ||(alpha/r) B A|| / ||W||: how strong the LoRA is next to the weights."""
    from safetensors import safe_open

    weights = dict(pipe.unet.named_parameters())
    ratios = []
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        keys = list(f.keys())
        for key in keys:
            if ".lora_A." not in key:
                continue
            down, up = f.get_tensor(key).float(), f.get_tensor(key.replace(".lora_A.", ".lora_B.")).float()
            module = key.split(".lora_A.")[0].removeprefix("unet.")
            base = weights.get(f"{module}.weight", weights.get(f"{module}.base_layer.weight"))
            if base is None:
                continue
            scale = float(metadata.get("lora_alpha", down.shape[0])) / down.shape[0]
            ratios.append(float((scale * up.flatten(1) @ down.flatten(1)).norm() / base.norm()))  # convs too
    return {"median": round(float(np.median(ratios)), 3), "max": round(float(np.max(ratios)), 3)}


def save_grid(rows: list[list[Image.Image]], path: Path, scale: int = 3) -> None:
    """One row per gate (in the order of the RECIPE's table), seeds left to right."""
    grid = Image.fromarray(np.concatenate([np.concatenate([np.asarray(i) for i in row], 1) for row in rows], 0))
    grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST).save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [*CLASS_WORDS, *JOINT]
    parser.add_argument("--out", type=Path, default=toyworld.default_lora_path())
    parser.add_argument("--model", type=Path, default=toyworld.default_model_path(),
                        help="the base model the LoRAs are trained on and measured with")
    parser.add_argument("--names", nargs="+", default=names, choices=names)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--no-prior", action="store_true", help="train without prior preservation")
    for option in ("steps", "lr", "rank"):
        parser.add_argument(f"--{option}", type=type(TRAINING[option]), default=TRAINING[option])
    parser.add_argument("--layers", default=TRAINING["layers"], choices=list(LAYER_SETS), help="which layers the LoRAs train")
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--first-seed", type=int, default=1000, help="measurement seeds (not the benchmark's)")
    parser.add_argument("--measure", action="store_true", help="only measure the LoRAs already in --out")
    parser.add_argument("--grid", type=Path, help="write every measured image here")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pipe = load_pipeline(str(args.model))
    pipe.set_progress_bar_config(disable=True)
    if not args.measure:
        args.out.mkdir(parents=True, exist_ok=True)
        for name in args.names:
            for variant in args.variants if name not in JOINT else ["plain"]:
                training = {**TRAINING, "steps": args.steps, "lr": args.lr, "rank": args.rank, "alpha": float(args.rank),
                            "layers": args.layers}
                seconds = train_one(pipe, name, args.out, variant, not args.no_prior, training)
                print(f"{lora_file(args.out, name, variant).stem}: trained in {seconds:.0f} s", flush=True)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    figures, rows = measure(pipe, args.out, args.names, args.variants, seeds)
    for stem in figures:
        figures[stem]["relative_change"] = relative_change(args.out / f"{stem}.safetensors", pipe)
    print(json.dumps(figures, indent=1))
    if args.grid:
        save_grid(rows, args.grid)


if __name__ == "__main__":
    main()
