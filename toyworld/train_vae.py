"""Train the toy VAE: 32x32 RGB <-> 8x8x4 latents.

    python -m toyworld.train_vae --out /work/toyworld-run/vae

Stores scaling_factor = 1 / std of the latents in the saved config, as Stable Diffusion does.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from .components import build_vae
from .dataset import encode_posteriors, render_base_set


def vae_loss(vae, images: torch.Tensor, kl_weight: float = 1e-6) -> torch.Tensor:
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample()).sample
    return F.l1_loss(recon, images) + F.mse_loss(recon, images) + kl_weight * posterior.kl().mean()


def train_vae(steps: int, images: torch.Tensor, batch: int, lr: float, seed: int, log_every: int = 100):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr)
    start = time.time()
    for step in range(1, steps + 1):
        index = torch.randint(len(images), (batch,), generator=generator)
        loss = vae_loss(vae, images[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % log_every == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
    return vae.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--images", type=int, default=40000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    images, _ = render_base_set(args.images)
    vae = train_vae(args.steps, images, args.batch, args.lr, args.seed)
    held_out, _ = render_base_set(500, first_seed=10**6)
    with torch.no_grad():
        mean, _ = encode_posteriors(vae, images[:5000])
        mse = F.mse_loss(vae.decode(vae.encode(held_out).latent_dist.mode()).sample, held_out).item()
    vae.register_to_config(scaling_factor=float(1 / mean.std()))
    vae.save_pretrained(args.out)
    print(f"held-out reconstruction MSE {mse:.5f}, scaling_factor {vae.config.scaling_factor:.4f}", flush=True)


if __name__ == "__main__":
    main()
