"""Train the toy VAE: 32x32 RGB <-> 16x16x4 latents.

    python -m toyworld.train_vae --out /work/toyworld-run/vae

Trained on varied scenes (base scenes, concepts, mixed and free-colour scenes), not only on what
the base model sees: a concept LoRA can only draw what the VAE can decode. Stores
scaling_factor = 1 / std of the latents in the saved config, as Stable Diffusion does.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from .components import build_vae
from .dataset import encode_posteriors, render_base_set, scenes_to_tensors, to_uint8
from .judge import judge
from .world import CONCEPTS, concept_scene, varied_scene


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

    images, _ = scenes_to_tensors(varied_scene(seed) for seed in range(args.images))
    vae = train_vae(args.steps, images, args.batch, args.lr, args.seed)
    base_images, _ = render_base_set(5000)
    mean, _ = encode_posteriors(vae, base_images)
    vae.register_to_config(scaling_factor=float(1 / mean.std()))
    vae.save_pretrained(args.out)
    print(f"scaling_factor {vae.config.scaling_factor:.4f}", flush=True)
    report_reconstruction(vae)


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor) -> torch.Tensor:
    return vae.decode(vae.encode(images).latent_dist.mode()).sample


def report_reconstruction(vae, count: int = 200) -> None:
    """Held-out MSE, and whether the judge still sees each concept after a VAE round trip."""
    held_out, _ = render_base_set(count, first_seed=10**6)
    print(f"held-out base-scene MSE {F.mse_loss(reconstruct(vae, held_out), held_out).item():.5f}")
    for trigger in CONCEPTS:
        images, _ = scenes_to_tensors(concept_scene(trigger, seed) for seed in range(10**6, 10**6 + count))
        seen = [judge(image).has_concept(trigger) for image in to_uint8(reconstruct(vae, images))]
        print(f"{trigger}: judge finds it after reconstruction in {np.mean(seen):.0%}", flush=True)


if __name__ == "__main__":
    main()
