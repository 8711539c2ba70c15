"""Contrastive (NT-Xent) loss on concept-token attention maps, as CLoRA uses it.

Maps of the same concept, seen from every prompt, are pulled together; maps of different
concepts are pushed apart, so each concept ends up attending to its own part of the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def minmax_normalize(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Each row scaled to [0, 1]; a constant row (zero range) becomes all zeros instead of NaN."""
    low = maps.amin(dim=-1, keepdim=True)
    high = maps.amax(dim=-1, keepdim=True)
    return (maps - low) / (high - low).clamp_min(eps)


def nt_xent_loss(samples: torch.Tensor, labels: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """Mean over ordered positive pairs (i, p) of -log(e^{s_ip/tau} / (e^{s_ip/tau} + sum_n e^{s_in/tau})).

    samples: (S, D) vectors, labels: (S,) concept ids; s is cosine similarity and n runs over the
    samples with another label. Without negatives or positives (one concept) the loss is 0.
    """
    normalized = F.normalize(samples, dim=-1)
    logits = normalized @ normalized.T / tau
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    negative = ~same
    if not positive.any() or not negative.any():
        return samples.sum() * 0.0
    negative_lse = torch.logsumexp(logits.masked_fill(~negative, float("-inf")), dim=1, keepdim=True)
    pair_loss = torch.logaddexp(logits, negative_lse) - logits  # in log space: small tau must not overflow
    return pair_loss[positive].mean()


def concept_token_loss(
    maps: torch.Tensor, concept_tokens: list[list[list[int]]], tau: float = 0.5
) -> torch.Tensor:
    """NT-Xent over the min-max normalised maps of every concept token in every prompt.

    maps: (K, h, w, T) attention of K prompts over T tokens; concept_tokens[k][c] are the token
    positions of concept c in prompt k. Each (k, c, position) gives one sample labelled c.
    """
    samples = [maps[k, :, :, position].flatten() for k, _, position in _token_samples(concept_tokens)]
    if not samples:
        return maps.sum() * 0.0
    stacked = minmax_normalize(torch.stack(samples))
    return nt_xent_loss(stacked, sample_labels(concept_tokens).to(maps.device), tau)


def _token_samples(concept_tokens: list[list[list[int]]]):
    """(prompt k, concept c, token position) of every sample, in loss order."""
    return [
        (k, concept, position)
        for k, per_concept in enumerate(concept_tokens)
        for concept, positions in enumerate(per_concept)
        for position in positions
    ]


def sample_labels(concept_tokens: list[list[list[int]]]) -> torch.Tensor:
    return torch.tensor([concept for _, concept, _ in _token_samples(concept_tokens)], dtype=torch.long)


def loss_bounds(labels: torch.Tensor, tau: float = 0.5) -> tuple[float, float]:
    """The loss when all maps coincide and when each concept's maps are identical and disjoint from the
    others'; they depend only on the labels, so a method computes them once per call."""
    coinciding = nt_xent_loss(torch.ones(len(labels), 1), labels, tau).item()
    disjoint = nt_xent_loss(F.one_hot(labels).float(), labels, tau).item()
    return coinciding, disjoint


def separation(loss: float, bounds: tuple[float, float]) -> float:
    """Where `loss` lies between coinciding maps (0) and disjoint ones (1), `bounds` from loss_bounds:
    a scale-free reading of the loss, whatever the number of maps."""
    coinciding, disjoint = bounds
    if coinciding <= disjoint:  # one concept: nothing to separate
        return 1.0
    return (coinciding - loss) / (coinciding - disjoint)
