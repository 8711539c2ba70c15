"""Typed errors: every problem a user can cause is caught before any denoising starts.

Each message names the offending file or argument and says how to fix it.
"""


class ComposeError(Exception):
    """Base class of every error this toolkit raises on bad input."""


class LoraFileNotFoundError(ComposeError, FileNotFoundError):
    """A LoRA source is neither a readable local file/folder nor a reachable hub repository."""


class NotSafetensorsError(ComposeError):
    """The file is pickled (.bin/.ckpt/.pt) or otherwise not safetensors; pickles are never loaded."""


class CorruptLoraFileError(ComposeError):
    """The safetensors header cannot be parsed."""


class TruncatedLoraFileError(CorruptLoraFileError):
    """The file ends before the tensor data its header describes (e.g. a half-finished download)."""


class NonFiniteLoraError(CorruptLoraFileError):
    """A tensor of the file holds NaN or infinity, which turns every image it touches black."""


class NoLoraKeysError(ComposeError):
    """The file holds tensors but none of them is a LoRA weight in a known format."""


class UnsupportedAdapterTypeError(NoLoraKeysError):
    """The file is an adapter of a type that cannot be composed (IA3, OFT, a full fine-tune difference, ...)."""


class IncompatibleLoraError(ComposeError):
    """The LoRA targets layers that do not exist in the model or have other shapes (e.g. SDXL on SD 1.5)."""


class DuplicateLoraNameError(ComposeError):
    """Two LoRAs in one call were given the same adapter name."""


class ChangedLoraError(ComposeError):
    """A LoRA file's contents differ from the ones a recipe recorded (its sha256), so the image would differ."""


class TriggerNotInPromptError(ComposeError):
    """A method needs a LoRA's trigger word in the prompt and it is not there."""


class InvalidWeightError(ComposeError, ValueError):
    """A LoRA weight is not a finite number."""


class InvalidRegionError(ComposeError, ValueError):
    """A region box or mask is outside the image, empty, or too small for the coarsest layer."""


class UnknownMethodError(ComposeError, KeyError):
    """No composition method is registered under that name."""

    def __str__(self) -> str:  # KeyError would otherwise print the message quoted
        return str(self.args[0])


class InvalidOptionError(ComposeError, ValueError):
    """A method option is unknown or has a value of the wrong type or range."""


class InvalidImageArgumentError(ComposeError, ValueError):
    """An image side is not a positive multiple of what the model needs, or the step count is below one."""


class UnsupportedArgumentError(ComposeError, ValueError):
    """A pipeline argument cannot be combined with LoRA composition."""
