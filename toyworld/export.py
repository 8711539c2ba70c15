"""Export a base-model checkpoint's EMA weights as a diffusers StableDiffusionPipeline folder.

    python -m toyworld.export --run-dir /work/toyworld-run --out toyworld/model

Works on any checkpoint, intermediate or final. Weights are stored as fp16 safetensors (a few MB)
and load back as float32 by default.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from . import default_model_path
from .components import build_text_encoder, build_unet, load_checked, sampling_scheduler
from .tokenizer import build_tokenizer


def load_ema_components(checkpoint: dict) -> tuple:
    """UNet and text encoder carrying the checkpoint's EMA weights."""
    tokenizer = build_tokenizer()
    unet, text_encoder = build_unet(), build_text_encoder(tokenizer)
    for prefix, model in (("unet.", unet), ("text_encoder.", text_encoder)):
        weights = {k[len(prefix):]: v for k, v in checkpoint["ema"].items() if k.startswith(prefix)}
        load_checked(model, weights, "checkpoint")
    return tokenizer, unet.eval(), text_encoder.eval()


def build_pipeline(run_dir: Path) -> tuple[StableDiffusionPipeline, dict]:
    checkpoint = torch.load(run_dir / "base.pt", weights_only=True)
    tokenizer, unet, text_encoder = load_ema_components(checkpoint)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(run_dir / "vae").eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sampling_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe, checkpoint


def save_fp16(pipe: StableDiffusionPipeline, out: Path) -> None:
    """Save half-size weights that still load as float32 without a torch_dtype argument.

    transformers reads the text encoder's config `dtype` as the default load dtype, so it is
    set back to float32 (diffusers models load as float32 anyway).
    """
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    config_path = out / "text_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="/work/toyworld-run")
    parser.add_argument("--out", default=str(default_model_path()))
    args = parser.parse_args()
    pipe, checkpoint = build_pipeline(Path(args.run_dir))
    save_fp16(pipe, Path(args.out))
    training = {"step": checkpoint["step"], "minutes": round(checkpoint["minutes"], 1), "args": checkpoint["args"]}
    (Path(args.out) / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    print(f"exported step {checkpoint['step']} ({checkpoint['minutes']:.1f} min of training) to {args.out}")


if __name__ == "__main__":
    main()
