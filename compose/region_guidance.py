"""Pure tensor functions for region layouts: latent re-initialisation and the region losses.

Used by the `composer` method (LoRA-Composer). Maps are (batch, ..., height, width) at one
attention resolution; masks are (height, width) {0, 1} floats on the same grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention.layers import REFERENCE_MAP_CELLS


def mask_bounds(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the smallest box holding every pixel of a non-empty mask."""
    rows = mask.any(dim=1).nonzero().squeeze(1)
    cols = mask.any(dim=0).nonzero().squeeze(1)
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def gaussian_smooth(maps: torch.Tensor, kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """Gaussian blur of (..., height, width) maps with reflected borders."""
    coords = torch.arange(kernel_size, dtype=maps.dtype, device=maps.device) - (kernel_size - 1) / 2
    weights = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = torch.outer(weights, weights)
    kernel = (kernel / kernel.sum())[None, None]
    pad = (kernel_size - 1) // 2
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    mode = "reflect" if min(maps.shape[-2:]) > pad else "replicate"
    smoothed = F.conv2d(F.pad(flat, (pad, pad, pad, pad), mode=mode), kernel)
    return smoothed.reshape(maps.shape)


REFERENCE_BLUR = (3, 0.5)  # the published Gaussian smoothing of the maps: kernel size, sigma (in map cells)


def smoothing_for(map_hw: tuple[int, int]) -> tuple[int, float]:
    """(kernel size, sigma) of the map smoothing, scaled with the map so it blurs the same fraction of the
    image: the published (3, 0.5) at SD 1.5's 16x16 maps, (5, 1.0) at 32x32; the kernel keeps >= 3 cells."""
    scale = min(map_hw) / REFERENCE_MAP_CELLS
    kernel, sigma = REFERENCE_BLUR
    return 2 * max(1, round(scale * (kernel - 1) / 2)) + 1, sigma * scale


def box_gaussian(mask: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Peak-1 Gaussian centred on the mask's bounding box (box spans [-1, 1] per axis), 0 outside it."""
    top, left, bottom, right = mask_bounds(mask)
    ys = torch.linspace(-1, 1, bottom - top, dtype=mask.dtype, device=mask.device)
    xs = torch.linspace(-1, 1, right - left, dtype=mask.dtype, device=mask.device)
    bump = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma**2))
    out = torch.zeros_like(mask)
    out[top:bottom, left:right] = bump / bump.max()
    return out


def top_count(mask: torch.Tensor, ratio: float) -> int:
    """How many top values a region's losses average: floor(ratio * area), at least one."""
    return max(1, math.floor(ratio * float(mask.sum())))


def concept_enhancement_loss(token_maps: torch.Tensor, mask: torch.Tensor, weight: float = 8.0, top_ratio: float = 0.2):
    """L_fg: weight * max(0, 1 - mean of the top values of smoothed map * mask * box Gaussian).

    token_maps: (batch, tokens, height, width), already smoothed; summed over batch and tokens.
    """
    focus = token_maps * (mask * box_gaussian(mask))
    top = focus.flatten(-2).topk(top_count(mask, top_ratio), dim=-1).values.mean(dim=-1)
    return weight * (1.0 - top).clamp(min=0).sum()


def fill_loss(token_maps: torch.Tensor, mask: torch.Tensor, weight: float = 2.0) -> torch.Tensor:
    """L_fill: the masked map's row and column maxima should match the mask's row and column projections."""
    inside = token_maps * mask
    rows = (inside.amax(dim=-1) - mask.amax(dim=-1)).abs().mean(dim=-1)
    cols = (inside.amax(dim=-2) - mask.amax(dim=-2)).abs().mean(dim=-1)
    return weight * (rows + cols).sum()


def region_restriction_loss(self_maps: torch.Tensor, mask: torch.Tensor, weight: float = 10.0, top_ratio: float = 0.2):
    """L_reg: weight * mean of the top self-attention values from pixels inside the region to pixels outside.

    self_maps: (batch, tokens, tokens) with tokens = height * width of the mask.
    """
    inside = mask.flatten() > 0
    if bool(inside.all()):
        return self_maps.new_zeros(())
    leak = self_maps[:, inside][:, :, ~inside].flatten(1)
    count = min(top_count(mask, top_ratio), leak.shape[1])
    return weight * leak.topk(count, dim=-1).values.mean(dim=-1).sum()


def composer_loss(
    token_maps: list[torch.Tensor],
    self_maps: torch.Tensor | None,
    masks: list[torch.Tensor],
    fg_weight: float = 8.0,
    fill_weight: float = 2.0,
    reg_weight: float = 10.0,
    top_ratio: float = 0.2,
    blur: tuple[int, float] = REFERENCE_BLUR,
) -> torch.Tensor:
    """L = sum over regions of L_fg + L_fill + L_reg; a zero weight drops its term.

    token_maps[k]: (batch, tokens, h, w) regional cross-attention of region k's concept tokens;
    self_maps: (batch, h*w, h*w) or None when reg_weight is 0; blur: (kernel size, sigma) of the
    maps' smoothing (`smoothing_for`). The top-k counts are a fraction of each box's area, so they
    scale with the map by themselves.
    """
    total = token_maps[0].new_zeros(())
    for maps, mask in zip(token_maps, masks):
        smoothed = gaussian_smooth(maps, *blur)
        if fg_weight:
            total = total + concept_enhancement_loss(smoothed, mask, fg_weight, top_ratio)
        if fill_weight:
            total = total + fill_loss(smoothed, mask, fill_weight)
        if reg_weight:
            total = total + region_restriction_loss(self_maps, mask, reg_weight, top_ratio)
    return total


def best_window(scores: torch.Tensor, kernel: torch.Tensor) -> tuple[int, int]:
    """(top, left) of the placement of `kernel` (kh, kw) over `scores` (h, w) with the largest sum ("valid")."""
    sums = F.conv2d(scores[None, None], kernel[None, None].to(scores.dtype))[0, 0]
    index = int(sums.flatten().argmax())
    return index // sums.shape[1], index % sums.shape[1]


def reinitialize_latents(noise: torch.Tensor, scores: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """Move, per region, the noise patch where its concept already attends most into the region.

    noise: (batch, channels, h, w); scores[k]: (batch, h, w) concept attention of region k;
    masks[k]: (h, w). Patches are copied from the original noise; afterwards every sample is
    re-standardised to its original mean and std.
    """
    out = noise.clone()
    for score, mask in zip(scores, masks):
        top, left, bottom, right = mask_bounds(mask)
        shape = mask[top:bottom, left:right] > 0
        for b in range(noise.shape[0]):
            y, x = best_window(score[b], shape)
            source = noise[b, :, y : y + shape.shape[0], x : x + shape.shape[1]]
            target = out[b, :, top:bottom, left:right]
            out[b, :, top:bottom, left:right] = torch.where(shape, source, target)
    dims = tuple(range(1, noise.ndim))
    mean, std = noise.mean(dim=dims, keepdim=True), noise.std(dim=dims, keepdim=True)
    standard = (out - out.mean(dim=dims, keepdim=True)) / out.std(dim=dims, keepdim=True)
    return standard * std + mean
