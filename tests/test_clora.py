"""clora (CLoRA): contrastive loss, masks, fusion, prompt derivation, and the method in the pipeline."""

from __future__ import annotations

import math

import pytest
import torch

from compose import LoraSpec
from compose.adapters import BASE, tuner_layers
from compose.concept_prompts import (
    Concept,
    ConceptError,
    ConceptNotInPromptError,
    MissingConceptError,
    concept_prompts,
    derive_prompts,
    remove_words,
)
from compose.attention.capture import AttentionStore
from compose.context import DenoiseContext
from compose.contrastive import (
    concept_token_loss,
    loss_bounds,
    minmax_normalize,
    nt_xent_loss,
    sample_labels,
    separation,
)
from compose.errors import InvalidOptionError
from compose.tokens import token_positions
from compose.masks import attention_masks, dilate, erode, fuse_noise_predictions, morph, threshold_mask
import compose.methods.clora as clora_module
from compose.methods.base import step_index
from compose.methods.clora import PAPER_GRADIENT_RMS, CloraMethod, CloraOptions, latent_step
from pipelines.tiny import tiny_tokenizer
from tests.conftest import PROMPT, generator

NO_UPDATES = dict(max_iter_to_alter=0)
ONE_UPDATE = dict(max_iter_to_alter=1, refinement_rounds=1)


def clora(pipe, loras, prompt="a cat and a dog", steps=1, options=None, **kwargs):
    return pipe(
        prompt,
        num_inference_steps=steps,
        generator=generator(0),
        output_type="latent",
        loras=loras,
        method="clora",
        method_options=options,
        **kwargs,
    )


# --- contrastive loss -------------------------------------------------------------------------


def test_nt_xent_matches_hand_computation():
    samples = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    tau = 0.5
    cos = {(0, 1): 1 / math.sqrt(2), (0, 2): 0.0, (1, 2): 1 / math.sqrt(2)}
    s = lambda i, j: cos[(min(i, j), max(i, j))] / tau  # noqa: E731
    # positive pairs (0, 1) and (1, 0); the only negative is sample 2
    l01 = -math.log(math.exp(s(0, 1)) / (math.exp(s(0, 1)) + math.exp(s(0, 2))))
    l10 = -math.log(math.exp(s(1, 0)) / (math.exp(s(1, 0)) + math.exp(s(1, 2))))
    expected = (l01 + l10) / 2
    assert nt_xent_loss(samples, labels, tau).item() == pytest.approx(expected, rel=1e-6)


def test_concept_token_loss_normalises_and_groups_token_maps():
    maps = torch.rand(2, 3, 3, 5)  # two prompts, 3x3 maps, 5 tokens
    tokens = [[[1], [3]], [[1, 2], [4]]]  # concept 0: tokens 1 (prompt 0), 1 and 2 (prompt 1); concept 1: 3, 4
    samples = torch.stack([maps[0, :, :, 1], maps[0, :, :, 3], maps[1, :, :, 1], maps[1, :, :, 2], maps[1, :, :, 4]])
    expected = nt_xent_loss(minmax_normalize(samples.flatten(1)), torch.tensor([0, 1, 0, 0, 1]), 0.7)
    assert concept_token_loss(maps, tokens, tau=0.7).item() == pytest.approx(expected.item(), rel=1e-6)


def test_minmax_guards_the_zero_range():
    rows = torch.tensor([[2.0, 2.0, 2.0], [1.0, 3.0, 2.0]])
    assert torch.equal(minmax_normalize(rows), torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.5]]))
    flat = torch.full((2, 2, 2, 3), 0.25)  # constant maps everywhere: finite loss, finite gradient
    flat.requires_grad_(True)
    loss = concept_token_loss(flat, [[[0], [1]], [[0], [2]]])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(flat.grad).all()


def test_one_concept_gives_zero_loss():
    samples = torch.rand(4, 6)
    assert nt_xent_loss(samples, torch.zeros(4, dtype=torch.long)).item() == 0.0
    assert concept_token_loss(torch.rand(2, 3, 3, 4), [[[1]], [[1, 2]]]).item() == 0.0


