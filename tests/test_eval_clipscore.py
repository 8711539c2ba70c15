"""CLIPScorer: equal to torchmetrics' CLIPScore, both conventions, open_clip checkpoints, regions, truncation."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPModel, CLIPProcessor

from compose.regions import Box
from compose.spec import LoraSpec, ResolvedLora
from eval.clipscore import CLIPScorer, clip_scores, region_box, with_concepts
from eval.errors import ClipModelError
from eval.tiny_clip import tiny_clip

TEXTS = ["a red cat", "a dog on the left", "a blue car", "a tree and a house"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    model, processor = tiny_clip(seed=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in TEXTS]


class TensorFeaturesCLIP(CLIPModel):
    """torchmetrics 1.9 expects feature tensors; transformers 5 returns output objects holding them."""

    def get_image_features(self, *args, **kwargs):
        return super().get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return super().get_text_features(*args, **kwargs).pooler_output


def test_score_equals_torchmetrics_clipscore(clip_dir, images):
    from torchmetrics.multimodal import CLIPScore

    metric = CLIPScore(
        model_name_or_path=lambda: (
            TensorFeaturesCLIP.from_pretrained(clip_dir),
            CLIPProcessor.from_pretrained(clip_dir),
        )
    )
    ours = CLIPScorer(clip_dir, batch_size=3).score(images, TEXTS)
    expected = []
    for image, text in zip(images, TEXTS):
        metric.reset()
        metric.update(torch.tensor(np.array(image)).permute(2, 0, 1), text)
        expected.append(float(metric.compute()))
    assert ours == pytest.approx(expected, abs=1e-4)
    assert all(s > 0 for s in ours) and len(set(ours)) == len(ours)  # per-image, unclamped: a real comparison


def test_conventions_scale_and_clamp():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    assert clip_scores(image, text, 100.0).tolist() == pytest.approx([100.0, 0.0, 100 / 2**0.5])
    assert clip_scores(image, text, 2.5).tolist() == pytest.approx([2.5, 0.0, 2.5 / 2**0.5])


def test_jmhessel_convention_is_the_same_cosine_scaled(clip_dir, images):
    torchmetrics = CLIPScorer(clip_dir).score(images, TEXTS)
    jmhessel = CLIPScorer(clip_dir, convention="jmhessel").score(images, TEXTS)
    assert jmhessel == pytest.approx([s * 2.5 / 100 for s in torchmetrics], abs=1e-6)


def test_long_text_is_truncated_with_a_warning(clip_dir, images):
    scorer = CLIPScorer(clip_dir)
    long = "a red cat and a blue dog and a green tree and a white house on the left"
    with pytest.warns(UserWarning, match="longer than the CLIP context of 16"):
        [score] = scorer.score(images[:1], [long])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scorer.score(images[:1], ["a red cat"])
    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    tokens = processor.tokenizer(long, truncation=True, max_length=16, return_tensors="pt")
    pixels = processor(images=images[:1], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        cos = torch.cosine_similarity(
            model.get_image_features(pixel_values=pixels).pooler_output,
            model.get_text_features(**tokens).pooler_output,
        )
    assert score == pytest.approx(100 * max(float(cos), 0), abs=1e-4)


TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def test_open_clip_folder_and_checkpoint_file_score_alike(tmp_path, images):
    import open_clip

    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "tiny-test-clip.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(config_dir / "tiny-test-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-test-clip")
    folder = tmp_path / "open_clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}))
    save_file(model.state_dict(), folder / "open_clip_model.safetensors")

    from_folder = CLIPScorer(folder).score(images, TEXTS)
    from_file = CLIPScorer("tiny-test-clip", pretrained=folder / "open_clip_model.safetensors").score(images, TEXTS)
    assert from_folder == pytest.approx(from_file, abs=1e-5)
    _, _, preprocess = open_clip.create_model_and_transforms("tiny-test-clip")
    with torch.no_grad():
        cos = torch.cosine_similarity(
            model.eval().encode_image(torch.stack([preprocess(image) for image in images])),
            model.encode_text(open_clip.get_tokenizer("tiny-test-clip")(TEXTS)),
        )
    assert from_folder == pytest.approx((100 * cos.clamp(min=0)).tolist(), abs=1e-4)


def test_pretrained_tag_without_hub_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClipModelError, match="download the checkpoint and pass its path"):
        CLIPScorer("ViT-B-32", pretrained="openai")


@pytest.mark.parametrize(
    "model, message",
    [("no-such-clip", "neither a folder nor an open_clip architecture"), ("ViT-B-32", "needs pretrained")],
)
def test_bad_clip_model_names_fail_clearly(model, message):
    with pytest.raises(ClipModelError, match=message):
        CLIPScorer(model)


def resolved(name, trigger, concept, region=None, prompt=None) -> ResolvedLora:
    spec = LoraSpec(f"{name}.safetensors", trigger=trigger, concept=concept, region=region, prompt=prompt)
    return ResolvedLora(spec, spec.source, "0" * 64, name, trigger, concept)


def test_triggers_become_concept_words():
    loras = [resolved("cat", "sks", "cat"), resolved("dog", "zwx", "dog")]
    assert with_concepts("a sks cat, zwx and sksx", loras) == "a cat, dog and sksx"
    assert with_concepts("sks catalog", loras) == "cat catalog"


def test_region_scores_crop_each_box_against_its_regional_prompt(images):
    scorer = CLIPScorer("tiny")
    loras = [
        resolved("cat", "sks", "cat", region=(0.0, 0.0, 1.0, 0.5), prompt="a red sks cat"),
        resolved("dog", "zwx", "dog", region=(0.25, 0.5, 0.75, 1.0)),
        resolved("car", "vrn", "car"),
    ]
    image = images[0]
    result = scorer.score_composition(image, "a sks and a zwx", loras)
    assert result["scored_prompt"] == "a cat and a dog"
    assert result["region_prompts"] == {"cat": "a red cat", "dog": "dog"}
    expected = scorer.score(
        [image, image.crop((0, 0, 32, 64)), image.crop((32, 16, 64, 48))], ["a cat and a dog", "a red cat", "dog"]
    )
    assert [result["clip_score"], *result["region_scores"].values()] == pytest.approx(expected, abs=1e-5)


def test_mask_region_is_scored_on_its_bounding_box():
    mask = torch.zeros(8, 8)
    mask[2:4, 1:7] = 1
    assert region_box(mask) == Box(0.25, 0.125, 0.5, 0.875)
