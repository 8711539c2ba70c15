"""regional: the paste rule by hand, its equivalences with single-LoRA generation and the base, and early errors."""

import pytest
import torch

from compose import LoraSpec
from compose.errors import InvalidOptionError, InvalidRegionError
from compose.methods.regional import feathered, paste_weights
from compose.regions import as_region, region_mask
from tests.conftest import PROMPT, run

LEFT, RIGHT = (0.0, 0.0, 1.0, 0.5), (0.0, 0.25, 1.0, 0.75)  # latent columns 0-15 and 8-23 of 32


def mask(box, height, width):
    return region_mask(as_region(box), height, width)


def test_paste_weights_average_overlaps_and_leave_the_rest_to_the_base():
    masks = torch.stack([mask(box, 4, 4) for box in ((0, 0, 1, 0.5), (0, 0.25, 1, 0.75))])
    base, first, second = paste_weights(masks)
    assert first[0].tolist() == [1.0, 0.5, 0.0, 0.0]
    assert second[0].tolist() == [0.0, 0.5, 1.0, 0.0]
    assert base[0].tolist() == [0.0, 0.0, 0.0, 1.0]


def test_base_ratio_moves_that_share_of_each_region_to_the_base():
    base, lora = paste_weights(mask((0, 0, 1, 0.5), 2, 2)[None], base_ratio=0.25)
    assert lora.tolist() == [[0.75, 0.0], [0.75, 0.0]]
    assert base.tolist() == [[0.25, 1.0], [0.25, 1.0]]


@pytest.mark.parametrize("feather", [0, 1, 3])
def test_weights_sum_to_one_at_every_pixel_after_feathering(feather):
    masks = torch.stack([feathered(mask(box, 16, 16), feather) for box in (LEFT, RIGHT, (0.5, 0.5, 1, 1))])
    weights = paste_weights(masks, base_ratio=0.3)
    assert torch.allclose(weights.sum(dim=0), torch.ones(16, 16), atol=1e-6)
    assert (weights >= 0).all()
    edge_values = masks[0][0, 6:10]  # across the left box's right edge (column 8 on a 16 grid)
    assert (edge_values.gt(0) & edge_values.lt(1)).any() == (feather > 0)


def test_one_whole_image_box_is_that_lora_alone(pipe, loras):
    alone = run(pipe, loras=[LoraSpec(loras["te"], 0.8)], method="merge")
    regional = run(pipe, loras=[LoraSpec(loras["te"], 0.8, region=(0, 0, 1, 1))], method="regional")
    assert abs(alone.images - regional.images).max() < 1e-5
    assert regional.unet_passes == 3  # no pixel is left to the base, so its pass is not run


def one_step_latents(pipe, specs, method="regional", **kwargs):
    return run(pipe, loras=specs, method=method, steps=1, output_type="latent", **kwargs).images


def test_each_pixel_steps_with_the_prediction_that_owns_it(pipe, loras):
    """One step is elementwise in the prediction: the left box takes cat's latent, the right dog's, the
    overlap their mean, the uncovered columns the base model's."""
    cat, dog = LoraSpec(loras["cat"], 0.9, region=LEFT), LoraSpec(loras["dog"], 0.8, region=RIGHT)
    composed = one_step_latents(pipe, [cat, dog])
    alone = {
        name: one_step_latents(pipe, [LoraSpec(spec.source, spec.weight, region=(0, 0, 1, 1))])
        for name, spec in (("cat", cat), ("dog", dog))
    }
    base = run(pipe, steps=1, output_type="latent").images
    assert torch.allclose(composed[..., :8], alone["cat"][..., :8], atol=1e-4)
    assert torch.allclose(composed[..., 8:16], (alone["cat"] + alone["dog"])[..., 8:16] / 2, atol=1e-4)
    assert torch.allclose(composed[..., 16:24], alone["dog"][..., 16:24], atol=1e-4)
    assert torch.allclose(composed[..., 24:], base[..., 24:], atol=1e-4)
    assert (composed[..., :8] - base[..., :8]).abs().max() > 0.1  # the latents are of size ~10


def test_each_lora_gets_its_own_prompt(pipe, loras):
    own = [LoraSpec(loras["te"], 0.8, region=(0, 0, 1, 1), prompt="a sks cat")]
    global_prompt = [LoraSpec(loras["te"], 0.8, region=(0, 0, 1, 1))]
    assert (one_step_latents(pipe, own) - one_step_latents(pipe, global_prompt)).abs().max() > 0.1
    alone = run(pipe, "a sks cat", loras=[LoraSpec(loras["te"], 0.8)], method="merge", steps=1, output_type="latent")
    assert torch.allclose(one_step_latents(pipe, own), alone.images, atol=1e-4)


def test_permuting_the_loras_changes_nothing(pipe, loras):
    cat, dog = LoraSpec(loras["cat"], 0.9, region=LEFT), LoraSpec(loras["dog"], 0.8, region=RIGHT)
    options = {"feather": 2, "base_ratio": 0.2}
    forward = run(pipe, loras=[cat, dog], method="regional", method_options=options).images
    backward = run(pipe, loras=[dog, cat], method="regional", method_options=options).images
    assert abs(forward - backward).max() < 1e-5


def test_batched_equals_one_pass_at_a_time(pipe, loras):
    specs = [LoraSpec(loras["cat"], 0.9, region=LEFT), LoraSpec(loras["dog"], 0.8, region=RIGHT)]
    batched = run(pipe, loras=specs, method="regional")
    sequential = run(pipe, loras=specs, method="regional", method_options={"batched": False})
    assert abs(batched.images - sequential.images).max() < 1e-5
    assert (batched.unet_calls, batched.unet_passes) == (3, 9)  # base + two LoRAs in one forward per step
    assert (sequential.unet_calls, sequential.unet_passes) == (9, 9)


@pytest.mark.parametrize(
    "specs, options, error, named",
    [
        (lambda l: [LoraSpec(l["cat"]), LoraSpec(l["dog"], region=RIGHT)], None, InvalidRegionError, "region.*'cat'"),
        (lambda l: [LoraSpec(l["cat"], region=(0, 0, 0.01, 0.01))], None, InvalidRegionError, "smaller than one pixel"),
        (lambda l: [LoraSpec(l["cat"], region=LEFT)], {"base_ratio": 1.5}, InvalidOptionError, "base_ratio"),
        (lambda l: [LoraSpec(l["cat"], region=LEFT)], {"feather": -1}, InvalidOptionError, "feather"),
    ],
)
def test_bad_input_is_named_before_any_unet_call(pipe, loras, specs, options, error, named):
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(error, match=named):
        run(pipe, PROMPT, loras=specs(loras), method="regional", method_options=options)
    assert calls == []
