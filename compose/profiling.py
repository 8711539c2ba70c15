"""Frequency profiles of LoRAs: a short seeded generation with and without each LoRA, cached on disk.

A LoRA's profile is the radial log-magnitude spectrum of the image it produces next to the base
model's image (same prompt, seed and starting noise). It depends only on the LoRA file, its weight,
the base model and these settings, so it is computed once and stored as JSON keyed by all of them.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .adapters import BASE, restore, snapshot
from .context import DenoiseContext, Pass, text_encoders
from .frequency import high_frequency_score, radial_profile
from .loading import load_adapters, resolve_loras
from .methods.base import require
from .spec import LoraSpec, ResolvedLora

PROFILE_CACHE_ENV = "LORACOMPOSE_PROFILE_CACHE"
_FORMAT = 1  # bump when the stored profile changes meaning


@dataclass(frozen=True)
class ProfileSettings:
    """How a profile is measured; all of it except `cutoff` is part of the cache key."""

    steps: int = 8
    seed: int = 0
    cutoff: float = 0.2  # high band: radii >= cutoff x max radius (applied when reading, not stored)
    guidance_scale: float = 7.5
    prompt: str | None = None  # None: "a <trigger> <concept word>" (with what the LoRA has of them), else "a picture"

    def __post_init__(self):
        for name in ("steps", "seed"):
            value = getattr(self, name)
            require(
                isinstance(value, int) and not isinstance(value, bool) and value >= (1 if name == "steps" else 0),
                f"profile {name} must be a whole number >= {1 if name == 'steps' else 0}, got {value!r}",
            )
        require(
            isinstance(self.cutoff, (int, float)) and not isinstance(self.cutoff, bool) and 0 < self.cutoff <= 1,
            f"profile cutoff must be a fraction of the maximum radius in (0, 1], got {self.cutoff!r}",
        )
        require(
            isinstance(self.guidance_scale, (int, float)) and not isinstance(self.guidance_scale, bool),
            f"profile guidance_scale must be a number, got {self.guidance_scale!r}",
        )
        require(
            self.prompt is None or (isinstance(self.prompt, str) and self.prompt.strip() != ""),
            f"profile prompt must be a non-empty string or None, got {self.prompt!r}",
        )

    def prompt_for(self, lora: ResolvedLora) -> str:
        if self.prompt is not None:
            return self.prompt
        words = " ".join(word for word in (lora.trigger, lora.concept) if word)
        return f"a {words}" if words else "a picture"


@dataclass
class LoraProfile:
    """One LoRA's radial spectrum beside the base model's, and its high-frequency score."""

    adapter: str
    sha256: str
    score: float
    profile: list[float]
    base_profile: list[float]
    cached: bool  # read from the cache rather than computed now


def default_cache_dir() -> Path:
    return Path(os.environ.get(PROFILE_CACHE_ENV) or Path.home() / ".cache" / "loracompose" / "profiles")


def model_identity(pipe) -> str:
    """Hash of the configs and a few weights of the UNet, VAE and text encoder(s) (LoRA weights excluded)."""
    digest = hashlib.sha256()
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        if model is None:
            continue
        config = model.config if isinstance(model.config, dict) else model.config.to_dict()
        digest.update(f"{name}:{type(model).__name__}:{_config_json(config)}".encode())
        params = [p for n, p in model.named_parameters() if "lora_" not in n]
        for param in (params[0], params[len(params) // 2], params[-1]):
            digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _config_json(config) -> str:
    """A config as stable text: private keys (e.g. diffusers' unordered `_use_default_values`) and versions dropped."""
    kept = {k: v for k, v in dict(config).items() if not k.startswith("_") and k != "transformers_version"}
    return json.dumps(kept, sort_keys=True, default=str)


def profile_key(lora: ResolvedLora, model: str, pipe, settings: ProfileSettings) -> str:
    """Everything the stored profile depends on, hashed."""
    scheduler = pipe.scheduler
    fields = {
        "format": _FORMAT,
        "lora": lora.sha256,
        "weight": lora.weight,
        "model": model,
        "scheduler": [type(scheduler).__name__, _config_json(scheduler.config)],
        "steps": settings.steps,
        "seed": settings.seed,
        "guidance_scale": settings.guidance_scale,
        "prompt": settings.prompt_for(lora),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def profile_loras(
    pipe, loras: Iterable[ResolvedLora], settings: ProfileSettings | None = None, cache_dir: str | Path | None = None
) -> list[LoraProfile]:
    """Profiles of LoRAs already loaded as adapters of `pipe`, from the cache or computed and stored."""
    settings = settings or ProfileSettings()
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    model = model_identity(pipe)
    base_images: dict[str, torch.Tensor] = {}
    results = []
    for lora in loras:
        path = folder / f"{lora.sha256[:16]}-{profile_key(lora, model, pipe, settings)[:16]}.json"
        stored = _read(path, lora.sha256)
        cached = stored is not None
        if stored is None:
            prompt = settings.prompt_for(lora)
            if prompt not in base_images:
                base_images[prompt] = final_image(pipe, None, prompt, settings)
            stored = {
                "lora_sha256": lora.sha256,
                "model": model,
                "settings": {**asdict(settings), "prompt": prompt, "weight": lora.weight},
                "profile": radial_profile(final_image(pipe, lora, prompt, settings)).tolist(),
                "base_profile": radial_profile(base_images[prompt]).tolist(),
            }
            _write(path, stored)
        profile, base = torch.tensor(stored["profile"]), torch.tensor(stored["base_profile"])
        score = high_frequency_score(profile, base, settings.cutoff)
        results.append(LoraProfile(lora.adapter, lora.sha256, score, stored["profile"], stored["base_profile"], cached))
    return results


def final_image(pipe, lora: ResolvedLora | None, prompt: str, settings: ProfileSettings) -> torch.Tensor:
    """The decoded (3, H, W) image of a short seeded generation with only this LoRA (None: the base)."""
    height = width = pipe.unet.config.sample_size * pipe.vae_scale_factor
    ctx = DenoiseContext(
        pipe=pipe, prompt=prompt, negative_prompt="", loras=[lora] if lora else [],
        guidance_scale=settings.guidance_scale, guidance_rescale=0.0, height=height, width=width,
        num_images=1, clip_skip=None, cross_attention_kwargs=None,
    )  # fmt: skip
    step = ctx.lora_pass(lora) if lora is not None else Pass(BASE, *ctx.encode(prompt))
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(settings.steps, device=pipe._execution_device)
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    with _scheduler_swapped(pipe, scheduler):
        latents = pipe.prepare_latents(
            1, pipe.unet.config.in_channels, height, width, step.embeds.dtype, pipe._execution_device, generator
        )
        for t in scheduler.timesteps:
            [(uncond, cond)] = ctx.predict(latents, t, [step])
            latents = scheduler.step(ctx.guide(uncond, cond), t, latents, return_dict=False)[0]
    return pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0][0].float().cpu()


@contextmanager
def _scheduler_swapped(pipe, scheduler) -> Iterator[None]:
    """A private scheduler for the pre-pass, so a profile taken inside a call leaves the call's scheduler alone."""
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield
    finally:
        pipe.scheduler = original


def profile_lora_files(
    pipe, sources: Iterable[LoraSpec | str | Path], settings: ProfileSettings | None = None, cache_dir=None
) -> list[LoraProfile]:
    """Resolve, load and profile LoRA files; the pipeline's adapter state is as before afterwards."""
    resolved = resolve_loras(pipe, sources)
    models = (pipe.unet, *text_encoders(pipe))
    state = snapshot(models)
    try:
        load_adapters(pipe, resolved)
        return profile_loras(pipe, resolved, settings, cache_dir)
    finally:
        restore(models, state)


def _read(path: Path, sha256: str) -> dict | None:
    """A stored profile, or None when missing, unreadable or for another file."""
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("lora_sha256") != sha256:
        return None
    if not isinstance(stored.get("profile"), list) or not isinstance(stored.get("base_profile"), list):
        return None
    return stored


def _write(path: Path, stored: dict) -> None:
    """Write through a temporary file so a concurrent reader never sees half a profile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(stored))
    os.replace(temporary, path)
