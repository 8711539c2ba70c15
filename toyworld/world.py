"""The toy world: 32x32 scenes of one to three flat-coloured shapes, their captions and ground-truth masks.

Everything is a pure function of a seed, so a data set is just a range of seeds and can be
rebuilt anywhere. Objects sit anywhere in the frame at several sizes, so a model trained on these
scenes has to decide locally what goes where: the precondition for regional composition. Features
are 2 latent pixels or larger (the VAE latent is 2x smaller than the image).
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

# Anchor centres of the named positions; a caption names the position its object's centre is nearest.
POSITIONS = {"left": (8, 16), "right": (24, 16), "top": (16, 8), "bottom": (16, 24), "middle": (16, 16)}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "middle": "in the middle",
}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
PARTIAL_CAPTIONS = 0.5  # share of several-object base scenes whose caption names only some objects
MIDDLE_RADIUS = 3  # a centre this close to the image centre is "in the middle"
RING_WALL = 3  # px; a ring of size >= 11 keeps a hole of >= 5 px, over 2 latent pixels

# Sizes (px) of drawn objects, by how many share the scene.
SIZE_RANGES = {1: (9, 14), 2: (8, 12), 3: (8, 11)}
GAP = 2  # px of background kept between objects' boxes, so they never touch


@dataclass(frozen=True)
class Concept:
    """Something the base model never sees: a LoRA teaches it under `trigger` + `word`."""

    trigger: str
    word: str
    form: str
    colours: tuple[str, ...]
    description: str
    min_size: int = 0

    @property
    def phrase(self) -> str:
        return f"{self.trigger} {self.word}"


# Colours only concepts use, so a judge can tell a concept from the base palette.
CONCEPT_COLOURS = {"cyan": (20, 200, 215), "pink": (250, 110, 190), "black": (30, 30, 30)}
NIGHT_BACKGROUND = (25, 25, 60)
ALL_COLOURS = {**COLOURS, **CONCEPT_COLOURS}

CONCEPTS = {
    "sks": Concept("sks", "square", "plus", ("cyan",), "a cyan plus sign, arms 4 px thick"),
    "zwx": Concept("zwx", "circle", "ring", ("pink",), "a pink ring, wall 3 px, hole >= 5 px", min_size=11),
    "vrn": Concept("vrn", "triangle", "two_tone_triangle", ("yellow", "blue"),
                   "a triangle, left half yellow and right half blue", min_size=10),
    "ohwx": Concept("ohwx", "circle", "circle", ("black",), "a black disc: a second circle concept"),
    "qpl": Concept("qpl", "style", "night", (), "any scene on a dark navy background"),
}
STYLE_TRIGGERS = ("qpl",)
# Trigger words the base model never sees, kept free for further LoRAs.
SPARE_TOKENS = ("bkt", "jzp", "tvq", "wqz")

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
        return (r2 < half**2) & (r2 >= (half - RING_WALL) ** 2)
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


def position_name(x: float, y: float) -> str:
    """The named position of a point: middle near the centre, else the dominant direction."""
    dx, dy = x - SIZE / 2, y - SIZE / 2
    if max(abs(dx), abs(dy)) < MIDDLE_RADIUS:
        return "middle"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def seen_position(form: str, center: tuple[int, int], size: int) -> str:
    """The named position of a form as a viewer (and the judge) sees it: its drawn box's centre."""
    x0, y0, x1, y1 = box_of(form_mask(form, center, size))
    return position_name((x0 + x1) / 2, (y0 + y1) / 2)


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


