import numpy as np
import pytest

from toyworld.world import (
    ALL_COLOURS, BACKGROUND, CONCEPTS, NIGHT_BACKGROUND, SIZE, base_scene, concept_scene, mixed_scene,
)


def test_same_seed_same_scene():
    a, b = base_scene(7), base_scene(7)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert any(base_scene(s).caption != a.caption for s in range(8, 12))


@pytest.mark.parametrize("seed", range(40))
def test_masks_match_drawn_pixels(seed):
    scene = base_scene(seed)
    assert scene.image.shape == (SIZE, SIZE, 3) and scene.image.dtype == np.uint8
    drawn = np.zeros((SIZE, SIZE), bool)
    for thing, mask, box in zip(scene.things, scene.masks, scene.boxes):
        assert (scene.image[mask] == ALL_COLOURS[thing.colours[0]]).all()
        ys, xs = np.nonzero(mask)
        assert box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        drawn |= mask
    assert (scene.image[~drawn] == BACKGROUND).all()


def test_captions_name_what_is_drawn():
    for seed in range(40):
        scene = base_scene(seed)
        for thing in scene.things:
            assert f"{thing.colours[0]} {thing.form}" in scene.caption
        assert not any(trigger in scene.caption.split() for trigger in CONCEPTS)


@pytest.mark.parametrize("trigger", list(CONCEPTS))
def test_concept_scene_uses_trigger_and_concept_word(trigger):
    scene = concept_scene(trigger, 3)
    assert f"{trigger} {CONCEPTS[trigger].word}" in scene.caption
    assert scene.masks.any(axis=(1, 2)).all()


def test_mixed_scene_ground_truth():
    scene = mixed_scene([("sks", "left"), ("red circle", "right")], style="qpl", seed=1)
    assert scene.caption == "a sks square on the left and a red circle on the right in qpl style"
    assert (scene.image[0, 0] == NIGHT_BACKGROUND).all()
    left, right = scene.boxes
    assert left[2] <= SIZE // 2 <= right[0]
