import itertools

import numpy as np
import pytest

from toyworld.judge import judge
from toyworld.world import CONCEPTS, base_scene, concept_scene, mixed_scene


def test_judge_reads_rendered_scenes():
    for seed in range(60):
        scene = base_scene(seed)
        reading = judge(scene.image)
        assert len(reading.detections) == len(scene.things), scene.caption
        for thing in scene.things:
            assert reading.has(thing.form, thing.colours[0], thing.position), scene.caption


@pytest.mark.parametrize("trigger", list(CONCEPTS))
def test_judge_finds_concepts(trigger):
    for seed in range(10):
        scene = concept_scene(trigger, seed)
        reading = judge(scene.image)
        position = None if trigger == "qpl" else scene.things[0].position
        assert reading.has_concept(trigger, position), scene.caption
        assert [d.concept for d in reading.detections if d.concept] == ([] if trigger == "qpl" else [trigger])


def test_judge_reads_mixed_scenes():
    names = ["sks", "zwx", "vrn", "red circle"]
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
