"""The web UI: `loracompose ui` serves a Gradio app for composing LoRAs from a local library."""

from .app import build_app
from .library import LoraLibrary

__all__ = ["LoraLibrary", "build_app"]
