"""composer (LoRA-Composer): region injection, isolation, re-initialisation, guided updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from PIL import Image

from compose import LoraSpec
from compose.adapters import activate, tuner_layers
from compose.attention.base import ComposableAttnProcessor, merge_heads, split_heads
from compose.attention.layers import attention_layers, install_processors
from compose.attention.regions import (
    MapRecorder,
    RegionCrossAttnProcessor,
    RegionIsolationAttnProcessor,
    RegionState,
    isolation_mask,
)
from compose.context import DenoiseContext
from compose.errors import InvalidOptionError, InvalidRegionError, TriggerNotInPromptError
from compose.loading import load_adapters, resolve_loras
from compose.lora_delta import base_projection, lora_delta
from compose.methods import build_method
from compose.methods.composer import ComposerOptions, default_regional_prompt, guidance_continues
from compose.region_guidance import (
    box_gaussian,
    composer_loss,
    concept_enhancement_loss,
    fill_loss,
    gaussian_smooth,
    region_restriction_loss,
    reinitialize_latents,
    smoothing_for,
)
from compose.regions import Box, region_mask
from pipelines import composition
from tests.conftest import PROMPT, generator

CROSS = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"  # first cross-attention layer run
SELF = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
GRID = (16, 16)  # its resolution on the 32x32 latent
LEFT, RIGHT = Box(0.0, 0.0, 1.0, 0.5), Box(0.25, 0.5, 0.75, 1.0)
FAST = dict(reinit=False, guidance=False)


def latents_of(pipe, prompt, steps=2, **kwargs):
    return pipe(prompt, num_inference_steps=steps, generator=generator(0), output_type="latent", **kwargs).images


def module(pipe, name):
    return pipe.unet.get_submodule(name)


def box_masks(*boxes, grid=GRID):
    return torch.stack([region_mask(box, *grid).flatten() > 0 for box in boxes])


@pytest.fixture()
def loaded(pipe, loras):
    """The pipeline with the cat and dog LoRAs loaded as adapters 'cat'/'dog' and none active."""
    resolved = resolve_loras(pipe, [LoraSpec(loras["cat"]), LoraSpec(loras["dog"])])
    load_adapters(pipe, resolved)
    activate(pipe.unet, {"cat": 1.0, "dog": 1.0})  # peft scaling = weight * alpha / rank
    activate(pipe.unet, {})
    return pipe


class CrossKVOutLoraProcessor(ComposableAttnProcessor):
    """Reference: one LoRA's to_k/to_v/to_out deltas on every pixel, base queries (whether peft has it active or not)."""

    def __init__(self, adapter):
        self.adapter = adapter

    def block(self, attn, hidden_states, context, attention_mask):
        query = base_projection(attn.to_q, hidden_states)
        key = base_projection(attn.to_k, context) + lora_delta(attn.to_k, self.adapter, context)
        value = base_projection(attn.to_v, context) + lora_delta(attn.to_v, self.adapter, context)
        out = merge_heads(self.attend(attn, *split_heads(attn, query, key, value), attention_mask))
        return base_projection(attn.to_out[0], out) + lora_delta(attn.to_out[0], self.adapter, out)


# --- concept injection -------------------------------------------------------------------------


def test_whole_image_box_equals_lora_in_cross_attention_kv_out_only(pipe, loras):
    prompt = "a sks cat"
    base = latents_of(pipe, prompt)
    spec = LoraSpec(loras["cat"], region=(0, 0, 1, 1), prompt=prompt)
    composed = latents_of(pipe, prompt, loras=[spec], method="composer", method_options=FAST)

    load_adapters(pipe, resolve_loras(pipe, [LoraSpec(loras["cat"])]))
    activate(pipe.unet, {"cat": 1.0})
    activate(pipe.unet, {})
    cross = {layer.name: CrossKVOutLoraProcessor("cat") for layer in attention_layers(pipe.unet) if layer.cross}
    install_processors(pipe.unet, cross)
    reference = latents_of(pipe, prompt)

    assert (composed - base).abs().max() > 1e-2  # the LoRA does act
    torch.testing.assert_close(composed, reference, atol=1e-5, rtol=1e-5)


