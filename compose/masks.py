"""Masks from attention maps, 3x3 morphology, and mask-weighted fusion of noise predictions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dilate(mask: torch.Tensor) -> torch.Tensor:
    """3x3 dilation of (..., h, w) {0, 1} masks."""
    shape = mask.shape
    flat = mask.reshape(-1, 1, *shape[-2:])
    return F.max_pool2d(flat, kernel_size=3, stride=1, padding=1).reshape(shape)


def erode(mask: torch.Tensor) -> torch.Tensor:
    """3x3 erosion; outside the image counts as neither on nor off (max-pool padding is ignored)."""
    return 1.0 - dilate(1.0 - mask)


_MORPHOLOGY = {
    "none": lambda mask: mask,
    "dilate": dilate,
    "erode": erode,
    "open": lambda mask: dilate(erode(mask)),  # removes specks
    "close": lambda mask: erode(dilate(mask)),  # fills holes
}
MORPHOLOGY = tuple(_MORPHOLOGY)


def morph(mask: torch.Tensor, operation: str) -> torch.Tensor:
    """Apply one of MORPHOLOGY with a 3x3 structuring element."""
    return _MORPHOLOGY[operation](mask)


def threshold_mask(maps: torch.Tensor, alpha: float) -> torch.Tensor:
    """Union over tokens of [A_j > alpha * max A_j]; maps (..., h, w, J) -> {0, 1} mask (..., h, w)."""
    peak = maps.amax(dim=(-3, -2), keepdim=True)
    return (maps > alpha * peak).any(dim=-1).to(maps.dtype)


def attention_masks(
    maps: torch.Tensor, mask_tokens: list[list[int]], alpha: float, morphology: str = "none"
) -> torch.Tensor:
    """One mask per pass from its own tokens' maps; pass 0 (base) owns every pixel no other mask covers.

    maps: (K, ..., h, w, T); mask_tokens[k] are the token positions of pass k (ignored for k = 0).
    Returns (K, ..., h, w) in {0, 1}; every pixel is owned by at least one pass.
    """
    owned = [morph(threshold_mask(maps[k][..., t], alpha), morphology) for k, t in enumerate(mask_tokens) if k]
    if not owned:
        return torch.ones_like(maps[:1, ..., 0])
    covered = torch.stack(owned).amax(dim=0)
    return torch.stack([1.0 - covered, *owned])


def fuse_noise_predictions(predictions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """sum_k M_k * eps_k / sum_k M_k: each pixel takes the passes whose masks own it.

    predictions: (K, B, C, H, W); masks: (K, B, h, w), resized (nearest) to H x W here. Every pixel
    must be owned by some pass (attention_masks guarantees it).
    """
    size = predictions.shape[-2:]
    if masks.shape[-2:] != size:
        masks = F.interpolate(masks.float(), size=size, mode="nearest")
    weights = masks.to(predictions.dtype).unsqueeze(2)
    return (weights * predictions).sum(dim=0) / weights.sum(dim=0)