def test_separation_reads_the_loss_between_coinciding_and_disjoint_maps():
    tokens = [[[1], [2]], [[1], [3]], [[4], [2]]]  # 3 prompts, 2 concepts, one token each
    labels = sample_labels(tokens)
    assert labels.tolist() == [0, 1, 0, 1, 0, 1]
    same = torch.rand(1, 4, 4, 1).expand(3, 4, 4, 6)  # every token of every prompt attends alike
    apart = torch.zeros(3, 4, 4, 6)
    apart[:, :2, :, [1, 4]] = 1.0  # concept 0 on the top half, concept 1 on the bottom half
    apart[:, 2:, :, [2, 3]] = 1.0
    for maps, expected in ((same, 0.0), (apart, 1.0)):
        loss = concept_token_loss(maps, tokens).item()
        assert separation(loss, loss_bounds(labels)) == pytest.approx(expected, abs=1e-6)
    assert separation(0.0, loss_bounds(torch.zeros(3, dtype=torch.long))) == 1.0  # one concept: nothing to separate


# --- masks and fusion -------------------------------------------------------------------------


def test_threshold_mask_is_union_over_tokens_relative_to_each_peak():
    maps = torch.zeros(2, 3, 2)
    maps[0, 0, 0], maps[1, 1, 0] = 1.0, 0.5  # token 0: peak 1.0, 0.5 is above 0.4 * peak
    maps[1, 2, 1] = 0.01  # token 1: its own (tiny) peak counts
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    assert torch.equal(threshold_mask(maps, 0.4), expected)


def test_morphology_on_a_small_pattern():
    mask = torch.zeros(5, 5)
    mask[1:4, 1:4] = 1.0
    mask[0, 4] = 1.0  # a speck
    assert torch.equal(dilate(mask), torch.ones(5, 5))  # the 3x3 block grows to the whole grid
    center = torch.zeros(5, 5)
    center[2, 2] = 1.0
    assert torch.equal(erode(mask), center)  # only the block's centre survives; the speck goes
    opened = morph(mask, "open")
    assert opened[0, 4] == 0 and torch.equal(opened[1:4, 1:4], torch.ones(3, 3))
    holed = torch.ones(5, 5)
    holed[2, 2] = 0.0
    assert torch.equal(morph(holed, "close"), torch.ones(5, 5))
    assert torch.equal(morph(mask, "none"), mask)


@pytest.mark.parametrize("morphology", ["none", "dilate", "erode", "open", "close"])
def test_masks_cover_every_pixel_and_base_owns_the_rest(morphology):
    torch.manual_seed(0)
    maps = torch.rand(3, 2, 6, 7, 10) ** 4  # (passes, images, h, w, tokens)
    masks = attention_masks(maps, [[], [2, 3], [5]], alpha=0.5, morphology=morphology)
    assert masks.shape == (3, 2, 6, 7)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    covered = masks[1:].amax(dim=0)
    assert torch.equal(masks[0], 1.0 - covered)
    assert (masks.sum(dim=0) >= 1).all()
    assert torch.equal(masks[1], morph(threshold_mask(maps[1][..., [2, 3]], 0.5), morphology))


def test_fusion_is_the_mask_weighted_average_and_upsamples_nearest():
    predictions = torch.stack([torch.full((1, 2, 4, 4), float(k)) for k in range(3)])  # pass k predicts k
    masks = torch.zeros(3, 1, 2, 2)
    masks[0, 0, 0, 0] = 1.0  # top-left quarter: base only
    masks[1, 0, 0, 1] = masks[2, 0, 0, 1] = 1.0  # top-right: passes 1 and 2 share
    masks[2, 0, 1, :] = 1.0  # bottom half: pass 2
    fused = fuse_noise_predictions(predictions, masks)
    assert fused.shape == (1, 2, 4, 4)
    assert torch.equal(fused[0, :, :2, :2], torch.zeros(2, 2, 2))
    assert torch.equal(fused[0, :, :2, 2:], torch.full((2, 2, 2), 1.5))
    assert torch.equal(fused[0, :, 2:, :], torch.full((2, 2, 4), 2.0))


# --- prompts and concept tokens ---------------------------------------------------------------

CAT, DOG = Concept("cat_lora", "sks", "cat"), Concept("dog_lora", "zwx", "dog")


def test_prompts_from_a_plain_prompt():
    expected = ["a cat and a dog", "a sks cat and a dog", "a cat and a zwx dog"]
    assert derive_prompts("a cat and a dog", [CAT, DOG]) == expected


def test_prompts_from_a_prompt_with_triggers():
    expected = ["a cat and a dog", "a sks cat and a dog", "a cat and a zwx dog"]
    assert derive_prompts("a sks cat and a zwx dog", [CAT, DOG]) == expected
    assert derive_prompts("a sks cat and a dog", [CAT, DOG]) == expected  # one trigger written, one inserted
    assert remove_words("Sks cat, zwx", ["sks", "zwx"]) == "cat,"


