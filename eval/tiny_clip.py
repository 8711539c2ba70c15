"""A tiny random transformers CLIP built in code: `clip = "tiny"` in configs, and the tests' CLIP.

Its scores carry no meaning; it exercises the scoring path offline in milliseconds.
"""

from __future__ import annotations

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from pipelines.tiny import tiny_tokenizer


def tiny_clip(seed: int = 0, image_size: int = 32, context_length: int = 16) -> tuple[CLIPModel, CLIPProcessor]:
    """Random CLIPModel (width 32, 2 layers, projection 16) and a processor sharing the tiny pipeline's tokenizer."""
    tokenizer = tiny_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=context_length, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
            image_size=image_size, patch_size=8,
        ),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    size = {"shortest_edge": image_size}
    crop = {"height": image_size, "width": image_size}
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size=size, crop_size=crop), tokenizer=tokenizer)
    return model, processor
