"""Evaluation: CLIPScore, the batch harness (`loracompose eval`), reports and peak-memory measurement."""

from .clipscore import CLIPScorer
from .errors import ClipModelError, EvalConfigError
from .memory import PeakMemory

__all__ = ["CLIPScorer", "ClipModelError", "EvalConfigError", "PeakMemory"]
