"""Tiny random Stable Diffusion and SDXL pipelines and random LoRAs for them, built in code.

Used by tests, benchmarks, `--model tiny` and `--model tiny-sdxl`: they run offline in a fraction
of a second and have the real architectures (UNet2DConditionModel, AutoencoderKL, CLIP text
encoders, CLIPTokenizer; SDXL: two encoders, pooled embeddings and time ids).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from compose.saving import save_lora
from compose.unet_names import diffusers_to_original

from .stable_diffusion import MultiLoraStableDiffusionPipeline
from .stable_diffusion_xl import MultiLoraStableDiffusionXLPipeline

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


def tiny_tokenizer(words=TINY_WORDS, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer whose vocabulary holds `words` whole and every byte.

    SDXL's second tokenizer is the same one padding with "!" instead of the end token.
    """
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
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token=pad_token)


def tiny_pipeline(seed: int = 0) -> MultiLoraStableDiffusionPipeline:
    """Random weights, 64 px images, 32x32 latents, cross-attention width 32."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    unet = tiny_unet(cross_attention_dim=32, norm_num_groups=32)
    vae = tiny_vae()
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
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


def tiny_unet(**settings) -> UNet2DConditionModel:
    """Two levels, cross-attention at the coarse one only: 32x32 latents; `settings` add the rest."""
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **settings,
    )


def tiny_vae() -> AutoencoderKL:
    """Two levels: 64 px images, 32x32 latents."""
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
    )


def tiny_text_config(tokenizer, **overrides) -> CLIPTextConfig:
    """A two-layer CLIP text encoder of width 32."""
    settings = dict(
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
    return CLIPTextConfig(**(settings | overrides))


def tiny_sdxl_pipeline(seed: int = 0) -> MultiLoraStableDiffusionXLPipeline:
    """SDXL's architecture in miniature: 64 px images, cross-attention width 64 from two width-32 encoders,
    two transformer layers per attention block at the coarse level, "text_time" added conditions."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    tokenizer_2 = tiny_tokenizer(pad_token="!")
    unet = tiny_unet(
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids of width 8, pooled text of width 32
        cross_attention_dim=64,
        norm_num_groups=32,
    )
    vae = tiny_vae()
    text_encoder = CLIPTextModel(tiny_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(
        tiny_text_config(tokenizer_2, projection_dim=32)
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return MultiLoraStableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet.eval(),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def random_lora_layers(pipe, seed: int, rank: int = 4, text_encoder: bool = False, strength: float = 0.1):
    """Random (A, B) pairs for every attention projection; big enough to change the image visibly."""
    generator = torch.Generator().manual_seed(seed)
    components = [("unet", pipe.unet, UNET_TARGETS)]
    if text_encoder:
        components.append(("text_encoder", pipe.text_encoder, TEXT_TARGETS))
        if getattr(pipe, "text_encoder_2", None) is not None:
            components.append(("text_encoder_2", pipe.text_encoder_2, TEXT_TARGETS))
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
    """A random LoRA file for `pipe` in either layout (same weights for the same seed).

    SDXL kohya files name UNet layers in the original layout (`input_blocks_4_1_...`), as real ones do.
    """
    layers = random_lora_layers(pipe, seed, rank, text_encoder)
    if fmt == "kohya" and getattr(pipe, "text_encoder_2", None) is not None:
        config = pipe.unet.config
        layers = {
            (component, diffusers_to_original(name, config) if component == "unet" else name): pair
            for (component, name), pair in layers.items()
        }
    return save_lora(path, layers, rank, alpha, fmt=fmt, trigger=trigger, concept=concept)
