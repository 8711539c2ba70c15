"""Scenes as training tensors. A data set is a range of seeds, e.g. `base_scene` for seeds 0..n-1,
or `concept_scene("sks", seed)` for a concept LoRA."""
from __future__ import annotations

import numpy as np
import torch

from collections.abc import Iterable

from .world import Scene, base_scene


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float (n, 3, H, W) in [-1, 1], the range diffusers' VAEs expect."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def scenes_to_tensors(scenes: Iterable[Scene]) -> tuple[torch.Tensor, list[str]]:
    """Images in [-1, 1] (n, 3, 32, 32) and their captions."""
    scenes = list(scenes)
    return to_tensor(np.stack([s.image for s in scenes])), [s.caption for s in scenes]


def render_base_set(count: int, first_seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    return scenes_to_tensors(base_scene(seed) for seed in range(first_seed, first_seed + count))


@torch.no_grad()
def encode_posteriors(vae, images: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of each image, so training samples latents without the encoder."""
    means, stds = [], []
    for chunk in images.split(batch):
        posterior = vae.encode(chunk).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)
