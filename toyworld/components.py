"""The diffusers/transformers components of the toy model, built from config (no weights)."""
from __future__ import annotations

from diffusers import AutoencoderKL, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .world import SIZE

# The noise schedule of Stable Diffusion 1.x, so pipelines treat the toy model like the real one.
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
TEXT_WIDTH = 64


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=SIZE,
    )


LATENT_SIZE = SIZE // 2  # the VAE downsamples once: 16x16 latents
UNET_CHANNELS = (32, 64, 128)  # cross-attention maps of 16x16, 8x8 and 4x4


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * len(UNET_CHANNELS),
        up_block_types=("CrossAttnUpBlock2D",) * len(UNET_CHANNELS),
        block_out_channels=UNET_CHANNELS,
        layers_per_block=1,
        attention_head_dim=8,
        cross_attention_dim=TEXT_WIDTH,
        norm_num_groups=16,
    )


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE, prediction_type="epsilon")


def sampling_scheduler() -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(**SCHEDULE, prediction_type="epsilon", algorithm_type="dpmsolver++")


def load_checked(model, weights: dict, source: str) -> None:
    """Load weights that must cover the model (position ids, a buffer, may be absent)."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.endswith("position_ids") for k in missing):
        raise ValueError(f"{source} does not match the toy model: missing {missing}, unexpected {unexpected}")
