"""Which base model to use: a local folder, a hub id, the built-in toy model, `tiny` or `tiny-sdxl`."""

from __future__ import annotations

from pathlib import Path

from diffusers import DiffusionPipeline

from compose.errors import ComposeError

from .stable_diffusion import MultiLoraStableDiffusionPipeline
from .stable_diffusion_xl import MultiLoraStableDiffusionXLPipeline

TINY_MODELS = ("tiny", "tiny-sdxl")


def default_model() -> str:
    """The built-in toy model when it is installed, else the tiny random model."""
    try:
        from toyworld import default_model_path
    except ImportError:
        return "tiny"
    path = default_model_path()
    return str(path) if Path(path, "model_index.json").is_file() else "tiny"


def pipeline_class(model: str) -> type:
    """The drop-in class for a diffusers folder or hub id: SDXL when its model_index.json names an XL pipeline."""
    class_name = DiffusionPipeline.load_config(model).get("_class_name", "")
    return MultiLoraStableDiffusionXLPipeline if "XL" in class_name else MultiLoraStableDiffusionPipeline


def load_pipeline(model: str | None = None) -> MultiLoraStableDiffusionPipeline | MultiLoraStableDiffusionXLPipeline:
    """A ready pipeline (progress bar on) for a model name, folder or hub id."""
    model = model or default_model()
    if model in TINY_MODELS:
        from .tiny import tiny_pipeline, tiny_sdxl_pipeline

        pipe = tiny_pipeline() if model == "tiny" else tiny_sdxl_pipeline()
    else:
        try:
            cls = pipeline_class(model)
            extra = {"safety_checker": None, "requires_safety_checker": False}
            pipe = cls.from_pretrained(model, **(extra if cls is MultiLoraStableDiffusionPipeline else {}))
        except (OSError, ValueError) as error:
            raise ComposeError(
                f"cannot load model '{model}': {error}. Pass a local diffusers folder, a reachable hub id, "
                "'tiny' or 'tiny-sdxl'"
            ) from error
    pipe.model_name = model
    return pipe
