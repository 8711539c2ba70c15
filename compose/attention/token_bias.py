"""Cross-attention with an additive bias on its logits: each pixel drawn toward some text tokens, away from others."""

from __future__ import annotations

import torch

from .base import ComposableAttnProcessor


def token_bias(
    masks: torch.Tensor, token_sets: list[list[int]], length: int, toward: float, away: float
) -> torch.Tensor:
    """(batch, pixels, length) logit bias: where mask i is on, +toward on concept i's tokens, -away on the
    other concepts' tokens (a token of both gets +toward), 0 on every other token.

    masks: (concepts, batch, pixels) in [0, 1]; token_sets[i]: token positions of concept i.
    """
    own = torch.zeros(len(token_sets), length, dtype=masks.dtype, device=masks.device)
    for index, positions in enumerate(token_sets):
        own[index, positions] = 1.0
    others = ((own.sum(dim=0, keepdim=True) > 0) & (own == 0)).to(masks.dtype)
    return torch.einsum("nbx,nt->bxt", masks, toward * own - away * others)


class TokenBiasAttnProcessor(ComposableAttnProcessor):
    """Attention whose logits get `bias` (batch, queries, keys) added, broadcast over heads; rows in the order
    of the batch the UNet sees. Without a bias it is exactly AttnProcessor2_0."""

    def __init__(self, bias: torch.Tensor | None = None):
        self.bias = bias

    def attend(self, attn, query, key, value, attention_mask):
        if self.bias is not None:
            bias = self.bias[:, None].to(query.dtype)
            attention_mask = bias if attention_mask is None else attention_mask + bias
        return super().attend(attn, query, key, value, attention_mask)
