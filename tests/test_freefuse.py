"""freefuse (FreeFuse): masks from attention, token bias, gated LoRAs, and the method's equivalences in the pipeline."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from compose import LoraSpec
from compose.attention.token_bias import TokenBiasAttnProcessor, token_bias
from compose.auto_masks import concept_attention, contrast, owner_masks, similarity_maps
from compose.concept_prompts import ConceptError
from compose.errors import InvalidOptionError
from compose.tokens import token_positions
from compose.methods import build_method
from compose.methods.freefuse import concept_text, map_layer
from tests.conftest import PROMPT, run

NO_BIAS = {"bias_own": 0.0, "bias_other": 0.0}


def latents(pipe, loras, method="freefuse", options=None, **kwargs):
    return run(pipe, loras=loras, method=method, method_options=options, output_type="latent", **kwargs)


# --- masks from attention --------------------------------------------------------------------------


def test_contrast_is_each_concepts_attention_minus_the_others():
    probs = torch.tensor([[[0.1, 0.5, 0.2, 0.2], [0.1, 0.1, 0.6, 0.2]]])  # (batch, pixels, tokens)
    attention = concept_attention(probs, [[1], [2, 3]])
    assert torch.allclose(attention[:, 0], torch.tensor([[0.5, 0.1], [0.2, 0.4]]))
    assert torch.allclose(contrast(attention)[:, 0], torch.tensor([[0.8, -0.2], [-0.1, 0.7]]))  # 2 a_i - a_j


def test_similarity_maps_spread_each_concept_from_its_anchor_pixels():
    features = torch.tensor([[[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]]])  # pixels 0, 1 alike; 2, 3 alike
    scores = torch.tensor([[[5.0, 0, 0, 0]], [[0, 0, 0, 5.0]]])  # concept 0 anchored at pixel 0, concept 1 at 3
    maps = similarity_maps(scores, features, anchor_fraction=0.25, temperature=0.1)
    assert torch.allclose(maps.sum(dim=-1), torch.ones(2, 1))  # a softmax over pixels
    owners = owner_masks(maps)
    assert torch.equal(owners[1:, 0], torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 1]]))
    assert torch.equal(owners[0], torch.zeros(1, 4))  # without a background channel no pixel is left to the base


def test_owner_masks_are_one_hot_with_the_background_where_its_map_is_highest():
    maps = torch.rand(3, 2, 50)
    background = torch.zeros(2, 50)
    background[:, :10] = 2.0
    owners = owner_masks(maps, background)
    assert owners.shape == (4, 2, 50) and set(owners.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(owners.sum(dim=0), torch.ones(2, 50))
    assert owners[0, :, :10].all() and not owners[0, :, 10:].any()
    assert torch.equal(owners[1:, :, 10:].argmax(dim=0), maps[:, :, 10:].argmax(dim=0))


def test_token_bias_draws_each_region_to_its_tokens_and_away_from_the_others():
    masks = torch.tensor([[[1.0, 0.0, 0.5]], [[0.0, 1.0, 0.5]]])  # (concepts, batch, pixels)
    bias = token_bias(masks, [[1, 2], [4]], length=6, toward=2.0, away=0.5)
    assert bias.shape == (1, 3, 6)
    assert torch.equal(bias[0, 0], torch.tensor([0.0, 2, 2, 0, -0.5, 0]))
    assert torch.equal(bias[0, 1], torch.tensor([0.0, -0.5, -0.5, 0, 2, 0]))
    assert torch.equal(bias[0, 2], torch.tensor([0.0, 0.75, 0.75, 0, 0.75, 0]))


def test_token_bias_processor_is_attn_processor_2_0_without_a_bias_and_adds_it_to_the_logits():
    torch.manual_seed(0)
    attn = Attention(16, cross_attention_dim=8, heads=2, dim_head=8)
    pixels, text = torch.randn(2, 6, 16), torch.randn(2, 5, 8)
    expected = AttnProcessor2_0()(attn, pixels, text)
    assert torch.equal(TokenBiasAttnProcessor()(attn, pixels, text), expected)
    bias = torch.randn(2, 6, 5)
    query = attn.to_q(pixels).view(2, 6, 2, 8).transpose(1, 2)
    key = attn.to_k(text).view(2, 5, 2, 8).transpose(1, 2)
    value = attn.to_v(text).view(2, 5, 2, 8).transpose(1, 2)
    probs = (query @ key.transpose(-1, -2) * attn.scale + bias[:, None]).softmax(-1)
    by_hand = attn.to_out[0]((probs @ value).transpose(1, 2).reshape(2, 6, 16))
    assert torch.allclose(TokenBiasAttnProcessor(bias)(attn, pixels, text), by_hand, atol=1e-6)


def test_map_layer_is_the_decoders_first_block_at_the_resolution_a_third_into_its_layers():
    blocks = ["CrossAttnDownBlock2D"] * 3
    names = [f"down_blocks.2.attentions.0.transformer_blocks.{j}.attn2.processor" for j in range(10)]
    names += [f"up_blocks.0.attentions.{a}.transformer_blocks.{j}.attn2.processor" for a in (0, 1) for j in range(10)]
    unet = SimpleNamespace(config=SimpleNamespace(down_block_types=blocks), attn_processors=dict.fromkeys(names))
    assert map_layer(unet, 4) == "up_blocks.0.attentions.0.transformer_blocks.3.attn2.processor"  # SDXL's layer


def test_concept_text_is_trigger_and_concept_word_where_the_prompt_says_so():
    assert concept_text("a sks cat and a zwx dog", "sks", "cat") == "sks cat"
    assert concept_text("a sks animal", "sks", "cat") == "sks"
    assert concept_text("a sks cat", "sks", None) == "sks"


# --- the method in the pipeline --------------------------------------------------------------------


def test_one_lora_owning_every_pixel_without_bias_is_that_lora_alone(pipe, loras):
    spec = LoraSpec(loras["te"], 0.8)
    alone = latents(pipe, [spec], "merge").images
    out = latents(pipe, [spec], options=NO_BIAS)
    assert torch.equal(out.extras["masks"][1], torch.ones(32, 32))
    assert torch.allclose(out.images, alone, rtol=1e-5, atol=1e-4)
    assert out.unet_calls == 3 + 1  # the steps and one map pass: a third of 3 steps collects from the starting noise
    assert latents(pipe, [spec], options={**NO_BIAS, "collect_steps": 9}).unet_calls == 3 + 2 + 1  # capped at 3


def test_masks_partition_the_latent_and_a_pixel_no_lora_owns_gets_the_base(pipe, loras):
    specs = [loras["cat"], loras["dog"]]
    out = latents(pipe, specs, options={"collect_steps": 2}, height=64, width=96)
    masks = out.extras["masks"]
    assert masks.shape == (3, 32, 48) and set(masks.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(masks.sum(dim=0), torch.ones(32, 48)) and not masks[0].any()
    assert masks[1].any() and masks[2].any()
    # The cross-attention k/v changes act on the text, so they reach every pixel (as in the reference);
    # without them, a background owning every pixel leaves the base model's image.
    for name, layer in pipe.unet.named_modules():
        if name.endswith((".attn2.to_k", ".attn2.to_v")):
            for adapter in ("cat", "dog"):
                layer.delete_adapter(adapter)
    everywhere_background = latents(pipe, specs, options={"background": 1e9})
    assert everywhere_background.extras["masks"][0].all()
    assert torch.allclose(everywhere_background.images, latents(pipe, None, None).images, rtol=1e-5, atol=1e-4)


def test_bias_is_on_the_conditional_rows_inside_the_regions_only(pipe, loras):
    seen = []

    def look(pipeline, i, t, values):
        biased = [p for p in pipeline.unet.attn_processors.values() if isinstance(p, TokenBiasAttnProcessor)]
        seen.append((len(biased), biased[0].bias.clone()))
        return {}

    out = latents(pipe, [loras["cat"], loras["dog"]], steps=1, callback_on_step_end=look)
    count, bias = seen[0]
    assert count == sum(".attn2." in name for name in pipe.unet.attn_processors)
    uncond, cond = bias.chunk(2)
    assert not uncond.any()
    owner = out.extras["masks"][1:, ::2, ::2].flatten(1).argmax(dim=0)  # the layers' maps: 16 x 16, half the latent
    sks_cat, zwx_dog = (token_positions(pipe.tokenizer, PROMPT, words) for words in ("sks cat", "zwx dog"))
    assert (sks_cat, zwx_dog) == ([2, 3, 4], [7, 8])  # the tiny tokenizer spells "cat" in two pieces
    assert torch.equal(cond[0][:, sks_cat], torch.where(owner == 0, 1.0, -1.0)[:, None].expand(-1, 3))
    assert torch.equal(cond[0][:, zwx_dog], torch.where(owner == 1, 1.0, -1.0)[:, None].expand(-1, 2))
    assert not cond[0][:, [0, 1, 5, 6, 9]].any()  # BOS, "a", "and", the end token: no bias


def test_a_second_call_gives_what_a_fresh_one_gives(pipe, loras):
    specs = [loras["cat"], loras["dog"]]
    first = latents(pipe, specs)
    latents(pipe, [loras["car"], loras["dog"]], "freefuse", {"background": 0.5}, prompt="a vrn car and a zwx dog",
            height=64, width=96, num_images_per_prompt=2)  # fmt: skip
    second = latents(pipe, specs)
    assert torch.equal(second.images, first.images) and torch.equal(second.extras["masks"], first.extras["masks"])


def test_several_images_and_no_guidance(pipe, loras):
    out = latents(pipe, [loras["cat"], loras["dog"]], options={"collect_steps": 1}, num_images_per_prompt=2,
                  guidance_scale=1.0)  # fmt: skip
    assert out.images.shape == (2, 4, 32, 32) and out.extras["masks"].shape == (2, 3, 32, 32)
    assert torch.equal(out.extras["masks"].sum(dim=1), torch.ones(2, 32, 32))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"collect_steps": 0}, r"collect_steps must be a step count .* above 0, got 0"),
        ({"temperature": float("inf")}, r"temperature must be a finite number > 0"),
        ({"anchor_fraction": 0.0}, r"anchor_fraction must be a number in \(0, 1\]"),
        ({"bias_own": -1.0}, r"bias_own must be a finite number >= 0"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(InvalidOptionError, match=message):
        build_method("freefuse", options)


def test_two_loras_named_by_the_same_words_are_refused_before_any_unet_call(pipe, loras):
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ConceptError, match=r"LoRAs 'cat' and 'te' are named by the same words .* own trigger word"):
        run(pipe, PROMPT, loras=[loras["cat"], loras["te"]], method="freefuse")
    assert calls == []