def test_prompt_override_and_loras_without_trigger():
    own = Concept("dog_lora", "zwx", "dog", prompt="a photo of a zwx dog next to a cat")
    plain = Concept("cat_lora", None, "cat")
    assert derive_prompts("a cat and a dog", [plain, own]) == ["a cat and a dog", "a cat and a dog", own.prompt]


def test_concept_tokens_come_from_tokenizer_offsets():
    tokenizer = tiny_tokenizer()
    plan = concept_prompts(tokenizer, "a cat and a dogs", [CAT, Concept("dog_lora", "zwx", "dogs")])
    # "dogs" is not a whole-word token: it is spelled in several byte-level pieces
    dogs = plan.concept_tokens[0][1]
    assert len(dogs) > 1 and dogs == list(range(dogs[0], dogs[0] + len(dogs)))
    cat = token_positions(tokenizer, "a cat", "cat")  # the tiny vocabulary spells cat in two pieces
    assert plan.concept_tokens[0][0] == cat
    assert plan.concept_tokens[1][0] == [2, *[p + 1 for p in cat]]  # "a sks cat ...": sks, then cat
    assert plan.concept_tokens[2][1] == list(range(dogs[0], dogs[0] + len(dogs) + 1))  # zwx, then dogs
    assert plan.mask_tokens == [[], plan.concept_tokens[1][0], plan.concept_tokens[2][1]]


def test_concept_errors():
    tokenizer = tiny_tokenizer()
    with pytest.raises(ConceptNotInPromptError, match="'dog'"):
        concept_prompts(tokenizer, "a cat and a car", [CAT, DOG])
    with pytest.raises(ConceptError, match="share the concept word"):
        concept_prompts(tokenizer, "a cat and a dog", [CAT, Concept("other", "zwx", "cat")])
    override = Concept("dog_lora", "zwx", "dog", prompt="a zwx dog")
    with pytest.raises(ConceptNotInPromptError, match="prompt of LoRA 'dog_lora'"):
        concept_prompts(tokenizer, "a cat and a dog", [CAT, override])


def test_options_are_validated():
    assert step_index(0.5, 50) == 25 and step_index(7, 50) == 7 and step_index(0.5, 3) == 1
    assert CloraOptions(refinement_steps=[0, 0.5]).refinement_steps == (0, 0.5)
    for bad in (dict(morphology="blur"), dict(tau=0), dict(max_iter_to_alter=1.5), dict(refinement_rounds=0),
                dict(alpha=1.0), dict(recompute_after_update="yes"), dict(max_iter_to_alter=True),
                dict(target_separation=0), dict(target_separation=1.5), dict(refinement_stop=0),
                dict(relative_step="yes"), dict(map_factor=0), dict(map_factor=2.0)):  # fmt: skip
        with pytest.raises(InvalidOptionError):
            CloraOptions(**bad)


# --- the latent step ---------------------------------------------------------------------------


def _rms(x):
    return x.pow(2).mean().sqrt().item()


def test_relative_step_is_the_same_relative_change_at_any_contrast_and_size():
    moves = []
    for size, contrast in ((64, 1.0), (32, 1.0), (16, 37.0)):  # sizes; a low-contrast map's gradient is larger
        latents = torch.randn(1, 4, size, size, generator=generator(size)) * 0.9
        grad = torch.randn(1, 4, size, size, generator=generator(size + 1)) * 1e-3 * contrast
        moves.append(_rms(latent_step(latents, grad, 20.0) - latents) / _rms(latents))
    assert moves == pytest.approx([20.0 * PAPER_GRADIENT_RMS] * 3, rel=1e-5)


def test_relative_step_is_the_papers_step_at_sd15_gradient_scale():
    """SD 1.5 at 512 px: unit-RMS 64x64 latents and the gradient RMS step 20 was chosen for."""
    latents = torch.randn(2, 4, 64, 64, generator=generator(0))
    latents = latents / latents.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    grad = torch.randn(2, 4, 64, 64, generator=generator(1))
    grad = grad / grad.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt() * PAPER_GRADIENT_RMS
    torch.testing.assert_close(latent_step(latents, grad, 20.0), latents - 20.0 * grad)
    torch.testing.assert_close(latent_step(latents, 3 * grad, 20.0, relative=False), latents - 60.0 * grad)
    assert torch.equal(latent_step(latents, torch.zeros_like(grad), 20.0), latents)  # no gradient, no move


