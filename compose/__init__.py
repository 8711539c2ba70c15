"""Multi-LoRA composition for diffusers: specs, loading, and the composition methods."""

from .errors import (
    ComposeError,
    CorruptLoraFileError,
    DuplicateLoraNameError,
    IncompatibleLoraError,
    InvalidOptionError,
    InvalidRegionError,
    InvalidWeightError,
    LoraFileNotFoundError,
    NoLoraKeysError,
    NotSafetensorsError,
    TriggerNotInPromptError,
    UnknownMethodError,
    UnsupportedArgumentError,
)
from .methods import METHODS, build_method
from .regions import Box
from .spec import LoraSpec

__all__ = [
    "Box",
    "ComposeError",
    "CorruptLoraFileError",
    "DuplicateLoraNameError",
    "IncompatibleLoraError",
    "InvalidOptionError",
    "InvalidRegionError",
    "InvalidWeightError",
    "LoraFileNotFoundError",
    "LoraSpec",
    "METHODS",
    "NoLoraKeysError",
    "NotSafetensorsError",
    "TriggerNotInPromptError",
    "UnknownMethodError",
    "UnsupportedArgumentError",
    "build_method",
]
