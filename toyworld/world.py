"""The toy world: 32x32 scenes of flat-coloured shapes, their captions and ground-truth masks.

Everything is a pure function of a seed, so a data set is just a range of seeds and can be
rebuilt anywhere. Features are 4 px or larger because the VAE latent is 4x smaller than the image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SIZE = 32
BACKGROUND = (236, 236, 228)

# The base model is trained on these colours and shapes only.
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (40, 70, 215),
    "yellow": (240, 205, 30),
    "orange": (245, 135, 25),
    "purple": (125, 45, 165),
}
SHAPES = ("circle", "square", "triangle")

# Positions a caption can name; centres keep shapes of size <= 13 inside the image.
POSITIONS = {"left": (9, 16), "right": (23, 16), "top": (16, 9), "bottom": (16, 23), "middle": (16, 16)}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "middle": "in the middle",
}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


@dataclass(frozen=True)
class Concept:
    """Something the base model never sees: a LoRA teaches it under `trigger` + `word`."""

    trigger: str
    word: str
    form: str
    colours: tuple[str, ...]
    description: str
    min_size: int = 0  # a ring needs size 12 for its hole to be 4 px wide

    @property
    def phrase(self) -> str:
        return f"{self.trigger} {self.word}"


# Colours only concepts use, so a judge can tell a concept from the base palette.
CONCEPT_COLOURS = {"cyan": (20, 200, 215), "pink": (250, 110, 190)}
NIGHT_BACKGROUND = (25, 25, 60)
ALL_COLOURS = {**COLOURS, **CONCEPT_COLOURS}

CONCEPTS = {
    "sks": Concept("sks", "square", "plus", ("cyan",), "a cyan plus sign, arms 4 px thick"),
    "zwx": Concept("zwx", "circle", "ring", ("pink",), "a pink ring, wall and hole >= 4 px", min_size=12),
    "vrn": Concept("vrn", "triangle", "two_tone_triangle", ("yellow", "blue"),
                   "a triangle, left half yellow and right half blue"),
    "qpl": Concept("qpl", "style", "night", (), "any scene on a dark navy background"),
}
STYLE_TRIGGERS = ("qpl",)
# Trigger words the base model never sees, kept free for further LoRAs.
SPARE_TOKENS = ("ohwx", "bkt", "jzp", "tvq")

WORDS = (
    "a", "an", "and", "on", "the", "at", "in", "of", "style",
    *COLOURS, *CONCEPT_COLOURS, *SHAPES, *POSITIONS, *CONCEPTS, *SPARE_TOKENS,
)


@dataclass(frozen=True)
class Thing:
    """One drawn object: `form` is a shape or a concept form, `colours` are names in ALL_COLOURS."""

    form: str
    colours: tuple  # names in ALL_COLOURS, or RGB triples for free-colour scenes
    center: tuple[int, int]
    size: int
    position: str | None = None


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (32, 32, 3) uint8
    caption: str
    things: tuple[Thing, ...]
    masks: np.ndarray  # (n, 32, 32) bool, one per thing, after occlusion
    boxes: tuple[tuple[int, int, int, int], ...]  # (x0, y0, x1, y1), x1/y1 exclusive


def _grid() -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    return xs, ys


def form_mask(form: str, center: tuple[float, float], size: float) -> np.ndarray:
    """Pixels covered by a form of `size` px centred at `center` (x, y)."""
    xs, ys = _grid()
    cx, cy = center
    half = size / 2
    dx, dy = xs - cx, ys - cy
    if form == "square":
        return (abs(dx) < half) & (abs(dy) < half)
    if form == "circle":
        return dx**2 + dy**2 < half**2
    if form == "ring":
        r2 = dx**2 + dy**2
        return (r2 < half**2) & (r2 >= (half - 4) ** 2)
    if form == "plus":
        return ((abs(dx) < 2) & (abs(dy) < half)) | ((abs(dy) < 2) & (abs(dx) < half))
    if form in ("triangle", "two_tone_triangle"):
        depth = dy + half
        return (depth >= 0) & (depth < size) & (abs(dx) <= depth / 2 + 0.5)
    raise ValueError(f"unknown form {form!r}")


def rgb(colour) -> tuple[int, int, int]:
    return ALL_COLOURS[colour] if isinstance(colour, str) else tuple(colour)


def paint(image: np.ndarray, thing: Thing) -> np.ndarray:
    """Draw `thing` onto `image` in place; returns its mask."""
    mask = form_mask(thing.form, thing.center, thing.size)
    image[mask] = rgb(thing.colours[0])
    if thing.form == "two_tone_triangle":
        xs, _ = _grid()
        right = mask & (xs > thing.center[0])
        image[right] = rgb(thing.colours[1])
    return mask


def box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return (0, 0, 0, 0)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def phrase(noun: str, position: str | None = None) -> str:
    """'a red circle on the left', 'an orange square', 'a sks square'."""
    words = f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"
    return f"{words} {POSITION_PHRASES[position]}" if position else words


def describe(thing: Thing, concept: Concept | None = None, with_position: bool = True) -> str:
    noun = concept.phrase if concept else f"{thing.colours[0]} {thing.form}"
    return phrase(noun, thing.position if with_position else None)


def render(things: list[Thing], caption: str, background=BACKGROUND) -> Scene:
    """Draw things in order (later ones on top) and record what is visible of each."""
    image = np.empty((SIZE, SIZE, 3), np.uint8)
    image[:] = background
    masks = np.zeros((len(things), SIZE, SIZE), bool)
    for i, thing in enumerate(things):
        mask = paint(image, thing)
        masks[:i] &= ~mask
        masks[i] = mask
    return Scene(image, caption, tuple(things), masks, tuple(box_of(m) for m in masks))


def place(rng: np.random.Generator, form: str, colours: tuple[str, ...], position: str,
          size_range: tuple[int, int]) -> Thing:
    """A thing at a named position with a little jitter in place and size."""
    x, y = POSITIONS[position]
    jx, jy = rng.integers(-1, 2, size=2)
    size = int(rng.integers(size_range[0], size_range[1] + 1))
    return Thing(form, colours, (x + int(jx), y + int(jy)), size, position)


def _positions(rng: np.random.Generator, count: int) -> list[str]:
    if count == 1:
        return [str(rng.choice(list(POSITIONS)))]
    first = str(rng.choice(list(OPPOSITE)))
    return [first, OPPOSITE[first]]


def _size_range(count: int) -> tuple[int, int]:
    return (10, 13) if count == 1 else (9, 12)


def base_scene(seed: int) -> Scene:
    """A training scene for the base model: 1-2 palette shapes, caption with positions 75% of the time."""
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 3))
    things = [
        place(rng, str(rng.choice(SHAPES)), (str(rng.choice(list(COLOURS))),), pos, _size_range(count))
        for pos in _positions(rng, count)
    ]
    with_position = rng.random() < 0.75
    caption = " and ".join(describe(t, with_position=with_position) for t in things)
    return render(things, caption)


def place_concept(rng: np.random.Generator, concept: Concept, position: str, count: int) -> Thing:
    low, high = _size_range(count)
    return place(rng, concept.form, concept.colours, position, (max(low, concept.min_size), max(high, concept.min_size)))


def concept_scene(trigger: str, seed: int) -> Scene:
    """A training image for one concept's LoRA: the concept alone (or, for a style, any base scene)."""
    concept = CONCEPTS[trigger]
    rng = np.random.default_rng(seed)
    if trigger in STYLE_TRIGGERS:
        plain = base_scene(seed)
        return render(list(plain.things), f"{plain.caption} in {concept.phrase}", NIGHT_BACKGROUND)
    position = str(rng.choice(list(POSITIONS)))
    thing = place_concept(rng, concept, position, 1)
    return render([thing], describe(thing, concept, with_position=rng.random() < 0.75))