def _extent(center: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    half = size // 2 + 1
    return center[0] - half, center[1] - half, center[0] + half, center[1] + half


def _apart(a, b) -> bool:
    return a[2] + GAP <= b[0] or b[2] + GAP <= a[0] or a[3] + GAP <= b[1] or b[3] + GAP <= a[1]


def free_layout(rng: np.random.Generator, sizes: list[int]) -> list[tuple[int, int]]:
    """Centres anywhere in the frame, each object inside it and clear of the others.

    Rejection sampling: a layout that does not fit starts again, all from the same generator.
    """
    while True:
        centres: list[tuple[int, int]] = []
        for size in sizes:
            for _ in range(50):
                low, high = size // 2 + 1, SIZE - size // 2 - 1
                centre = (int(rng.integers(low, high)), int(rng.integers(low, high)))
                if all(_apart(_extent(centre, size), _extent(c, s)) for c, s in zip(centres, sizes)):
                    centres.append(centre)
                    break
            else:
                break
        if len(centres) == len(sizes):
            return centres


def _sizes(rng: np.random.Generator, minimums: list[int]) -> list[int]:
    """One size per object; `minimums` (one per object) keep concepts such as rings legible."""
    low, high = SIZE_RANGES[len(minimums)]
    return [int(rng.integers(max(low, m), max(high, m) + 1)) for m in minimums]


def _things(rng: np.random.Generator, items: list[tuple[str, tuple]], minimums: list[int]) -> list[Thing]:
    """Things of the given (form, colours) at a free layout, each knowing its named position."""
    sizes = _sizes(rng, minimums)
    centres = free_layout(rng, sizes)
    return [Thing(form, colours, c, s, seen_position(form, c, s)) for (form, colours), c, s in zip(items, centres, sizes)]


def _caption(rng: np.random.Generator, phrases_of) -> str:
    """Objects in a shuffled order, with position words 70% of the time."""
    with_position = rng.random() < 0.7
    phrases = phrases_of(with_position)
    order = rng.permutation(len(phrases))
    return " and ".join(phrases[i] for i in order)


def _base_items(rng: np.random.Generator, count: int) -> list[tuple[str, tuple]]:
    return [(str(rng.choice(SHAPES)), (str(rng.choice(list(COLOURS))),)) for _ in range(count)]


def _object_count(rng: np.random.Generator) -> int:
    return int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))


def base_scene(seed: int) -> Scene:
    """A training scene for the base model: 1-3 palette shapes anywhere, each named in the caption."""
    rng = np.random.default_rng(seed)
    items = _base_items(rng, _object_count(rng))
    things = _things(rng, items, [0] * len(items))
    named = _named(rng, len(things))
    caption = _caption(rng, lambda pos: [describe(things[i], with_position=pos) for i in named])
    return render(things, caption)


def _named(rng: np.random.Generator, count: int) -> list[int]:
    """Which objects the caption names: all, or (PARTIAL_CAPTIONS of scenes with several) only some, as
    real captions leave things out. A model trained so does not read "a red square" as "exactly one
    object", which is what lets a region's own prompt add an object beside the others."""
    if count < 2 or rng.random() >= PARTIAL_CAPTIONS:
        return list(range(count))
    return sorted(int(i) for i in rng.choice(count, int(rng.integers(1, count)), replace=False))


def concept_item(concept: Concept) -> tuple[str, tuple]:
    return concept.form, concept.colours


def concept_scene(trigger: str, seed: int, others: int | None = None) -> Scene:
    """A training image for one concept's LoRA: the concept beside 0-2 base objects, named in any order.

    A style is any base scene on its background. As for real concept LoRAs, the concept is shown in
    context, so the LoRA learns the concept and not "every object looks like it".
    """
    concept = CONCEPTS[trigger]
    rng = np.random.default_rng([seed, 7])
    if trigger in STYLE_TRIGGERS:
        plain = base_scene(seed)
        return render(list(plain.things), f"{plain.caption} in {concept.phrase}", NIGHT_BACKGROUND)
    count = int(rng.choice([0, 1, 2], p=[0.4, 0.4, 0.2])) if others is None else others
    items = [concept_item(concept)] + _base_items(rng, count)
    things = _things(rng, items, [concept.min_size] + [0] * count)
    caption = _caption(rng, lambda pos: [describe(things[0], concept, pos)]
                       + [describe(t, with_position=pos) for t in things[1:]])
    return render(things, caption)