def test_all_layers_with_a_whole_image_box_is_the_lora_everywhere_but_cross_attention_queries(pipe, loras):
    """all_layers adds the LoRA's other layers (here its self-attention) inside the box; the box is everything."""
    prompt = "a sks cat"
    spec = LoraSpec(loras["cat"], region=(0, 0, 1, 1), prompt=prompt)
    cross_only = latents_of(pipe, prompt, loras=[spec], method="composer", method_options=FAST)
    composed = latents_of(pipe, prompt, loras=[spec], method="composer", method_options={**FAST, "all_layers": True})
    base = latents_of(pipe, prompt)

    load_adapters(pipe, resolve_loras(pipe, [LoraSpec(loras["cat"])]))
    activate(pipe.unet, {"cat": 1.0})
    cross = {layer.name: CrossKVOutLoraProcessor("cat") for layer in attention_layers(pipe.unet) if layer.cross}
    install_processors(pipe.unet, cross)
    reference = latents_of(pipe, prompt)

    assert (composed - cross_only).abs().max() > 1e-2  # the other layers do act
    torch.testing.assert_close(composed, reference, atol=1e-5, rtol=1e-5)
    activate(pipe.unet, {})
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    torch.testing.assert_close(latents_of(pipe, prompt), base)  # no hook left behind


def test_outside_every_box_the_first_layer_gives_the_base_output(loaded):
    attn = module(loaded, CROSS)
    torch.manual_seed(0)
    hidden, context = torch.randn(2, 256, attn.inner_dim), torch.randn(2, 77, 32)
    masks = box_masks(LEFT, RIGHT)
    state = RegionState(["cat", "dog"], [torch.randn(2, 77, 32), torch.randn(2, 77, 32)])
    out = RegionCrossAttnProcessor(state, masks)(attn, hidden, context)
    base = AttnProcessor2_0()(attn, hidden, context)

    outside = ~masks.any(dim=0)
    assert outside.any()
    assert torch.equal(out[:, outside], base[:, outside])
    for mask in masks:
        assert not torch.allclose(out[:, mask], base[:, mask])


def test_overlapping_regions_average_their_outputs(loaded):
    attn = module(loaded, CROSS)
    torch.manual_seed(1)
    hidden, context = torch.randn(1, 256, attn.inner_dim), torch.randn(1, 77, 32)
    regional = [torch.randn(1, 77, 32), torch.randn(1, 77, 32)]
    masks = box_masks(LEFT, Box(0.5, 0.25, 1.0, 0.75))
    both = RegionCrossAttnProcessor(RegionState(["cat", "dog"], regional), masks)(attn, hidden, context)
    only = [
        RegionCrossAttnProcessor(RegionState([name], [regional[k]]), masks[k : k + 1])(attn, hidden, context)
        for k, name in enumerate(["cat", "dog"])
    ]
    overlap, first_only = masks[0] & masks[1], masks[0] & ~masks[1]
    torch.testing.assert_close(both[:, overlap], (only[0][:, overlap] + only[1][:, overlap]) / 2)
    torch.testing.assert_close(both[:, first_only], only[0][:, first_only])


def test_processors_without_regions_equal_attn_processor_2_0(loaded):
    torch.manual_seed(2)
    cross, self_attn = module(loaded, CROSS), module(loaded, SELF)
    hidden, context = torch.randn(2, 256, cross.inner_dim), torch.randn(2, 77, 32)
    empty = RegionCrossAttnProcessor(RegionState([]), torch.zeros(0, 256, dtype=torch.bool))
    assert torch.equal(empty(cross, hidden, context), AttnProcessor2_0()(cross, hidden, context))
    assert torch.equal(RegionIsolationAttnProcessor()(self_attn, hidden), AttnProcessor2_0()(self_attn, hidden))
    assert isolation_mask(box_masks(LEFT)) is None  # one region blocks nothing: unmasked SDPA


# --- concept isolation -------------------------------------------------------------------------