def test_the_update_moves_each_image_by_the_same_fraction_at_two_latent_sizes(pipe, loras, monkeypatch):
    moves = []

    def spy(latents, grad, step_size, relative=True):
        out = latent_step(latents, grad, step_size, relative)
        moves.append([_rms(o - z) / _rms(z) for o, z in zip(out, latents)])
        return out

    monkeypatch.setattr(clora_module, "latent_step", spy)
    for size in (64, 128):
        clora(pipe, [loras["cat"], loras["dog"]], options=ONE_UPDATE, height=size, width=size, num_images_per_prompt=2)
    assert len(moves) == 2
    assert sum(moves, []) == pytest.approx([20.0 * PAPER_GRADIENT_RMS] * 4, rel=1e-4)


# --- the method in the pipeline ---------------------------------------------------------------


def test_bad_input_fails_before_denoising(pipe, loras, monkeypatch):
    monkeypatch.setattr(CloraMethod, "prepare", lambda *a: pytest.fail("denoising started"))
    no_concept = LoraSpec(loras["te_kohya"])  # trigger sks, no concept word in its file
    with pytest.raises(MissingConceptError, match="concept="):
        clora(pipe, [no_concept, loras["dog"]])
    with pytest.raises(ConceptNotInPromptError):
        clora(pipe, [loras["cat"], loras["dog"]], prompt="a cat and a car")
    with pytest.raises(InvalidOptionError, match="style_lora"):
        clora(pipe, [loras["cat"], loras["dog"]], options=dict(style_lora="nope"))


def test_without_updates_and_masks_it_averages_base_and_composite(pipe, loras):
    """CFG is linear and the first DPM-Solver step is affine in eps, so with all masks on
    x1(clora) = (x1(base model on the trigger-free prompt) + N * x1(composite)) / (N + 1)."""
    base = pipe("a cat and a dog", num_inference_steps=1, generator=generator(0), output_type="latent").images
    specs = [LoraSpec(loras["cat"], prompt=PROMPT), LoraSpec(loras["dog"], prompt=PROMPT)]
    composite = pipe(PROMPT, num_inference_steps=1, generator=generator(0), output_type="latent",
                     loras=specs, method="composite").images  # fmt: skip
    out = clora(pipe, specs, prompt=PROMPT, options=dict(NO_UPDATES, apply_mask_after=1.0))
    assert out.extras["prompts"] == ["a cat and a dog", PROMPT, PROMPT]
    assert torch.equal(out.extras["masks"], torch.ones(3, 16, 16))
    assert out.extras["losses"] == [[]]
    assert not torch.allclose(base, composite, atol=1e-3)  # the equality below is not trivial
    torch.testing.assert_close(out.images, (base + 2 * composite) / 3, atol=1e-4, rtol=1e-4)


def test_latent_update_lowers_the_loss(pipe, loras):
    options = dict(max_iter_to_alter=1, refinement_rounds=3, target_separation=None)
    out = clora(pipe, [loras["cat"], loras["dog"]], options=options)
    [losses] = out.extras["losses"]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
    assert out.unet_calls == 3 + 1  # three map-only forwards, then the prediction on the updated latent
    masks = out.extras["masks"]
    assert masks.shape == (3, 16, 16) and (masks.sum(dim=0) >= 1).all()
    assert out.extras["attention_maps"].shape == (3, 16, 16, 77)


@pytest.mark.parametrize("target, updates", [(None, [3, 1, 3]), (0.8, [3, 1, 3]), (0.6, [1, 0, 0])])
def test_updates_stop_once_the_maps_are_separated(pipe, loras, monkeypatch, target, updates):
    """Separation pinned at 0.7: a target above it runs the whole schedule (refinement at steps 0
    and 2), a target below it stops after the first update, which is the only one run before any
    map was seen."""
    monkeypatch.setattr(clora_module, "separation", lambda *a: 0.7)
    options = dict(max_iter_to_alter=3, refinement_steps=[0, 2], refinement_rounds=3, target_separation=target)
    out = clora(pipe, [loras["cat"], loras["dog"]], steps=3, options=options)
    assert [len(losses) for losses in out.extras["losses"]] == updates
    assert out.extras["separations"] == [0.7, 0.7, 0.7]
    assert out.unet_calls == sum(updates) + 3


