"""tara: token-masked LoRA k/v in cross-attention, checked against merge, the base model and AttnProcessor2_0."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import compose.attention.token_mask as token_mask
import compose.methods.tara as tara
from compose import LoraSpec, TriggerNotInPromptError
from compose.adapters import activate
from compose.attention.layers import attention_layers
from compose.attention.token_mask import (
    TokenMaskedLoraAttnProcessor,
    key_alignment_loss,
    masked_lora_projection,
    positions_mask,
)
from compose.errors import InvalidOptionError
from compose.lora_delta import base_projection
from compose.loading import load_adapters, resolve_loras
from compose.methods.tara import TaraOptions, batch_masks, trigger_masks

from tests.conftest import run

PROMPT3 = "a sks cat and a zwx dog and a vrn car"


@pytest.fixture()
def three(loras):
    return [loras["cat"], loras["dog"], loras["car"]]


def cross_attn(pipe):
    name = next(layer.name for layer in attention_layers(pipe.unet) if layer.cross)
    return pipe.unet.get_submodule(name.removesuffix(".processor"))


def loaded(pipe, files, weights=None):
    """The pipeline with these LoRAs loaded and active (as the loop does), and their resolved specs."""
    resolved = resolve_loras(pipe, files)
    load_adapters(pipe, resolved)
    activate(pipe.unet, weights or {lora.adapter: lora.weight for lora in resolved})
    return resolved


def test_trigger_positions_multi_token_and_repeated(pipe, three):
    tokenizer = pipe.tokenizer
    assert tokenizer.tokenize("vrn") == ["v", "r", "n</w>"]
    resolved = resolve_loras(pipe, [*three])
    masks = trigger_masks(tokenizer, "a vrn car and a sks cat with sks and zwx", resolved)
    ones = {adapter: mask.nonzero().flatten().tolist() for adapter, mask in masks.items()}
    # BOS=0, a=1, v r n = 2 3 4, car=5, and=6, a=7, sks=8, c at = 9 10, with=11, sks=12, and=13, zwx=14
    assert ones == {"car": [2, 3, 4], "cat": [8, 12], "dog": [14]}
    assert all(mask.shape == (77,) for mask in masks.values())


def test_batch_masks_rows_follow_the_cfg_batch():
    mask = positions_mask([1, 3], 5)
    rows = batch_masks({"a": mask}, num_images=2, cfg=True, mask_uncond=False)["a"]
    assert rows.tolist() == [[0] * 5, [0] * 5, mask.tolist(), mask.tolist()]
    rows = batch_masks({"a": mask}, num_images=1, cfg=True, mask_uncond=True)["a"]
    assert rows.tolist() == [mask.tolist(), mask.tolist()]
    assert batch_masks({"a": mask}, num_images=1, cfg=False, mask_uncond=False)["a"].tolist() == [mask.tolist()]


def test_masked_projection_all_ones_is_the_lora_layer_and_zeros_the_base(pipe, three):
    resolved = loaded(pipe, three, {"cat": 0.7, "dog": 1.0, "car": 1.3})
    layer = cross_attn(pipe).to_k
    context = torch.randn(2, 77, 32)
    names = [lora.adapter for lora in resolved]
    ones = masked_lora_projection(layer, context, {name: torch.ones(77) for name in names})
    torch.testing.assert_close(ones, layer(context), rtol=0, atol=1e-6)
    zeros = masked_lora_projection(layer, context, {name: torch.zeros(2, 77) for name in names})
    assert torch.equal(zeros, base_projection(layer, context))
    # one adapter at one token: only that row of that sample changes
    mask = torch.zeros(2, 77)
    mask[1, 5] = 1
    single = masked_lora_projection(layer, context, {"dog": mask})
    changed = (single != base_projection(layer, context)).any(-1)
    assert changed.nonzero().tolist() == [[1, 5]]


def test_processor_without_masks_equals_attn_processor_2_0(pipe):
    latents, context = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 32)
    with torch.no_grad():
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        expected = pipe.unet(latents, 500, context).sample
        pipe.unet.set_attn_processor(TokenMaskedLoraAttnProcessor())
        assert torch.equal(pipe.unet(latents, 500, context).sample, expected)


def test_empty_masks_give_the_base_keys_and_values(pipe, three):
    resolved = loaded(pipe, three)
    attn, context = cross_attn(pipe), torch.randn(2, 77, 32)
    processor = TokenMaskedLoraAttnProcessor({lora.adapter: torch.zeros(2, 77) for lora in resolved})
    key, value = processor.project_kv(attn, context)
    assert torch.equal(key, base_projection(attn.to_k, context))
    assert torch.equal(value, base_projection(attn.to_v, context))
    assert not torch.equal(key, attn.to_k(context))  # the LoRAs are active and would change it


@pytest.mark.parametrize("fuse", [False, True])
def test_masks_on_every_token_reproduce_merge(pipe, loras, monkeypatch, fuse):
    """With a LoRA carrying a text-encoder part too: it is applied at encoding, as merge does."""
    files = [loras["te"], loras["dog"], LoraSpec(loras["car"], weight=0.6)]
    expected = run(pipe, PROMPT3, loras=files, method="merge").images
    monkeypatch.setattr(tara, "trigger_masks", lambda tokenizer, prompt, loras, length: {
        lora.adapter: torch.ones(length) for lora in loras
    })  # fmt: skip
    images = run(pipe, PROMPT3, loras=files, method="tara", method_options={"mask_uncond": True, "fuse": fuse}).images
    if fuse:  # fused weights round differently
        assert abs(images - expected).max() < 1e-4
    else:
        assert (images == expected).all()


def test_token_masks_change_the_image_and_uncond_flag_matters(pipe, three):
    merged = run(pipe, PROMPT3, loras=three, method="merge")
    masked = run(pipe, PROMPT3, loras=three, method="tara")
    both = run(pipe, PROMPT3, loras=three, method="tara", method_options=TaraOptions(mask_uncond=True))
    assert abs(masked.images - merged.images).max() > 1e-3
    assert abs(masked.images - both.images).max() > 1e-3
    assert masked.unet_calls == 3 and masked.unet_passes == 3
    assert masked.extras["trigger_masks"]["car"].nonzero().flatten().tolist() == [11, 12, 13]


def test_keys_values_are_projected_once_per_call_and_equal_per_step_ones(pipe, three, monkeypatch):
    calls = []
    real_delta = token_mask.lora_delta
    monkeypatch.setattr(token_mask, "lora_delta", lambda *a: calls.append(1) or real_delta(*a))
    cached = run(pipe, PROMPT3, steps=3, loras=three, method="tara").images
    cross_layers = sum(layer.cross for layer in attention_layers(pipe.unet))
    assert len(calls) == cross_layers * len(three) * 2  # k and v, in prepare only, not per step

    real_project = TokenMaskedLoraAttnProcessor.project_kv

    def per_step(self, attn, context):
        self._context = None  # forget the cache: project again at every call
        return real_project(self, attn, context)

    monkeypatch.setattr(TokenMaskedLoraAttnProcessor, "project_kv", per_step)
    assert (run(pipe, PROMPT3, steps=3, loras=three, method="tara").images == cached).all()


def test_more_images_per_prompt(pipe, three):
    out = run(pipe, PROMPT3, loras=three, method="tara", num_images_per_prompt=2)
    assert out.images.shape[0] == 2
    assert (abs(out.images[0] - out.images[1]).max()) > 0  # different noise, both ran


def test_fused_call_leaves_weights_and_processors_exactly_as_before(pipe, three):
    run(pipe, PROMPT3, loras=three, method="merge")  # adapters loaded once
    weights = {name: value.clone() for name, value in pipe.unet.state_dict().items()}
    processors = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    first = run(pipe, PROMPT3, loras=three, method="tara", method_options={"fuse": True}).images
    assert all(torch.equal(value, weights[name]) for name, value in pipe.unet.state_dict().items())
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == processors
    assert (run(pipe, PROMPT3, loras=three, method="tara").images == first).all()


def test_missing_trigger_is_an_error_naming_trigger_and_prompt(pipe, three):
    prompt = "a sks cat and a zwx dog"
    with pytest.raises(TriggerNotInPromptError, match=r"'vrn'.*a sks cat and a zwx dog"):
        run(pipe, prompt, loras=three, method="tara")


def test_options_are_validated():
    with pytest.raises(InvalidOptionError, match="mask_uncond"):
        TaraOptions(mask_uncond="yes")
    with pytest.raises(InvalidOptionError, match="fuse"):
        TaraOptions(fuse=1)


def test_key_alignment_loss_on_small_tensors():
    base = torch.tensor([[[0.0, 0.0], [2.0, 4.0], [4.0, 8.0], [9.0, 9.0]]])
    keys = base.clone()
    keys[0, 0] = torch.tensor([1.0, 1.0])
    rare, concept = torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0, 1.0, 1.0, 0]])
    # class key = mean of tokens 1 and 2 = (3, 6); |(1, 1) - (3, 6)| averaged = (2 + 5) / 2
    assert key_alignment_loss(keys, base, rare, concept).item() == pytest.approx(3.5)