def test_isolation_mask_blocks_only_pairs_of_different_regions():
    masks = box_masks(LEFT, RIGHT)
    allowed = isolation_mask(masks)
    assert allowed.shape == (256, 256)  # one (N, N) mask, never (batch * heads, N, N)
    left, right = masks
    background = ~masks.any(dim=0)
    assert not allowed[left][:, right].any() and not allowed[right][:, left].any()
    assert allowed[left][:, left].all() and allowed[left][:, background].all()
    assert allowed[background].all()

    overlapping = isolation_mask(box_masks(LEFT, Box(0.0, 0.25, 1.0, 0.75)))
    assert overlapping.diagonal().all()  # no query loses every key, even inside an overlap


def test_self_attention_between_boxes_is_exactly_zero(loaded):
    attn = module(loaded, SELF)
    torch.manual_seed(3)
    hidden = torch.randn(2, 256, attn.inner_dim)
    masks = box_masks(LEFT, RIGHT)
    allowed = isolation_mask(masks)
    state = RegionState([])
    state.recorder = MapRecorder(0, [], [SELF], keep_grad=False)
    RegionIsolationAttnProcessor(allowed, state, SELF)(attn, hidden)
    probs = state.recorder.self_maps.maps[SELF]
    left, right = masks
    assert torch.count_nonzero(probs[:, left][:, :, right]) == 0
    assert torch.count_nonzero(probs[:, right][:, :, left]) == 0
    assert (probs[:, ~masks.any(dim=0)][:, :, left] > 0).all()  # background still sees the boxes

    # the SDPA path applies the same mask as an explicit masked softmax
    out = RegionIsolationAttnProcessor(allowed)(attn, hidden)
    query, key, value = split_heads(attn, attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden))
    scores = (query @ key.transpose(-1, -2) * attn.scale).masked_fill(~allowed, float("-inf"))
    expected = attn.to_out[0](merge_heads(scores.softmax(dim=-1) @ value))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# --- re-initialisation and guidance (pure functions) --------------------------------------------


def test_reinitialisation_moves_the_best_patch_and_keeps_mean_and_std():
    noise = torch.randn(2, 4, 16, 16, generator=generator(4)) * 1.3 + 0.2
    mask = region_mask(Box(0.0, 0.0, 0.25, 0.25), 16, 16)  # 4x4 box at the top left
    score = torch.zeros(2, 16, 16)
    score[0, 8:12, 10:14] = 1.0  # sample 0's concept attends to a 4x4 patch elsewhere
    score[1, 2:6, 1:5] = 1.0
    out = reinitialize_latents(noise, [score], [mask])
    dims = (1, 2, 3)
    torch.testing.assert_close(out.mean(dim=dims), noise.mean(dim=dims))
    torch.testing.assert_close(out.std(dim=dims), noise.std(dim=dims))
    moved = out[0, :, 0:4, 0:4]
    source = noise[0, :, 8:12, 10:14]
    assert torch.corrcoef(torch.stack([moved.flatten(), source.flatten()]))[0, 1] > 0.999
    torch.testing.assert_close(  # outside the box only the re-standardisation acted
        torch.corrcoef(torch.stack([out[1, :, 8:].flatten(), noise[1, :, 8:].flatten()]))[0, 1], torch.tensor(1.0)
    )


def test_region_loss_terms():
    mask = region_mask(Box(0.25, 0.25, 0.75, 0.75), 8, 8)
    filled = mask[None, None].clone()
    assert fill_loss(filled, mask) == 0
    assert fill_loss(torch.zeros_like(filled), mask) == pytest.approx(2.0 * (0.5 + 0.5))
    assert concept_enhancement_loss(filled * 10, mask) == 0  # strong attention at the box centre
    assert concept_enhancement_loss(torch.zeros_like(filled), mask) == pytest.approx(8.0)
    assert box_gaussian(mask).max() == 1 and box_gaussian(mask)[~mask.bool()].abs().sum() == 0

    inside = mask.flatten() > 0
    contained = torch.zeros(1, 64, 64)
    contained[:, :, inside] = 1.0 / inside.sum()
    assert region_restriction_loss(contained, mask) == 0
    leaking = torch.full((1, 64, 64), 1.0 / 64)
    assert region_restriction_loss(leaking, mask) == pytest.approx(10.0 / 64)
    torch.testing.assert_close(gaussian_smooth(torch.ones(1, 1, 8, 8)), torch.ones(1, 1, 8, 8))


