"""Train the toy text-to-image base model (UNet + text encoder) on VAE latents of the toy world.

    python -m toyworld.train_base --run-dir /work/toyworld-run --steps 4500 --max-minutes 80

Needs a VAE in RUN_DIR/vae (toyworld.train_vae). Checkpoints to RUN_DIR/base.pt every few hundred
steps and resumes from it, so a stopped run continues where it was; a fixed seed plus the stored
generator state make the run repeatable.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from .components import build_text_encoder, build_unet, load_checked, training_scheduler
from .dataset import encode_posteriors, render_base_set
from .tokenizer import build_tokenizer

CAPTION_DROPOUT = 0.1  # empty captions teach the unconditional prediction that CFG needs


def ema_decay(step: int, limit: float) -> float:
    """Warm-up decay: early EMA weights are not dominated by the random initialisation."""
    return min(limit, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], params: dict[str, torch.Tensor], decay: float) -> None:
    for name, value in params.items():
        ema[name].lerp_(value, 1 - decay)


def trainable(unet, text_encoder) -> dict[str, torch.Tensor]:
    """All trained parameters under one namespace ('unet.*', 'text_encoder.*')."""
    return {
        **{f"unet.{k}": v for k, v in unet.named_parameters()},
        **{f"text_encoder.{k}": v for k, v in text_encoder.named_parameters()},
    }


def load_latents(run_dir: Path, count: int) -> dict[str, torch.Tensor]:
    """Posterior mean/std and token ids of the training set, encoded once and cached in run_dir."""
    cache = run_dir / f"latents-{count}.pt"
    if cache.exists():
        return torch.load(cache, weights_only=True)
    vae = AutoencoderKL.from_pretrained(run_dir / "vae").eval()
    images, captions = render_base_set(count)
    mean, std = encode_posteriors(vae, images)
    tokenizer = build_tokenizer()
    ids = lambda texts: tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt").input_ids
    data = {"mean": mean * vae.config.scaling_factor, "std": std * vae.config.scaling_factor,
            "input_ids": ids(captions), "empty_ids": ids([""])}
    torch.save(data, cache)
    return data


def load_exported(unet, text_encoder, model_dir: Path) -> None:
    """Start from an exported model's weights (a fine-tune); its own checkpoint still wins on resume."""
    for name, model in (("unet", unet), ("text_encoder", text_encoder)):
        folder = model_dir / name
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder} holds no .safetensors weights: pass a folder made by toyworld.export")
        weights = {k: v.float() for k, v in load_file(files[0]).items()}
        load_checked(model, weights, str(folder))


def hide_padding(text: torch.Tensor, input_ids: torch.Tensor, empty: torch.Tensor, eos: int,
                 rows: torch.Tensor) -> torch.Tensor:
    """In the chosen rows, the states from the first end token on become the empty caption's.

    A causal text encoder's end and padding states each summarise the whole caption, and a small
    UNet trained on them reads that summary, which does not bind a colour to its shape; without it,
    the UNet must read each word's own state, where the encoder does bind them (measured in RECIPE).
    """
    after_end = (input_ids == eos).cumsum(dim=1) > 0
    hidden = after_end & rows[:, None]
    return torch.where(hidden[..., None], empty.expand_as(text), text)


def learning_rate(step: int, args) -> float:
    """Constant, then a linear fall to a tenth over the last `decay_steps` steps: a function of the
    step alone, so a resumed run follows the same schedule."""
    left = args.steps - step
    if left >= args.decay_steps:
        return args.lr
    return args.lr * (0.1 + 0.9 * left / args.decay_steps)


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(args) -> None:
    run_dir = Path(args.run_dir)
    data = load_latents(run_dir, args.images)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    unet, text_encoder = build_unet(), build_text_encoder(tokenizer)
    if args.init_from:
        load_exported(unet, text_encoder, Path(args.init_from))
    params = trainable(unet, text_encoder)
    ema = {k: v.detach().clone() for k, v in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    step, minutes_before = 0, 0.0

    checkpoint_path = run_dir / "base.pt"
    if checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=True)
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        ema = state["ema"]
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step, minutes_before = state["step"], state["minutes"]
        print(f"resumed at step {step}", flush=True)

    scheduler = training_scheduler()
    start, running = time.time(), 0.0
    minutes = lambda: minutes_before + (time.time() - start) / 60

    def checkpoint() -> None:
        save_checkpoint(checkpoint_path, {
            "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "ema": ema,
            "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
            "step": step, "minutes": minutes(), "args": vars(args),
        })
        print(f"checkpoint at step {step}, {minutes():.1f} min", flush=True)

    while step < args.steps and minutes() < args.max_minutes:
        index = torch.randint(len(data["mean"]), (args.batch,), generator=generator)
        latents = data["mean"][index] + data["std"][index] * torch.randn(
            data["mean"][index].shape, generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (args.batch,), generator=generator)
        drop = torch.rand(args.batch, generator=generator) < CAPTION_DROPOUT
        input_ids = torch.where(drop[:, None], data["empty_ids"], data["input_ids"][index])

        text = text_encoder(input_ids).last_hidden_state
        if args.pad_dropout:
            hide = torch.rand(args.batch, generator=generator) < args.pad_dropout
            empty = text_encoder(data["empty_ids"]).last_hidden_state
            text = hide_padding(text, input_ids, empty, tokenizer.eos_token_id, hide)
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, text).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        optimizer.step()
        step += 1
        ema_update(ema, params, ema_decay(step, args.ema))

        running += loss.item()
        if step % args.log_every == 0:
            print(f"step {step} loss {running / args.log_every:.4f} {minutes():.1f} min", flush=True)
            running = 0.0
        if step % args.checkpoint_every == 0:
            checkpoint()
    if step % args.checkpoint_every:
        checkpoint()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", default="/work/toyworld-run")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--init-from", help="an exported model folder to fine-tune instead of starting from noise")
    parser.add_argument("--max-minutes", type=float, default=float("inf"))
    parser.add_argument("--images", type=int, default=40000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--decay-steps", type=int, default=0, help="fall to lr/10 over the last N steps")
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--pad-dropout", type=float, default=0.0,
                        help="share of captions whose end and padding states are replaced by the empty caption's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train(args)


if __name__ == "__main__":
    main()
