"""Typed errors of the evaluation harness; both are ComposeErrors so the CLI prints them the same way."""

from __future__ import annotations

from compose.errors import ComposeError


class EvalConfigError(ComposeError, ValueError):
    """A field of an evaluation config is missing, unknown or invalid; `field` names it (e.g. 'seeds[2]')."""

    def __init__(self, field: str, message: str):
        super().__init__(f"config field '{field}': {message}")
        self.field = field


class ClipModelError(ComposeError):
    """The CLIP model for scoring cannot be found or loaded."""
