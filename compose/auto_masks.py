"""Concept masks found from one layer's attention, without boxes (FreeFuse's layout step).

Pure functions on tensors: a concept's cross-attention picks a few anchor pixels where it stands out
from the other concepts; the layer's image features then spread each concept from its anchors to
every pixel that looks like them; each pixel goes to the concept whose map is highest there.
"""

from __future__ import annotations

import math

import torch


def concept_attention(probs: torch.Tensor, token_sets: list[list[int]]) -> torch.Tensor:
    """a_i(x): (concepts, batch, pixels), each concept's tokens' attention averaged; probs (batch, pixels, tokens)."""
    return torch.stack([probs[..., positions].mean(dim=-1) for positions in token_sets])


def contrast(attention: torch.Tensor) -> torch.Tensor:
    """c_i = N a_i - sum_{j != i} a_j: where concept i draws more attention than the others together."""
    return (attention.shape[0] + 1) * attention - attention.sum(dim=0, keepdim=True)


def similarity_maps(
    scores: torch.Tensor, features: torch.Tensor, anchor_fraction: float, temperature: float
) -> torch.Tensor:
    """M_i: softmax over pixels of the mean feature product with concept i's top-scoring anchor pixels, / T.

    scores: (concepts, batch, pixels); features: (batch, pixels, channels). Returns (concepts, batch, pixels).
    """
    pixels = features.shape[1]
    count = max(1, math.floor(anchor_fraction * pixels))
    anchors = scores.topk(count, dim=-1).indices  # (concepts, batch, count)
    picked = torch.stack([torch.stack([f[a] for f, a in zip(features, rows)]) for rows in anchors])
    similarity = torch.einsum("nbc,bxc->nbx", picked.float().mean(dim=2), features.float())
    return (similarity / temperature).softmax(dim=-1)


def owner_masks(maps: torch.Tensor, background: torch.Tensor | None = None) -> torch.Tensor:
    """One-hot owners (concepts + 1, batch, pixels) by argmax; row 0 is the background, which wins only where
    its map (batch, pixels) is given and highest: every pixel has exactly one owner."""
    channels = maps if background is None else torch.cat([background[None], maps])
    owner = channels.argmax(dim=0) + (1 if background is None else 0)
    return torch.nn.functional.one_hot(owner, maps.shape[0] + 1).permute(2, 0, 1).to(maps.dtype)
