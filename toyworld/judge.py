"""A rule-based judge: which shapes and concepts an image of the toy world shows, and where.

No learned model, so it is exact on rendered images and its errors on generated ones are easy to
inspect. Objects are found as connected regions that differ from the background; the form is the
best-matching template (IoU) drawn into the region's box; the colour is the nearest named colour;
a concept needs its form and a hue near its colour, with tolerance for the drift LoRAs show.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from .world import ALL_COLOURS, CONCEPTS, NIGHT_BACKGROUND, SIZE, STYLE_TRIGGERS, box_of, form_mask, position_name

TEMPLATE_FORMS = ("circle", "square", "triangle", "ring", "plus")  # a two-tone triangle is a triangle
MIN_PIXELS = 12  # smaller specks are noise, not objects (the smallest drawn object has ~30 px)
BACKGROUND_DISTANCE = 60  # RGB distance from the background that counts as foreground
HUE_TOLERANCE = 40.0  # degrees a concept's colour may drift and still count
TWO_TONE_SHARE = 0.25  # each colour of a two-tone object covers at least this share
MIN_SATURATION = 0.35  # a hue only means something on a coloured pixel: grey or black has none
ACHROMATIC = ("black",)  # concept colours told by the nearest colour, not by hue


@dataclass(frozen=True)
class Detection:
    form: str
    colour: str  # nearest name in ALL_COLOURS (of the main colour)
    colours: tuple[str, ...]  # colours covering >= TWO_TONE_SHARE, largest first
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    position: str  # left / right / top / bottom / middle
    fit: float  # IoU with the form's template
    hue: float  # degrees, of the mean colour
    concept: str | None  # trigger word of the concept it shows, if any


@dataclass(frozen=True)
class Reading:
    detections: tuple[Detection, ...]
    night: bool  # dark background: the qpl style

    def has(self, form: str, colour: str, position: str | None = None) -> bool:
        return any(d.form == form and d.colour == colour and position in (None, d.position)
                   for d in self.detections if d.concept is None)

    def has_concept(self, trigger: str, position: str | None = None) -> bool:
        if trigger == "qpl":
            return self.night
        return any(d.concept == trigger and position in (None, d.position) for d in self.detections)


def hue_of(rgb) -> float:
    return 360.0 * colorsys.rgb_to_hsv(*(np.asarray(rgb, float) / 255))[0]


def hue_distance(a: float, b: float) -> float:
    return abs((a - b + 180) % 360 - 180)


def label_regions(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels (0 = none) by repeated min-propagation; fine at 32x32."""
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), 0)
    big = mask.size + 1
    while True:
        padded = np.pad(np.where(mask, labels, big), 1, constant_values=big)
        neighbours = np.minimum.reduce([padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1],
                                        padded[1:-1, :-2], padded[1:-1, 2:]])
        new = np.where(mask, neighbours, 0)
        if np.array_equal(new, labels):
            return labels
        labels = new


def nearest_colour(pixels: np.ndarray) -> np.ndarray:
    names = list(ALL_COLOURS)
    palette = np.array([ALL_COLOURS[n] for n in names], float)
    distances = ((pixels[:, None, :].astype(float) - palette[None]) ** 2).sum(-1)
    return np.array(names)[distances.argmin(1)]


def best_form(mask: np.ndarray, box) -> tuple[str, float]:
    """The form whose template, drawn to fill the same box, overlaps the region best.

    A drawn form of size s covers s or s-1 pixel rows depending on where its centre falls, so
    templates one pixel larger, shifted by half a pixel, are tried too.
    """
    x0, y0, x1, y1 = box
    size = max(x1 - x0, y1 - y0)
    fits = {form: 0.0 for form in TEMPLATE_FORMS}
    for grow in (0, 1):
        for shift_x in (0, -0.5, 0.5) if grow else (0,):
            for shift_y in (0, -0.5, 0.5) if grow else (0,):
                center = ((x0 + x1) / 2 + shift_x, (y0 + y1) / 2 + shift_y)
                for form in TEMPLATE_FORMS:
                    template = form_mask(form, center, size + grow)
                    fits[form] = max(fits[form], (template & mask).sum() / (template | mask).sum())
    form = max(fits, key=fits.get)
    return form, float(fits[form])


