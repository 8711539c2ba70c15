"""Token-masked LoRA keys and values in cross-attention (TARA).

Each LoRA's to_k/to_v delta is added only at the text positions of its own trigger word, so one
concept's LoRA cannot change how any other word is attended to. Keys and values depend only on
the text, which is fixed during sampling: the inference processor computes them once per prompt.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..lora_delta import base_projection, lora_delta
from .base import ComposableAttnProcessor


def positions_mask(positions: list[int], length: int = 77) -> torch.Tensor:
    """A 0/1 float vector of `length` tokens with ones at `positions`."""
    mask = torch.zeros(length)
    mask[positions] = 1.0
    return mask


def masked_lora_projection(
    layer, context: torch.Tensor, masks: Mapping[str, torch.Tensor], base: torch.Tensor | None = None
) -> torch.Tensor:
    """base(x) + sum over adapters a of m_a * delta_a(x), with m_a of shape (batch, tokens) or (tokens,).

    Adapters the layer does not have add nothing; active adapters not in `masks` add nothing either.
    """
    out = base_projection(layer, context) if base is None else base
    for adapter, mask in masks.items():
        delta = lora_delta(layer, adapter, context)
        if delta is not None:
            out = out + mask.to(delta)[..., None] * delta
    return out


def key_alignment_loss(
    keys: torch.Tensor, base_keys: torch.Tensor, rare_mask: torch.Tensor, class_mask: torch.Tensor
) -> torch.Tensor:
    """TARA's L_align for one layer: mean |k_rare - k_class| over the rare token(s) of every sample.

    keys: LoRA-adapted keys (batch, tokens, dim); base_keys: the base model's keys of the same
    text. Each rare token's adapted key is pulled to the base key of the class word (averaged over
    its tokens when the word has several), so the rare token attends where the class word already does.
    """
    class_mask = class_mask.to(base_keys)
    rare_mask = rare_mask.to(keys)
    class_key = (class_mask[..., None] * base_keys.detach()).sum(1) / class_mask.sum(1, keepdim=True)
    distance = (keys - class_key[:, None]).abs().mean(-1)
    return (distance * rare_mask).sum() / rare_mask.sum()


class TokenMaskedLoraAttnProcessor(ComposableAttnProcessor):
    """Cross-attention whose LoRA k/v deltas count only where each adapter's mask is 1.

    masks: {adapter: 0/1 tensor (batch, 77) or (77,)}, rows in the order of the batch the UNet sees.
    Queries and outputs use the layer as it is (active or fused adapters). Keys/values are cached
    for the last context seen, so the weights must not change while the processor is installed.
    Without masks it is exactly AttnProcessor2_0.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor] | None = None):
        self.masks = dict(masks or {})
        self._context: torch.Tensor | None = None
        self._key_value: tuple[torch.Tensor, torch.Tensor] | None = None

    def precompute(self, attn, context: torch.Tensor) -> None:
        """Project this context's masked keys and values now, for every later call with the same context."""
        for adapter, mask in self.masks.items():
            if mask.ndim == 2 and mask.shape[0] != context.shape[0]:
                raise ValueError(
                    f"token mask of adapter '{adapter}' has {mask.shape[0]} rows "
                    f"for a batch of {context.shape[0]} prompts"
                )
        self._context = context
        self._key_value = (
            masked_lora_projection(attn.to_k, context, self.masks),
            masked_lora_projection(attn.to_v, context, self.masks),
        )

    def project_kv(self, attn, context):
        if not self.masks:
            return super().project_kv(attn, context)
        cached = self._context
        if cached is None or cached.shape != context.shape or not torch.equal(cached, context):
            self.precompute(attn, context)
        return self._key_value


class KeyAlignment:
    """What the training processors share in one step: the batch's token masks and each layer's L_align."""

    def __init__(self):
        self.rare_mask: torch.Tensor | None = None
        self.class_mask: torch.Tensor | None = None
        self.losses: list[torch.Tensor] = []

    def start(self, rare_mask: torch.Tensor, class_mask: torch.Tensor | None) -> None:
        """Masks (batch, 77) of this step's captions; class_mask None skips the alignment loss."""
        self.rare_mask, self.class_mask, self.losses = rare_mask, class_mask, []

    def record(self, loss: torch.Tensor) -> None:
        self.losses.append(loss)

    def loss(self) -> torch.Tensor:
        """Average over the cross-attention layers that ran in this step's forward."""
        if not self.losses:
            return torch.zeros(())
        return torch.stack(self.losses).mean()


class TaraTrainingAttnProcessor(ComposableAttnProcessor):
    """Training: one adapter's k/v delta only at the rare token, and L_align recorded from inside the layer.

    Computed in the processor rather than by forward hooks, so a recomputed forward (gradient
    checkpointing) cannot count a layer twice within one step's loss. Nothing is cached: the weights train.
    """

    def __init__(self, adapter: str, alignment: KeyAlignment):
        self.adapter = adapter
        self.alignment = alignment

    def project_kv(self, attn, context):
        masks = {self.adapter: self.alignment.rare_mask}
        base_keys = base_projection(attn.to_k, context)
        keys = masked_lora_projection(attn.to_k, context, masks, base=base_keys)
        values = masked_lora_projection(attn.to_v, context, masks)
        if self.alignment.class_mask is not None:
            self.alignment.record(
                key_alignment_loss(keys, base_keys, self.alignment.rare_mask, self.alignment.class_mask)
            )
        return keys, values