def joint_scene(triggers: tuple[str, ...], seed: int) -> Scene:
    """A training image holding several concepts at once (for a joint LoRA), sometimes with a base object."""
    rng = np.random.default_rng([seed, 11])
    concepts = [CONCEPTS[t] for t in triggers]
    extra = int(rng.random() < 0.3) if len(triggers) < 3 else 0
    items = [concept_item(c) for c in concepts] + _base_items(rng, extra)
    things = _things(rng, items, [c.min_size for c in concepts] + [0] * extra)
    caption = _caption(rng, lambda pos: [describe(t, c, pos) for t, c in zip(things, concepts)]
                       + [describe(t, with_position=pos) for t in things[len(concepts):]])
    return render(things, caption)


def place(rng: np.random.Generator, form: str, colours: tuple, position: str, size: int) -> Thing:
    """A thing at a named position's anchor with 1 px of jitter."""
    x, y = POSITIONS[position]
    jx, jy = rng.integers(-1, 2, size=2)
    return Thing(form, colours, (x + int(jx), y + int(jy)), size, position)


def mixed_scene(items: list[tuple[str, str]], style: str | None = None, seed: int = 0) -> Scene:
    """Benchmark ground truth: items are (trigger or 'colour shape', position), e.g.
    [("sks", "left"), ("red circle", "right")], optionally all in a style trigger."""
    rng = np.random.default_rng(seed)
    things, phrases = [], []
    low, high = SIZE_RANGES[len(items)]
    for name, position in items:
        concept = CONCEPTS.get(name)
        if concept:
            size = int(rng.integers(max(low, concept.min_size), max(high, concept.min_size) + 1))
            thing = place(rng, concept.form, concept.colours, position, size)
        else:
            colour, shape = name.split()
            thing = place(rng, shape, (colour,), position, int(rng.integers(low, high + 1)))
        things.append(thing)
        phrases.append(describe(thing, concept))
    caption = " and ".join(phrases)
    if style:
        caption += f" in {CONCEPTS[style].phrase}"
    return render(things, caption, NIGHT_BACKGROUND if style else BACKGROUND)


OBJECT_TRIGGERS = tuple(t for t in CONCEPTS if t not in STYLE_TRIGGERS)


def random_mixed_scene(seed: int) -> Scene:
    """One to three objects, at least one a concept, sometimes in the qpl style: varied ground truth."""
    rng = np.random.default_rng([seed, 3])
    count = int(rng.integers(1, 4))
    triggers = [str(t) for t in rng.choice(OBJECT_TRIGGERS, size=int(rng.integers(1, count + 1)), replace=False)]
    concepts = [CONCEPTS[t] for t in triggers]
    extra = count - len(concepts)
    items = [concept_item(c) for c in concepts] + _base_items(rng, extra)
    things = _things(rng, items, [c.min_size for c in concepts] + [0] * extra)
    caption = _caption(rng, lambda pos: [describe(t, c, pos) for t, c in zip(things, concepts)]
                       + [describe(t, with_position=pos) for t in things[len(concepts):]])
    if rng.random() < 0.3 and "ohwx" not in triggers:
        return render(things, f"{caption} in qpl style", NIGHT_BACKGROUND)
    return render(things, caption)


FORMS = ("circle", "square", "triangle", "ring", "plus", "two_tone_triangle")


def free_colour_scene(seed: int) -> Scene:
    """Any form in any colour on any background: teaches the VAE colours no caption names."""
    rng = np.random.default_rng([seed, 5])
    count = _object_count(rng)
    colour = lambda: tuple(int(v) for v in rng.integers(0, 256, 3))
    items = [(str(rng.choice(FORMS)), (colour(), colour())) for _ in range(count)]
    things = _things(rng, items, [0] * count)
    return render(things, "", colour())


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