def test_a_gradient_step_lowers_the_pure_loss():
    mask = region_mask(Box(0.0, 0.0, 0.5, 0.5), 8, 8)
    logits = torch.randn(1, 2, 64, generator=generator(5), requires_grad=True)
    self_logits = torch.randn(1, 64, 64, generator=generator(6), requires_grad=True)

    def loss():
        maps = logits.softmax(dim=-1).reshape(1, 2, 8, 8)
        return composer_loss([maps], self_logits.softmax(dim=-1), [mask])

    before = loss()
    grads = torch.autograd.grad(before, [logits, self_logits])
    with torch.no_grad():
        logits -= 0.5 * grads[0]
        self_logits -= 0.5 * grads[1]
    assert loss() < before


def test_guidance_stops_for_good_once_the_loss_rises_after_patience():
    assert guidance_continues(3, 2.0, 1.0, patience=5)
    assert not guidance_continues(5, 2.0, 1.0, patience=5)
    assert guidance_continues(5, 0.5, 1.0, patience=5)


def test_default_regional_prompt_is_the_phrase_with_the_trigger():
    assert default_regional_prompt(PROMPT, "sks", "cat") == "a sks cat"
    assert default_regional_prompt("photo, a zwx dog with a hat", "zwx", "dog") == "a zwx dog"
    assert default_regional_prompt("two animals", "sks", "cat") == "a sks cat"


# --- the method in the loop ---------------------------------------------------------------------


def prepared(pipe, specs, prompt=PROMPT, **options):
    """A composer method prepared on a context the way the loop prepares it."""
    resolved = resolve_loras(pipe, specs)
    method = build_method("composer", options)
    method.check(pipe, prompt, resolved)
    load_adapters(pipe, resolved)
    activate(pipe.unet, {lora.adapter: lora.weight for lora in resolved})
    ctx = DenoiseContext(pipe, prompt, "", resolved, 7.5, 0.0, 64, 64, 1, None, None)
    ctx.timesteps, _ = retrieve_timesteps(pipe.scheduler, 4, "cpu")
    method.prepare(ctx)
    return method, ctx


def test_background_lora_is_active_everywhere_and_regional_negative_prompts_are_used(pipe, loras):
    specs = [LoraSpec(loras["cat"], region=LEFT, negative_prompt="blurry"), LoraSpec(loras["dog"])]
    method, ctx = prepared(pipe, specs, "a sks cat, zwx style", background="dog")
    layers = tuner_layers(pipe.unet)
    assert layers and all(layer.active_adapters == ["dog"] for layer in layers)  # cat only through its region
    assert method.state.adapters == ["cat"]
    embeds, negative = pipe.encode_prompt("a sks cat", "cpu", 1, True, "blurry")
    assert torch.equal(method.state.contexts[0], torch.cat([negative, embeds]))


def test_guided_update_lowers_the_loss_and_touches_only_the_latent(pipe, loras):
    specs = [LoraSpec(loras["cat"], region=LEFT), LoraSpec(loras["dog"], region=RIGHT)]
    method, ctx = prepared(pipe, specs)
    latents = torch.randn(1, 4, 32, 32, generator=generator(7))
    t = ctx.timesteps[0]
    before = method.loss(ctx, latents, t)
    updated = method.guided_update(ctx, latents, t, 0)
    after = method.loss(ctx, updated, t)
    assert not torch.equal(updated, latents)
    assert after < before
    assert ctx.outputs["composer_losses"] == [pytest.approx(before.item(), rel=1e-5)]
    assert all(p.grad is None for p in pipe.unet.parameters())


@pytest.mark.parametrize("steps, guided", [(50, 25), (4, 2), (3, 1), (25, 12)])
def test_guidance_steps_are_a_fraction_of_the_schedule(pipe, loras, steps, guided):
    """The reference guides at most the first half of its 50 steps: 25 of 50, and half of any other count."""
    specs = [LoraSpec(loras["cat"], region=LEFT)]
    method, ctx = prepared(pipe, specs)
    ctx.timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, "cpu")
    method.prepare(ctx)
    assert method._guidance_steps == guided
    counted = build_method("composer", {"guidance_steps": 7})
    counted.check(pipe, PROMPT, ctx.loras)
    counted.prepare(ctx)
    assert counted._guidance_steps == 7  # a whole number stays a count


