"""The toy world: a tiny, trained, offline text-to-image model and the world it draws.

`default_model_path()` is a complete diffusers StableDiffusionPipeline folder (32x32 images);
`toyworld.world` renders scenes, concept images and ground truth; `toyworld.judge` reads images back.
"""
from pathlib import Path

PACKAGE_DIR = Path(__file__).parent


def default_model_path() -> Path:
    """Folder for `StableDiffusionPipeline.from_pretrained`."""
    return PACKAGE_DIR / "model"


def default_lora_path() -> Path:
    """Folder of the shipped concept LoRAs (plain `<trigger>.safetensors` and `<trigger>_tara.safetensors`)."""
    return PACKAGE_DIR / "loras"


def default_clip_path() -> Path:
    """Folder for `transformers.CLIPModel.from_pretrained`: a toy CLIP for scoring toy images."""
    return PACKAGE_DIR / "clip"
