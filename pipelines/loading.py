"""Which base model to use: a local folder, a hub id, the built-in toy model (`toyworld`), `tiny` or `tiny-sdxl`."""

from __future__ import annotations

from pathlib import Path

from diffusers import DiffusionPipeline

from compose.errors import ComposeError

from .stable_diffusion import MultiLoraStableDiffusionPipeline
from .stable_diffusion_xl import MultiLoraStableDiffusionXLPipeline

TINY_MODELS = ("tiny", "tiny-sdxl")
BUILTIN_MODEL = "toyworld"


def builtin_model_path() -> Path | None:
    """Folder of the built-in toy model, when it is installed."""
    try:
        from toyworld import default_model_path
    except ImportError:
        return None
    path = default_model_path()
    return path if Path(path, "model_index.json").is_file() else None


def default_model() -> str:
    """The built-in toy model when it is installed, else the tiny random model."""
    path = builtin_model_path()
    return str(path) if path else "tiny"


def recipe_model(model: str) -> str:
    """How a recipe names a model: the built-in one by name, since its folder differs between machines."""
    path = builtin_model_path()
    if path is not None and model not in TINY_MODELS and Path(model_location(model)).resolve() == path.resolve():
        return BUILTIN_MODEL
    return model


def model_location(model: str) -> str:
    """What to load for a model: the built-in model's folder for its name, and for a path of it recorded
    on another machine (older recipes stored it so); any other model as given."""
    recorded_builtin = Path(model).parts[-2:] == ("toyworld", "model") and not Path(model).exists()
    if model != BUILTIN_MODEL and not recorded_builtin:
        return model
    path = builtin_model_path()
    if path is None:
        raise ComposeError(f"model '{model}' is the built-in toy model, which is not installed here; pass --model")
    return str(path)


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
        location = model_location(model)
        try:
            cls = pipeline_class(location)
            extra = {"safety_checker": None, "requires_safety_checker": False}
            pipe = cls.from_pretrained(location, **(extra if cls is MultiLoraStableDiffusionPipeline else {}))
        except (OSError, ValueError) as error:
            raise ComposeError(
                f"cannot load model '{model}': {error}. Pass a local diffusers folder, a reachable hub id, "
                "'tiny' or 'tiny-sdxl'"
            ) from error
    pipe.model_name = model
    return pipe
