"""Region-aware attention: concept injection in cross-attention, concept isolation in self-attention.

Every processor of one call shares a RegionState that the method updates between forwards
(which regional embeddings match the batch, whether maps are being recorded), so one UNet with
one set of installed processors serves the guided passes and the CFG pass alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from ..lora_delta import lora_delta
from .base import ComposableAttnProcessor, attention_probs, merge_heads, split_heads
from .capture import AttentionStore


class MapRecorder:
    """Regional cross-attention maps (one store per region) and self-attention maps of a few layers."""

    def __init__(self, regions: int, cross_layers: Iterable[str], self_layers: Iterable[str], keep_grad: bool):
        self.cross = [AttentionStore(keep_grad) for _ in range(regions)]
        self.self_maps = AttentionStore(keep_grad)
        self.cross_layers = frozenset(cross_layers)
        self.self_layers = frozenset(self_layers)

    @property
    def layers(self) -> frozenset[str]:
        """Every layer it records: the forward may stop once they ran."""
        return self.cross_layers | self.self_layers

    def record_cross(self, name: str, region: int, probs: torch.Tensor) -> None:
        self.cross[region].record(name, probs)

    def record_self(self, name: str, probs: torch.Tensor) -> None:
        self.self_maps.record(name, probs)


@dataclass
class RegionState:
    """Shared by all processors of a call: each region's adapter and regional prompt embedding.

    contexts[k] must have the UNet batch's size and order (negative rows first under CFG).
    """

    adapters: list[str]
    contexts: list[torch.Tensor] = field(default_factory=list)
    recorder: MapRecorder | None = None


def with_delta(layer, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """The layer's active projection plus one (inactive) adapter's LoRA delta."""
    out = layer(x)
    delta = lora_delta(layer, adapter, x)
    return out if delta is None else out + delta


class RegionCrossAttnProcessor(ComposableAttnProcessor):
    """Cross-attention where each region's pixels attend to their regional prompt through their LoRA.

    The global output uses the active weights (the base, plus a background LoRA if any). Inside a
    region, the output is the mean over the covering regions of to_out^k(softmax(Q K_k^T) V_k), where
    K_k, V_k and to_out^k add LoRA k's to_k/to_v/to_out deltas; the queries stay the base queries.

    masks: (regions, tokens) bool at this layer's resolution.
    """

    def __init__(self, state: RegionState, masks: torch.Tensor, name: str = ""):
        self.state = state
        self.name = name
        self.indices = [mask.nonzero().squeeze(1) for mask in masks]
        self.covered = masks.any(dim=0)
        self.counts = masks.sum(dim=0).clamp(min=1)

    def block(self, attn, hidden_states, context, attention_mask):
        out = super().block(attn, hidden_states, context, attention_mask)
        if not self.indices:
            return out
        recorder = self.state.recorder
        recording = recorder is not None and self.name in recorder.cross_layers
        total = torch.zeros_like(out)
        for k, (adapter, index) in enumerate(zip(self.state.adapters, self.indices)):
            regional_context = self.state.contexts[k]
            if regional_context.shape[0] != hidden_states.shape[0]:
                raise ValueError(
                    f"regional embedding batch {regional_context.shape[0]} does not match the UNet batch "
                    f"{hidden_states.shape[0]}"
                )
            rows = hidden_states if recording else hidden_states.index_select(1, index)
            query = attn.to_q(rows)
            key = with_delta(attn.to_k, adapter, regional_context)
            value = with_delta(attn.to_v, adapter, regional_context)
            query, key, value = split_heads(attn, query, key, value)
            if recording:
                probs = attention_probs(attn, query, key)
                heads_out = torch.matmul(probs, value).index_select(2, index)
                recorder.record_cross(self.name, k, probs)
            else:
                heads_out = self.attend(attn, query, key, value, None)
            regional = with_delta(attn.to_out[0], adapter, merge_heads(heads_out).to(out.dtype))
            total = total.index_add(1, index, regional)
        return torch.where(self.covered[:, None], total / self.counts[:, None].to(out.dtype), out)


class RegionIsolationAttnProcessor(ComposableAttnProcessor):
    """Self-attention where a pixel in a region cannot see pixels of regions it is not in.

    allowed: (tokens, tokens) bool from `isolation_mask`, broadcast over batch and heads by SDPA;
    None attends everywhere (exactly AttnProcessor2_0).
    """

    def __init__(self, allowed: torch.Tensor | None = None, state: RegionState | None = None, name: str = ""):
        self.allowed = allowed
        self.state = state
        self.name = name

    def attend(self, attn, query, key, value, attention_mask):
        mask = attention_mask
        if self.allowed is not None:
            mask = self.allowed if mask is None else mask.masked_fill(~self.allowed, float("-inf"))
        recorder = self.state.recorder if self.state is not None else None
        if recorder is not None and self.name in recorder.self_layers:
            probs = attention_probs(attn, query, key, mask)
            out = torch.matmul(probs, value)
            recorder.record_self(self.name, probs)
            return out
        return super().attend(attn, query, key, value, mask)


def isolation_mask(masks: torch.Tensor) -> torch.Tensor | None:
    """(tokens, tokens) bool: may query q attend to key k, given (regions, tokens) bool region masks.

    Blocked when q and k both lie in regions but share none: for disjoint boxes exactly "box i
    cannot see box j"; pixels outside every region see and are seen by all. A pixel always shares
    its regions with itself, so no row is fully blocked even under overlaps. None when nothing is
    blocked (zero or one region), so SDPA keeps its unmasked kernel.
    """
    masks = masks.float()
    in_any = masks.sum(dim=0) > 0
    shares = (masks.T @ masks) > 0
    allowed = shares | ~in_any[:, None] | ~in_any[None, :]
    return None if bool(allowed.all()) else allowed
