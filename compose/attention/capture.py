"""Attention-probability capture for a few chosen layers, with or without autograd."""

from __future__ import annotations

import torch

from .base import ComposableAttnProcessor, attention_probs


class AttentionStore:
    """Head-averaged attention probabilities per layer name, (batch, query tokens, key tokens)."""

    def __init__(self, keep_grad: bool = False):
        self.keep_grad = keep_grad
        self.maps: dict[str, torch.Tensor] = {}

    def record(self, name: str, probs: torch.Tensor) -> None:
        averaged = probs.mean(dim=1)
        self.maps[name] = averaged if self.keep_grad else averaged.detach()

    def clear(self) -> None:
        self.maps.clear()

    def mean(self, names=None) -> torch.Tensor:
        """Average of the layers' maps (all recorded layers share one resolution by construction)."""
        names = list(self.maps) if names is None else names
        return torch.stack([self.maps[name] for name in names]).mean(dim=0)


class CaptureAttnProcessor(ComposableAttnProcessor):
    """Ordinary attention that also hands its probabilities to an AttentionStore."""

    def __init__(self, store: AttentionStore, name: str):
        self.store = store
        self.name = name

    def attend(self, attn, query, key, value, attention_mask):
        probs = attention_probs(attn, query, key, attention_mask)
        self.store.record(self.name, probs)
        return torch.matmul(probs, value)


class OutputCaptureAttnProcessor(ComposableAttnProcessor):
    """Ordinary attention that also keeps its output (after to_out, before the block's residual) under its name:
    the image features a method compares pixel by pixel."""

    def __init__(self, outputs: dict[str, torch.Tensor], name: str):
        self.outputs = outputs
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        self.outputs[self.name] = out.detach()
        return out