def test_smoothing_scales_with_the_map_and_is_the_published_one_at_sd15_sizes():
    assert smoothing_for((16, 16)) == (3, 0.5)  # SD 1.5 at 512 px: the reference's 3x3, sigma 0.5
    assert smoothing_for((32, 48)) == (5, 1.0)
    assert smoothing_for((8, 8)) == (3, 0.25)
    for side in (8, 16, 24, 32, 64):  # the same blur as a fraction of the map at every size
        kernel, sigma = smoothing_for((side, 2 * side))
        assert sigma / side == 0.5 / 16 and kernel % 2 == 1 and kernel >= 3
        assert (kernel - 1) / 2 >= min(2 * sigma, 1)  # the kernel reaches out 2 sigma (at least one cell)


def test_mask_images_work_as_regions_and_the_call_restores_the_pipeline(pipe, loras):
    processors = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    half = np.zeros((64, 64), dtype=np.uint8)
    half[:, :32] = 255
    boxes = [LoraSpec(loras["cat"], region=(0, 0, 1, 0.5)), LoraSpec(loras["dog"], region=(0, 0.5, 1, 1))]
    masks = [LoraSpec(loras["cat"], region=Image.fromarray(half)), LoraSpec(loras["dog"], region=255 - half)]
    by_box = pipe(
        PROMPT, num_inference_steps=2, generator=generator(0), output_type="latent", loras=boxes, method="composer"
    )
    by_mask = latents_of(pipe, PROMPT, loras=masks, method="composer")
    torch.testing.assert_close(by_mask, by_box.images)
    assert len(by_box.extras["composer_losses"]) == 1  # guidance_steps 0.5 of 2 steps
    assert by_box.unet_calls == 2 + 1 + 1  # CFG passes, one re-init forward, one guided forward
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == processors


# --- bad input fails before any UNet forward ----------------------------------------------------


@pytest.mark.parametrize(
    "specs, options, error",
    [
        (lambda l: [LoraSpec(l["cat"], region=(0, 0, 1, 0.02))], {}, InvalidRegionError),  # < 1 px at 16x16
        (lambda l: [LoraSpec(l["cat"], region=LEFT), LoraSpec(l["dog"])], {}, InvalidRegionError),
        (
            lambda l: [LoraSpec(l["cat"], region=LEFT), LoraSpec(l["dog"], region=RIGHT)],
            {"background": "dog"},
            InvalidRegionError,
        ),
        (lambda l: [LoraSpec(l["cat"], region=LEFT)], {"background": "nope"}, InvalidOptionError),
        (lambda l: [LoraSpec(l["cat"], region=LEFT, prompt="a cat")], {}, TriggerNotInPromptError),
        (lambda l: [LoraSpec(l["dog"])], {"background": "dog"}, InvalidOptionError),
        (lambda l: [LoraSpec(l["cat"], region=LEFT)], {"step_size": -1}, InvalidOptionError),
    ],
)
def test_bad_input_raises_before_any_unet_forward(pipe, loras, specs, options, error, monkeypatch):
    monkeypatch.setattr(composition, "load_adapters", lambda *a: pytest.fail("a LoRA was loaded"))
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    processors = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    with pytest.raises(error):
        latents_of(pipe, PROMPT, loras=specs(loras), method="composer", method_options=options)
    assert calls == []
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == processors


def test_boxes_outside_the_image_or_empty_are_refused():
    for box in [(0, 0, 1.2, 0.5), (0.5, 0, 0.5, 1), (-0.1, 0, 1, 1)]:
        with pytest.raises(InvalidRegionError):
            LoraSpec("x.safetensors", region=box)


def test_options_are_validated():
    assert ComposerOptions().guidance_steps == 0.5
    for bad in [{"isolation": 1}, {"guidance_steps": -1}, {"guidance_steps": 1.5}, {"guidance_steps": True},
                {"fg_weight": float("nan")}, {"map_factor": 0}, {"patience": 0.5}]:  # fmt: skip
        with pytest.raises(InvalidOptionError):
            build_method("composer", bad)
