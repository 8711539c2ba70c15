"""Evaluation: CLIPScore, the batch harness (`loracompose eval`), reports and peak-memory measurement."""

from .clipscore import CLIPScorer
from .errors import ClipModelError, EvalConfigError
from .harness import load_config, run_eval
from .memory import PeakMemory
from .report import write_report

__all__ = ["CLIPScorer", "ClipModelError", "EvalConfigError", "PeakMemory", "load_config", "run_eval", "write_report"]
