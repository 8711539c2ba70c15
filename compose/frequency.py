"""Fourier profiles of images: radial log-magnitude spectrum and a high-frequency score.

Pure functions on tensors; `compose.profiling` applies them to what a LoRA changes in a generation.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .errors import InvalidOptionError

_LUMA = (0.299, 0.587, 0.114)


def grayscale(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB or (H, W) -> (H, W) luminance."""
    if image.dim() == 2:
        return image
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image of shape (3, H, W) or (H, W), got {tuple(image.shape)}")
    weights = torch.tensor(_LUMA, dtype=image.dtype, device=image.device).view(3, 1, 1)
    return (image * weights).sum(dim=0)


def radial_profile(image: torch.Tensor) -> torch.Tensor:
    """Mean log-magnitude of the centred 2-D spectrum on each ring r = 0 .. min(H, W) // 2.

    Only complete rings are kept (the corners beyond the inscribed circle would be averaged over
    partial rings). The orthonormal FFT makes the profile independent of the image size.
    """
    gray = grayscale(image).double()
    height, width = gray.shape
    spectrum = torch.fft.fftshift(torch.fft.fft2(gray, norm="ortho"))
    log_magnitude = torch.log(spectrum.abs() + 1e-8)
    ys = torch.arange(height, dtype=torch.float64) - height // 2
    xs = torch.arange(width, dtype=torch.float64) - width // 2
    radius = torch.sqrt(ys[:, None] ** 2 + xs[None, :] ** 2).round().long()
    max_radius = min(height, width) // 2
    inside = radius <= max_radius
    sums = torch.zeros(max_radius + 1, dtype=torch.float64).index_add_(0, radius[inside], log_magnitude[inside])
    counts = torch.bincount(radius[inside], minlength=max_radius + 1).double()
    return sums / counts


def high_band(num_radii: int, cutoff: float) -> torch.Tensor:
    """Indices of the radii >= cutoff * max radius; cutoff is a fraction, an empty band is an error."""
    if isinstance(cutoff, bool) or not isinstance(cutoff, (int, float)) or not 0.0 < cutoff <= 1.0:
        raise InvalidOptionError(
            f"frequency cutoff {cutoff!r} must be a fraction of the maximum radius in (0, 1], e.g. 0.2 "
            "(an absolute radius in pixels leaves the band empty on small images)"
        )
    max_radius = num_radii - 1
    if max_radius < 1:
        raise InvalidOptionError(f"a profile of {num_radii} ring(s) has no high-frequency band; use a larger image")
    radii = torch.arange(num_radii)
    return radii[radii >= cutoff * max_radius]


def high_frequency_score(profile: torch.Tensor, base_profile: torch.Tensor, cutoff: float = 0.2) -> float:
    """Mean rise of the log-magnitude profile over the base's in the high band (> 0: adds fine detail)."""
    if profile.shape != base_profile.shape:
        raise ValueError(f"profiles differ in length: {tuple(profile.shape)} vs {tuple(base_profile.shape)}")
    band = high_band(profile.numel(), cutoff)
    return float((profile[band] - base_profile[band]).mean())


def rank_by_score(scores: Mapping[str, float]) -> list[str]:
    """Names by score, highest first; equal scores keep the given order."""
    return sorted(scores, key=lambda name: -scores[name])


def high_group(scores: Mapping[str, float]) -> list[str]:
    """The LoRAs that add fine detail (a positive score), highest first: the group that dominates early."""
    return [name for name in rank_by_score(scores) if scores[name] > 0]