def position_of(box) -> str:
    return position_name((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


def saturation_of(rgb) -> float:
    return colorsys.rgb_to_hsv(*(np.asarray(rgb, float) / 255))[1]


def concept_of(form: str, colours: tuple[str, ...], hue: float, left_hue: float, right_hue: float,
               saturated: bool) -> str | None:
    for trigger, concept in CONCEPTS.items():
        if concept.colours and concept.colours[0] in ACHROMATIC:
            if form == concept.form and colours[:1] == concept.colours[:1]:
                return trigger
            continue
        if concept.form == "two_tone_triangle":
            if form == "triangle" and len(colours) == 2 and all(
                hue_distance(h, hue_of(ALL_COLOURS[c])) < HUE_TOLERANCE
                for h, c in zip((left_hue, right_hue), concept.colours)
            ):
                return trigger
        elif saturated and form == concept.form and hue_distance(hue, hue_of(ALL_COLOURS[concept.colours[0]])) < HUE_TOLERANCE:
            return trigger
    return None


def detect(image: np.ndarray, region: np.ndarray) -> Detection:
    pixels = image[region]
    names, counts = np.unique(nearest_colour(pixels), return_counts=True)
    order = np.argsort(-counts)
    colours = tuple(str(names[i]) for i in order if counts[i] >= TWO_TONE_SHARE * len(pixels))
    box = box_of(region)
    form, fit = best_form(region, box)
    columns = np.arange(SIZE)[None, :] < (box[0] + box[2]) / 2
    halves = [region & columns, region & ~columns]
    left_hue, right_hue = (hue_of(image[h].mean(0)) if h.any() else 0.0 for h in halves)
    mean = pixels.mean(0)
    hue = hue_of(mean)
    return Detection(form, str(names[order[0]]), colours, box, position_of(box), fit, hue,
                     concept_of(form, colours, hue, left_hue, right_hue, saturation_of(mean) >= MIN_SATURATION))


def split_by_colour(image: np.ndarray, region: np.ndarray) -> list[np.ndarray]:
    """Touching objects of different colours: the connected parts of each colour."""
    colour_map = np.full(region.shape, "", dtype=object)
    colour_map[region] = nearest_colour(image[region])
    parts = []
    for colour in set(colour_map[region]):
        labels = label_regions(colour_map == colour)
        parts += [labels == i for i in np.unique(labels[labels > 0]) if (labels == i).sum() >= MIN_PIXELS]
    return parts


def detect_region(image: np.ndarray, region: np.ndarray) -> list[Detection]:
    """One object, or a two-tone concept, or else several touching objects split by colour."""
    whole = detect(image, region)
    if len(whole.colours) == 1 or whole.concept:
        return [whole]
    return [detect(image, part) for part in split_by_colour(image, region)]


def background_of(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return np.median(border, axis=0)


def judge(image) -> Reading:
    """Read a 32x32 RGB image (PIL image or uint8 array) of the toy world."""
    image = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if image.shape[:2] != (SIZE, SIZE):
        raise ValueError(f"judge expects {SIZE}x{SIZE} images, got {image.shape[:2]}")
    background = background_of(image)
    foreground = np.sqrt(((image.astype(float) - background) ** 2).sum(-1)) > BACKGROUND_DISTANCE
    labels = label_regions(foreground)
    ids, sizes = np.unique(labels[labels > 0], return_counts=True)
    detections = [d for i, n in zip(ids, sizes) if n >= MIN_PIXELS for d in detect_region(image, labels == i)]
    night = np.linalg.norm(background - NIGHT_BACKGROUND) < np.linalg.norm(background - 235)
    return Reading(tuple(detections), bool(night))


def _centre_inside(box, region) -> bool:
    """Whether a detection's box centre lies in a LoRA region (a compose Box or mask)."""
    from compose.regions import region_mask

    x, y = int((box[0] + box[2]) // 2), int((box[1] + box[3]) // 2)
    return bool(region_mask(region, SIZE, SIZE)[min(y, SIZE - 1), min(x, SIZE - 1)] > 0)


def check_composition(loras, height: int, width: int) -> None:
    """Before an evaluation: toy-world sized images, and every LoRA calls a concept the judge knows."""
    if (height, width) != (SIZE, SIZE):
        raise ValueError(f"images must be {SIZE}x{SIZE} px, not {height}x{width}; set size = {SIZE}")
    for lora in loras:
        if lora.trigger not in CONCEPTS:
            raise ValueError(
                f"LoRA '{lora.adapter}' has trigger {lora.trigger!r}; the toy-world judge knows {sorted(CONCEPTS)}"
            )


def expected_concepts(loras, prompt: str) -> list[str]:
    """Each LoRA's trigger, then any other concept trigger the prompt names: a LoRA trained on two
    concepts at once (the benchmark's ceiling) is asked for both although it has one trigger."""
    triggers = [lora.trigger for lora in loras]
    words = prompt.split()
    return triggers + [t for t in CONCEPTS if t in words and t not in triggers]


def composition_scores(image, loras, prompt: str = "") -> dict:
    """Evaluation row fields: which concepts the image shows, and whether each LoRA's sits in its region.

    `all_in_region` is None when no LoRA has a region.
    """
    reading = judge(image)
    present = {trigger: reading.has_concept(trigger) for trigger in expected_concepts(loras, prompt)}
    placed = {
        lora.trigger: any(d.concept == lora.trigger and _centre_inside(d.box, lora.region) for d in reading.detections)
        for lora in loras
        if lora.region is not None and lora.trigger not in STYLE_TRIGGERS
    }
    return {
        "judge_present": present,
        "all_present": all(present.values()),
        "judge_in_region": placed,
        "all_in_region": all(placed.values()) if placed else None,
    }
