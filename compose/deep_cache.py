"""DeepCache-style partial UNet passes: reuse the deep feature, recompute only the outermost blocks.

A full pass records the input of the UNet's last up-block (the "deep feature"). A shallow pass
runs the time embedding, conv_in, the first down-block, the last up-block on the recorded deep
feature and the output convolution: the skip connections of the outermost level are fresh, the rest
is reused. Stable Diffusion and SDXL UNets (SDXL's "text_time" addition embedding is supported; class
embeddings, other addition embeddings and centred input are not).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def supports_shallow_pass(unet) -> str | None:
    """Why this UNet cannot run shallow passes, or None when it can."""
    config = unet.config
    if config.class_embed_type is not None or config.num_class_embeds is not None:
        return "it has class embeddings"
    if config.addition_embed_type not in (None, "text_time"):
        return f"it has an addition embedding ({config.addition_embed_type})"
    if config.center_input_sample or config.time_cond_proj_dim is not None:
        return "it centres its input or takes a guidance embedding"
    if len(unet.down_blocks) < 2:
        return "it has a single resolution level"
    return None


@contextmanager
def deep_features(unet) -> Iterator[list[torch.Tensor]]:
    """Within the block, every UNet forward appends the input of its last up-block to the yielded list."""
    captured: list[torch.Tensor] = []

    def record(_module, args, kwargs):
        captured.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    handle = unet.up_blocks[-1].register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def _cross_attention(block, encoder_hidden_states, cross_attention_kwargs) -> dict:
    if getattr(block, "has_cross_attention", False):
        return {"encoder_hidden_states": encoder_hidden_states, "cross_attention_kwargs": cross_attention_kwargs}
    return {}


def shallow_forward(
    unet, sample, timestep, encoder_hidden_states, deep_feature, cross_attention_kwargs=None, added_cond_kwargs=None
):
    """The UNet's noise prediction with everything between the outermost blocks taken from `deep_feature`.

    added_cond_kwargs: SDXL's pooled text embeddings and time ids, as the full forward takes them.
    """
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    added = unet.get_aug_embed(emb, encoder_hidden_states, added_cond_kwargs)
    if added is not None:
        emb = emb + added
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    hidden = unet.conv_in(sample)
    first, last = unet.down_blocks[0], unet.up_blocks[-1]
    attend_first = _cross_attention(first, encoder_hidden_states, cross_attention_kwargs)
    _, skips = first(hidden_states=hidden, temb=emb, **attend_first)
    skips = ((hidden,) + tuple(skips))[: len(last.resnets)]
    out = last(
        hidden_states=deep_feature,
        temb=emb,
        res_hidden_states_tuple=skips,
        **_cross_attention(last, encoder_hidden_states, cross_attention_kwargs),
    )
    if unet.conv_norm_out is not None:
        out = unet.conv_act(unet.conv_norm_out(out))
    return unet.conv_out(out)


def split_features(feature: torch.Tensor, count: int) -> list[torch.Tensor]:
    """The deep feature of one batched forward, cut into its `count` passes (each with its CFG halves)."""
    return list(feature.chunk(count))
