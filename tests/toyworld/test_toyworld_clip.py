import pytest
import torch
from transformers import CLIPModel, CLIPProcessor

from toyworld import default_clip_path
from toyworld.world import mixed_scene

pytestmark = pytest.mark.skipif(not (default_clip_path() / "config.json").exists(), reason="toy CLIP not trained")


def test_toy_clip_prefers_the_drawn_concepts():
    model = CLIPModel.from_pretrained(default_clip_path())
    processor = CLIPProcessor.from_pretrained(default_clip_path())
    image = mixed_scene([("sks", "left"), ("zwx", "right")]).image
    captions = ["a sks square on the left and a zwx circle on the right", "a red circle", "a vrn triangle",
                "a blue square and a green triangle"]
    inputs = processor(text=captions, images=[image], return_tensors="pt", padding="max_length")
    with torch.no_grad():
        scores = model(**inputs).logits_per_image[0]
    assert scores.argmax() == 0
