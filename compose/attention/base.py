"""The one attention skeleton every processor of this toolkit shares.

It is diffusers' AttnProcessor2_0 with three seams a subclass may override: how keys and values
are projected, how attention is computed, and the whole projection-attention-output block.
With none overridden it computes exactly what AttnProcessor2_0 computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ComposableAttnProcessor:
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        else:
            context = encoder_hidden_states

        hidden_states = self.block(attn, hidden_states, context, attention_mask)

        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def block(self, attn, hidden_states, context, attention_mask):
        """Projections, attention and output projection for (batch, tokens, channels) inputs."""
        query = attn.to_q(hidden_states)
        key, value = self.project_kv(attn, context)
        out = self.attend(attn, *split_heads(attn, query, key, value), attention_mask)
        return attn.to_out[0](merge_heads(out).to(query.dtype))

    def project_kv(self, attn, context):
        return attn.to_k(context), attn.to_v(context)

    def attend(self, attn, query, key, value, attention_mask):
        """(batch, heads, tokens, head_dim) in and out."""
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)


def split_heads(attn, query, key, value):
    """(batch, tokens, heads*dim) -> (batch, heads, tokens, dim), with the optional q/k norms."""
    head_dim = key.shape[-1] // attn.heads
    query, key, value = (x.view(x.shape[0], -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    batch, heads, tokens, dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * dim)


def attention_probs(attn, query, key, attention_mask=None) -> torch.Tensor:
    """Explicit softmax(QK^T * scale): only for layers whose maps a method reads (SDPA gives none)."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * attn.scale
    if attention_mask is not None:
        scores = scores + attention_mask if attention_mask.dtype != torch.bool else scores.masked_fill(~attention_mask, float("-inf"))
    if attn.upcast_softmax:
        scores = scores.float()
    return scores.softmax(dim=-1).to(query.dtype)
