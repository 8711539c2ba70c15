"""Which base model to use: a local folder, a hub id, the built-in toy model, or `tiny`."""

from __future__ import annotations

from pathlib import Path

from compose.errors import ComposeError

from .stable_diffusion import MultiLoraStableDiffusionPipeline


def default_model() -> str:
    """The built-in toy model when it is installed, else the tiny random model."""
    try:
        from toyworld import default_model_path
    except ImportError:
        return "tiny"
    path = default_model_path()
    return str(path) if Path(path, "model_index.json").is_file() else "tiny"


def load_pipeline(model: str | None = None) -> MultiLoraStableDiffusionPipeline:
    """A ready pipeline (progress bar on) for a model name, folder or hub id."""
    model = model or default_model()
    if model == "tiny":
        from .tiny import tiny_pipeline

        pipe = tiny_pipeline()
    else:
        try:
            pipe = MultiLoraStableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
        except (OSError, ValueError) as error:
            raise ComposeError(
                f"cannot load model '{model}': {error}. Pass a local diffusers folder, a reachable hub id, or 'tiny'"
            ) from error
    pipe.model_name = model
    return pipe
