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


def test_captions_name_only_what_is_drawn_and_sometimes_leave_objects_out():
    from toyworld.world import PARTIAL_CAPTIONS

    partial, several = 0, 0
    for seed in range(300):
        scene = base_scene(seed)
        drawn = [f"{thing.colours[0]} {thing.form}" for thing in scene.things]
        named = [" ".join(phrase.split()[1:3]) for phrase in scene.caption.split(" and ")]
        assert named and all(name in drawn for name in named), scene.caption
        assert not any(trigger in scene.caption.split() for trigger in CONCEPTS)
        if len(drawn) > 1:
            several += 1
            partial += len(named) < len(drawn)
        else:
            assert len(named) == 1
    assert abs(partial / several - PARTIAL_CAPTIONS) < 0.1


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


def test_scenes_hold_one_to_three_objects_anywhere():
    scenes = [base_scene(seed) for seed in range(300)]
    counts = {len(s.things) for s in scenes}
    assert counts == {1, 2, 3}
    centres = np.array([t.center for s in scenes for t in s.things])
    assert centres[:, 0].min() <= 8 and centres[:, 0].max() >= 24  # not a few fixed anchors
    assert len({tuple(c) for c in centres}) > 100


@pytest.mark.parametrize("seed", range(40))
def test_objects_never_touch(seed):
    scene = base_scene(seed)
    for i, a in enumerate(scene.boxes):
        for b in scene.boxes[i + 1:]:
            assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1], scene.caption


def test_caption_positions_are_what_a_viewer_sees():
    from toyworld.world import position_name

    for seed in range(60):
        scene = base_scene(seed)
        for thing, box in zip(scene.things, scene.boxes):
            assert thing.position == position_name((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)


def test_ring_hole_spans_two_latent_pixels():
    from toyworld.world import concept_scene

    for seed in range(30):
        thing = concept_scene("zwx", seed).things[0]
        assert thing.size - 2 * 3 >= 4  # hole diameter in px; the latent is 2x smaller


def test_concept_scenes_put_the_trigger_anywhere_in_the_caption():
    first = [concept_scene("sks", seed).caption.split()[1] == "sks" for seed in range(200)]
    assert 0.3 < np.mean(first) < 0.9  # sometimes first, sometimes after other objects
    assert any(len(concept_scene("sks", seed).things) > 1 for seed in range(20))


def test_joint_scenes_hold_both_concepts():
    from toyworld.world import joint_scene

    for seed in range(20):
        scene = joint_scene(("zwx", "ohwx"), seed)
        assert "zwx circle" in scene.caption and "ohwx circle" in scene.caption
        assert [t.form for t in scene.things[:2]] == ["ring", "circle"]
