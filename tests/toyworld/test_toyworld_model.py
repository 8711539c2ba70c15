"""The shipped toy model: loads offline as a StableDiffusionPipeline and draws what it is asked."""
import pytest
import torch
from diffusers import StableDiffusionPipeline

from toyworld import default_model_path
from toyworld.judge import judge
from toyworld.measure import GENERATION, single_shape_prompts

# Measured: the shipped model (step 4500) gets colour and shape right in 100% of 72 single-shape
# images (toyworld/model/RECIPE.md); the margin keeps the test stable across torch versions.
MIN_COLOUR_RATE = 0.9

pytestmark = pytest.mark.skipif(
    not (default_model_path() / "model_index.json").exists(), reason="toy model not exported yet"
)


@pytest.fixture(scope="module")
def pipe():
    pipeline = StableDiffusionPipeline.from_pretrained(default_model_path())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_generates_32px_images(pipe):
    image = pipe("a red circle", generator=torch.Generator().manual_seed(0), **GENERATION).images[0]
    assert image.size == (32, 32)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.float32


def test_single_shapes_have_the_asked_colour(pipe):
    prompts = single_shape_prompts()
    images = pipe([p for p, _, _ in prompts], generator=torch.Generator().manual_seed(0), **GENERATION).images
    right = [any(d.colour == colour for d in judge(image).detections) for image, (_, colour, _) in zip(images, prompts)]
    assert sum(right) / len(right) >= MIN_COLOUR_RATE