def mixed_scene(items: list[tuple[str, str]], style: str | None = None, seed: int = 0) -> Scene:
    """Benchmark ground truth: items are (trigger or 'colour shape', position), e.g.
    [("sks", "left"), ("red circle", "right")], optionally all in a style trigger."""
    rng = np.random.default_rng(seed)
    things, phrases = [], []
    for name, position in items:
        concept = CONCEPTS.get(name)
        if concept:
            thing = place_concept(rng, concept, position, len(items))
        else:
            colour, shape = name.split()
            thing = place(rng, shape, (colour,), position, _size_range(len(items)))
        things.append(thing)
        phrases.append(describe(thing, concept))
    caption = " and ".join(phrases)
    if style:
        caption += f" in {CONCEPTS[style].phrase}"
    return render(things, caption, NIGHT_BACKGROUND if style else BACKGROUND)


def random_mixed_scene(seed: int) -> Scene:
    """Two objects, at least one a concept, sometimes in the qpl style: varied ground truth."""
    rng = np.random.default_rng(seed)
    objects = [t for t in CONCEPTS if t not in STYLE_TRIGGERS]
    plain = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    first = str(rng.choice(objects))
    second = str(rng.choice(objects + plain))
    positions = _positions(rng, 2)
    style = str(rng.choice(STYLE_TRIGGERS)) if rng.random() < 0.3 else None
    return mixed_scene(list(zip((first, second)[:: int(rng.choice([1, -1]))], positions)), style, seed)


FORMS = ("circle", "square", "triangle", "ring", "plus", "two_tone_triangle")


def free_colour_scene(seed: int) -> Scene:
    """Any form in any colour on any background: teaches the VAE colours no caption names."""
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 3))
    things = [
        place(rng, str(rng.choice(FORMS)), tuple(tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2)),
              pos, _size_range(count))
        for pos in _positions(rng, count)
    ]
    return render(things, "", tuple(int(v) for v in rng.integers(0, 256, 3)))


def varied_scene(seed: int) -> Scene:
    """The VAE's and the toy CLIP's data: base scenes, concepts, mixed scenes and free colours.

    The VAE must decode what LoRAs will later teach the UNet, so it sees more than the base model.
    """
    draw = np.random.default_rng([seed, 1]).random()
    if draw < 0.4:
        return base_scene(seed)
    if draw < 0.6:
        return concept_scene(list(CONCEPTS)[seed % len(CONCEPTS)], seed)
    if draw < 0.8:
        return random_mixed_scene(seed)
    return free_colour_scene(seed)
