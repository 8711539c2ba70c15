"""loratorio (LoRAtorio): patch cosine, SoftMin weights, mixing, and the method's equivalences in the pipeline."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from compose import LoraSpec
from compose.errors import InvalidOptionError
from compose.methods.loratorio import mix, patch_cosine, softmin_weights
from tests.conftest import PROMPT, run

THREE = "a sks cat and a zwx dog and a vrn car"
UNIFORM = {"temperature": math.inf, "recenter": 0.0}


CLOSE = dict(rtol=1e-5, atol=1e-3)  # latents reach |40|; batched and merged adapters round differently


def latents(pipe, loras, method="loratorio", options=None, prompt=PROMPT, **kwargs):
    return run(pipe, prompt, loras=loras, method=method, method_options=options, output_type="latent", **kwargs)


# --- pure functions -------------------------------------------------------------------------------


def test_patch_cosine_is_the_cosine_of_each_patch_over_all_channels():
    a, b = torch.randn(3, 2, 4, 6), torch.randn(3, 2, 4, 6)  # (batch, C, h, w)
    got = patch_cosine(a, b, 2)
    assert got.shape == (3, 2, 3)
    by_hand = F.cosine_similarity(a[1, :, 2:4, 4:6].flatten(), b[1, :, 2:4, 4:6].flatten(), dim=0)
    assert torch.allclose(got[1, 1, 2], by_hand, atol=1e-6)
    assert torch.allclose(patch_cosine(a, b, 1), F.cosine_similarity(a, b, dim=1), atol=1e-6)  # per pixel
    whole = patch_cosine(a[:, :, :4, :4], b[:, :, :4, :4], 4)  # one patch: one weight per LoRA
    assert whole.shape == (3, 1, 1)
    assert torch.allclose(whole[:, 0, 0], F.cosine_similarity(a[:, :, :4, :4].flatten(1), b[:, :, :4, :4].flatten(1)))
    assert torch.equal(patch_cosine(torch.zeros(1, 2, 2, 2), b[:1, :, :2, :2], 2), torch.zeros(1, 1, 1))  # eps guard


def test_softmin_weights_sum_to_one_per_patch_and_favour_the_lora_that_diverges_most_from_the_base():
    similarity = torch.tensor([[[0.9, -0.2]], [[0.1, 0.5]], [[0.4, 0.4]]])  # (LoRAs, batch, patches)
    weights = softmin_weights(similarity, 1.0)
    assert (weights >= 0).all() and torch.allclose(weights.sum(dim=0), torch.ones(1, 2))
    assert weights[:, 0, 0].argmax() == 1 and weights[:, 0, 1].argmax() == 0  # the lowest cosine weighs most
    assert torch.allclose(weights[:, 0, 0], torch.softmax(-similarity[:, 0, 0], dim=0))
    cold = softmin_weights(similarity, 1e-4)
    assert torch.equal(cold[:, 0, 0], torch.tensor([0.0, 1.0, 0.0]))  # T -> 0: one-hot argmin
    assert torch.equal(softmin_weights(similarity, math.inf), torch.full_like(similarity, 1 / 3))


def test_top_k_zeroes_the_loras_closest_to_the_base_and_renormalises():
    similarity = torch.tensor([[[0.9]], [[0.1]], [[0.4]]])
    kept = softmin_weights(similarity, 1.0, top_k=2)
    assert kept[0, 0, 0] == 0 and torch.allclose(kept.sum(dim=0), torch.ones(1, 1))
    assert torch.allclose(kept[1:, 0, 0], torch.softmax(-similarity[1:, 0, 0], dim=0))
    assert torch.equal(softmin_weights(similarity, 1.0, top_k=3), softmin_weights(similarity, 1.0))  # k = N: static


def test_scaling_one_loras_patch_leaves_the_weights_unchanged():
    base, predictions = torch.randn(1, 4, 4, 4), torch.randn(2, 1, 4, 4, 4)
    scaled = predictions.clone()
    scaled[0, :, :, :2, :2] *= 7.0
    weights = [softmin_weights(patch_cosine(p, base.expand_as(p), 2), 0.5) for p in (predictions, scaled)]
    assert torch.allclose(*weights, atol=1e-6)


def test_mix_spreads_each_patch_weight_over_its_pixels():
    predictions = torch.stack([torch.ones(1, 2, 4, 4), torch.zeros(1, 2, 4, 4)])
    weights = torch.tensor([[[[1.0, 0.25], [0.0, 0.5]]], [[[0.0, 0.75], [1.0, 0.5]]]])  # (LoRAs, batch, 2, 2)
    mixed = mix(predictions, weights, 2)
    assert mixed.shape == (1, 2, 4, 4)
    assert torch.equal(mixed[0, 1], torch.tensor([[1, 1, 0.25, 0.25], [1, 1, 0.25, 0.25], [0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]]))


# --- the method in the pipeline --------------------------------------------------------------------


def test_uniform_weights_without_recentring_equal_composite(pipe, loras):
    specs = [loras["cat"], loras["dog"], loras["te"]]
    composite = latents(pipe, specs, "composite", steps=2).images
    ours = latents(pipe, specs, options=UNIFORM, steps=2)
    assert torch.allclose(ours.images, composite, **CLOSE)
    assert (ours.unet_calls, ours.unet_passes) == (2, 8)  # base + 3 LoRAs in one forward per step


def test_one_lora_without_recentring_is_that_lora_and_recentring_pulls_toward_the_base(pipe, loras):
    spec = LoraSpec(loras["te"], 0.8)
    alone = latents(pipe, [spec], "merge").images
    assert torch.allclose(latents(pipe, [spec], options={"recenter": 0.0}).images, alone, **CLOSE)
    recentred = latents(pipe, [spec]).images
    assert (recentred - alone).abs().max() > 0.1  # the unconditional half is averaged with the base's


def test_lora_order_does_not_matter_and_batched_equals_sequential(pipe, loras):
    specs = [loras["cat"], loras["dog"], loras["car"]]
    forward = latents(pipe, specs, prompt=THREE).images
    assert torch.allclose(latents(pipe, specs[::-1], prompt=THREE).images, forward, **CLOSE)
    sequential = latents(pipe, specs, options={"batched": False}, prompt=THREE)
    assert torch.allclose(sequential.images, forward, **CLOSE) and sequential.unet_calls == 3 * 4


def test_dynamic_mode_keeps_k_loras_per_patch_and_k_of_n_is_static(pipe, loras):
    specs = [loras["cat"], loras["dog"], loras["car"]]
    static = latents(pipe, specs, steps=2, prompt=THREE)
    assert torch.allclose(latents(pipe, specs, options={"top_k": 3}, steps=2, prompt=THREE).images, static.images, **CLOSE)
    dynamic = latents(pipe, specs, options={"top_k": 1}, steps=2, prompt=THREE)
    weights = dynamic.extras["masks"]  # (LoRAs, h / p, w / p) of the last step
    assert weights.shape == (3, 16, 16) and set(weights.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(weights.sum(dim=0), torch.ones(16, 16)) and len(weights.flatten(1).amax(1).nonzero()) > 1
    assert (dynamic.images - static.images).abs().max() > 0.1


def test_a_second_call_gives_what_a_fresh_one_gives(pipe, loras):
    specs = [loras["cat"], loras["dog"]]
    first = latents(pipe, specs, options={"patch_size": 4}).images
    latents(pipe, [loras["car"]], options={"top_k": 1}, prompt="a vrn car", height=64, width=96)
    assert torch.equal(latents(pipe, specs, options={"patch_size": 4}).images, first)


@pytest.mark.parametrize(
    "options, size, message",
    [
        ({"patch_size": 3}, {}, r"patch_size=3 must divide the latent size 32x32 \(image 64x64\); use one of \[1, 2, 4, 8, 16, 32\]"),
        ({"patch_size": 8}, {"height": 72}, r"patch_size=8 must divide the latent size 36x32"),
        ({"top_k": 3}, {}, r"top_k=3 keeps more LoRAs than the 2 given; use at most 2"),
        ({"temperature": 0}, {}, r"temperature must be a number > 0"),
        ({"recenter": 1.5}, {}, r"recenter must be a number in \[0, 1\]"),
        ({"top_k": 0}, {}, r"top_k must be a whole number >= 1"),
    ],
)
def test_bad_options_are_named_before_any_unet_call(pipe, loras, options, size, message):
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(InvalidOptionError, match=message):
        run(pipe, PROMPT, loras=[loras["cat"], loras["dog"]], method="loratorio", method_options=options, **size)
    assert calls == []

