import itertools

import numpy as np
import pytest

from toyworld.judge import judge
from toyworld.world import (
    CONCEPTS, OBJECT_TRIGGERS, base_scene, concept_scene, joint_scene, mixed_scene, random_mixed_scene,
)


def judged_right(scene, triggers) -> bool:
    """Every object found at its place, as a concept when it is one, and nothing else found."""
    reading = judge(scene.image)
    if len(reading.detections) != len(scene.things):
        return False
    for thing, trigger in zip(scene.things, triggers):
        if trigger and not reading.has_concept(trigger, thing.position):
            return False
        if not trigger and not reading.has(thing.form, thing.colours[0], thing.position):
            return False
    return True


def test_judge_reads_rendered_scenes():
    wrong = [seed for seed in range(300) if not judged_right(base_scene(seed), [None] * 3)]
    assert wrong == []


@pytest.mark.parametrize("pair", [("sks", "zwx"), ("zwx", "ohwx"), ("sks", "zwx", "vrn")])
def test_judge_reads_joint_scenes(pair):
    scenes = [joint_scene(pair, seed) for seed in range(60)]
    assert [s.caption for s in scenes if not judged_right(s, list(pair) + [None])] == []


def test_judge_reads_random_mixed_scenes():
    for seed in range(100):
        scene = random_mixed_scene(seed)
        reading = judge(scene.image)
        assert len(reading.detections) == len(scene.things), scene.caption
        assert reading.night == ("qpl" in scene.caption)
        for trigger in OBJECT_TRIGGERS:
            if f"{trigger} " in scene.caption:
                assert reading.has_concept(trigger), scene.caption


def test_a_black_ring_or_a_pink_disc_is_no_concept():
    from toyworld.world import Thing, render

    for form, colour in (("ring", "black"), ("circle", "pink"), ("ring", "purple")):
        scene = render([Thing(form, (colour,), (16, 16), 13)], "")
        assert [d.concept for d in judge(scene.image).detections] == [None], (form, colour)


@pytest.mark.parametrize("trigger", list(CONCEPTS))
def test_judge_finds_concepts(trigger):
    for seed in range(40):
        scene = concept_scene(trigger, seed)
        reading = judge(scene.image)
        position = None if trigger == "qpl" else scene.things[0].position
        assert reading.has_concept(trigger, position), scene.caption
        assert [d.concept for d in reading.detections if d.concept] == ([] if trigger == "qpl" else [trigger])


def test_judge_reads_mixed_scenes():
    names = ["sks", "zwx", "vrn", "ohwx", "red circle"]
    for a, b in itertools.permutations(names, 2):
        reading = judge(mixed_scene([(a, "left"), (b, "right")], seed=2).image)
        for name, position in ((a, "left"), (b, "right")):
            if name in CONCEPTS:
                assert reading.has_concept(name, position), (a, b)
            else:
                colour, shape = name.split()
                assert reading.has(shape, colour, position), (a, b)


def test_plain_base_colours_are_not_concepts():
    reading = judge(mixed_scene([("purple circle", "left"), ("blue triangle", "right")]).image)
    assert not any(d.concept for d in reading.detections)


def test_judge_rejects_wrong_size():
    with pytest.raises(ValueError, match="32x32"):
        judge(np.zeros((64, 64, 3), np.uint8))


def test_a_disc_of_many_colours_is_no_concept():
    """Generated confetti in a round blob: no colour holds a clear share, so it has no main colour."""
    from toyworld.world import ALL_COLOURS, form_mask

    image = np.full((32, 32, 3), 235, np.uint8)
    disc = form_mask("circle", (16, 16), 14)
    stripes = ["red", "blue", "green", "yellow", "purple"]
    for row in range(32):
        image[row][disc[row]] = ALL_COLOURS[stripes[row % 5]]
    assert not any(d.concept for d in judge(image).detections)


def test_a_joint_lora_is_asked_for_every_concept_its_prompt_names():
    """The ceiling LoRA has one trigger but draws a pair: both concepts are judged, from the prompt."""
    from types import SimpleNamespace

    from toyworld.judge import composition_scores

    scene = mixed_scene([("sks", "left"), ("zwx", "right")])
    joint = [SimpleNamespace(trigger="sks", region=None)]
    scores = composition_scores(scene.image, joint, "a sks square on the left and a zwx circle on the right")
    assert scores["judge_present"] == {"sks": True, "zwx": True} and scores["all_in_region"] is None
    missing = composition_scores(mixed_scene([("sks", "left")]).image, joint, "a sks square and a zwx circle")
    assert missing["judge_present"] == {"sks": True, "zwx": False} and not missing["all_present"]