@pytest.mark.parametrize("stop, updates", [(None, [3, 1, 3]), (0.8, [3, 1, 3]), (0.6, [1, 1, 1])])
def test_refinement_rounds_end_at_the_loss_threshold(pipe, loras, monkeypatch, stop, updates):
    """Separation pinned at 0.7: a refinement stop below it ends each refinement step's rounds after
    its first update; the single updates of the other steps still run."""
    monkeypatch.setattr(clora_module, "separation", lambda *a: 0.7)
    options = dict(max_iter_to_alter=3, refinement_steps=[0, 2], refinement_rounds=3, refinement_stop=stop)
    out = clora(pipe, [loras["cat"], loras["dog"]], steps=3, options=options)
    assert [len(losses) for losses in out.extras["losses"]] == updates
    assert out.unet_calls == sum(updates) + 3


def test_stale_predictions_and_uncond_maps_as_the_reference(pipe, loras):
    options = dict(ONE_UPDATE, recompute_after_update=False, use_uncond_maps=True)
    out = clora(pipe, [loras["cat"], loras["dog"]], options=options)
    assert out.unet_calls == 1  # the update's own CFG forward gives the predictions
    assert len(out.extras["losses"][0]) == 1 and torch.isfinite(out.images).all()


def test_one_concept_runs_without_updates(pipe, loras):
    out = clora(pipe, [loras["cat"]], steps=2, options=dict(apply_mask_after=0))
    assert out.extras["losses"] == [[], []]
    assert out.extras["masks"].shape == (2, 16, 16)
    assert out.unet_calls == 2 and out.unet_passes == 4
    assert torch.isfinite(out.images).all()


def test_no_graph_is_kept_on_steps_without_update(pipe, loras, monkeypatch):
    recorded: list[tuple[int, bool]] = []
    step = {"i": -1}
    record, predict = AttentionStore.record, CloraMethod.noise_prediction

    def spy_record(self, name, probs):
        recorded.append((step["i"], probs.requires_grad))
        record(self, name, probs)

    def spy_predict(self, ctx, latents, t, i):
        step["i"] = i
        eps, latents = predict(self, ctx, latents, t, i)
        assert eps.grad_fn is None and not latents.requires_grad
        assert all(m.grad_fn is None and not m.requires_grad for m in self.store.maps.values())
        return eps, latents

    monkeypatch.setattr(AttentionStore, "record", spy_record)
    monkeypatch.setattr(CloraMethod, "noise_prediction", spy_predict)
    clora(pipe, [loras["cat"], loras["dog"]], steps=2, options=ONE_UPDATE)
    assert any(grad for i, grad in recorded if i == 0)  # the update step does build a graph
    assert recorded and not any(grad for i, grad in recorded if i > 0)


def test_non_square_image(pipe, loras):
    out = clora(pipe, [loras["cat"], loras["dog"]], options=ONE_UPDATE, height=64, width=96)
    assert out.images.shape == (1, 4, 32, 48)
    assert out.extras["masks"].shape == (3, 16, 24)
    assert len(out.extras["losses"][0]) == 1 and torch.isfinite(out.images).all()


def test_text_encoder_part_is_used_for_its_own_prompt_only(pipe, loras, monkeypatch):
    calls = []
    encode = DenoiseContext.encode

    def spy(self, prompt, adapters=None, negative_prompt=None):
        calls.append((prompt, dict(adapters or {})))
        return encode(self, prompt, adapters, negative_prompt)

    monkeypatch.setattr(DenoiseContext, "encode", spy)
    out = clora(pipe, [loras["te"], loras["dog"]], options=NO_UPDATES)
    assert out.extras["pass_adapters"] == [BASE, "te", "dog"]
    assert ("a sks cat and a dog", {"te": 1.0}) in calls
    assert ("a cat and a dog", {}) in calls and ("a cat and a zwx dog", {}) in calls


def test_style_lora_rides_on_every_pass_and_is_removed_after(pipe, loras):
    specs = [loras["cat"], loras["dog"], loras["car"]]
    prompt = "a cat and a dog, vrn style"
    plain = clora(pipe, specs[:2], prompt, options=NO_UPDATES)
    styled = clora(pipe, specs, prompt, options=dict(NO_UPDATES, style_lora="car", style_weight=0.5))
    assert styled.extras["pass_adapters"] == [BASE, "cat", "dog"]
    assert not torch.allclose(plain.images, styled.images, atol=1e-4)
    assert all(not layer._forward_hooks for layer in tuner_layers(pipe.unet))
