"""Multi-LoRA composition for diffusers: specs, loading, and the composition methods."""

from .errors import (
    ChangedLoraError,
    ComposeError,
    CorruptLoraFileError,
    DuplicateLoraNameError,
    IncompatibleLoraError,
    InvalidImageArgumentError,
    InvalidOptionError,
    InvalidRegionError,
    InvalidWeightError,
    LoraFileNotFoundError,
    NoLoraKeysError,
    NonFiniteLoraError,
    NotSafetensorsError,
    TriggerNotInPromptError,
    TruncatedLoraFileError,
    UnknownMethodError,
    UnsupportedAdapterTypeError,
    UnsupportedArgumentError,
)
from .methods import METHODS, build_method
from .regions import Box
from .spec import LoraSpec

__all__ = [
    "Box",
    "ChangedLoraError",
    "ComposeError",
    "CorruptLoraFileError",
    "DuplicateLoraNameError",
    "IncompatibleLoraError",
    "InvalidImageArgumentError",
    "InvalidOptionError",
    "InvalidRegionError",
    "InvalidWeightError",
    "LoraFileNotFoundError",
    "LoraSpec",
    "METHODS",
    "NoLoraKeysError",
    "NonFiniteLoraError",
    "NotSafetensorsError",
    "TriggerNotInPromptError",
    "TruncatedLoraFileError",
    "UnknownMethodError",
    "UnsupportedAdapterTypeError",
    "UnsupportedArgumentError",
    "build_method",
]
