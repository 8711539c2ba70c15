"""A tiny random Stable Diffusion pipeline and random LoRAs for it, built in code.

Used by tests, benchmarks and `--model tiny`: it runs offline in a fraction of a second and has
the real architecture (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from compose.saving import save_lora

from .stable_diffusion import MultiLoraStableDiffusionPipeline

# Whole-word tokens; any other word is spelled in byte-level pieces (several tokens).
TINY_WORDS = (
    "a an and the of on in at with photo picture painting style left right top bottom middle "
    "cat dog man woman car tree house red blue green yellow white black circle square triangle "
    "sks zwx"
).split()


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (printable ASCII/Latin-1 kept as is)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(shifted)) for b in range(256)]


def tiny_tokenizer(words=TINY_WORDS) -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer whose vocabulary holds `words` whole and every byte."""
    chars = byte_symbols()
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    merges = list(dict.fromkeys(merges))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="<|endoftext|>")


def tiny_pipeline(seed: int = 0) -> MultiLoraStableDiffusionPipeline:
    """Random weights, 64 px images, 32x32 latents, cross-attention width 32."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
        )
    )
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    return MultiLoraStableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def random_lora_layers(pipe, seed: int, rank: int = 4, text_encoder: bool = False, strength: float = 0.1):
    """Random (A, B) pairs for every attention projection; big enough to change the image visibly."""
    generator = torch.Generator().manual_seed(seed)
    components = [("unet", pipe.unet, UNET_TARGETS)]
    if text_encoder:
        components.append(("text_encoder", pipe.text_encoder, TEXT_TARGETS))
    layers = {}
    for component, model, targets in components:
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(targets) and "base_layer" not in name:
                down = torch.randn(rank, module.in_features, generator=generator) * strength
                up = torch.randn(module.out_features, rank, generator=generator) * strength
                layers[(component, name.removesuffix(".base_layer"))] = (down, up)
    return layers


def write_random_lora(
    pipe,
    path: str | Path,
    seed: int,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    text_encoder: bool = False,
    fmt: str = "diffusers",
    trigger: str | None = None,
    concept: str | None = None,
) -> Path:
    """A random LoRA file for `pipe` in either layout (same weights for the same seed)."""
    layers = random_lora_layers(pipe, seed, rank, text_encoder)
    return save_lora(path, layers, rank, alpha, fmt=fmt, trigger=trigger, concept=concept)
