"""cmlora: composite where one LoRA dominates at a time, in frequency order, and the others come from a cache.

Per step the dominant LoRA runs fresh; on the non-uniform refresh steps so does every LoRA whose
cached prediction is an interval old (all fresh passes in one batched forward). The others reuse
their last prediction (`output`) or their deep UNet feature (`deep`, the default); `reference` runs
every LoRA fresh every step, as the authors' default run does. The order comes from each
LoRA's frequency profile (cached on disk) or from the user. Algorithm and defaults:
docs/methods/cmlora.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..deep_cache import deep_features, split_features, supports_shallow_pass
from ..errors import InvalidOptionError
from ..frequency import high_group, rank_by_score
from ..profiling import ProfileSettings, profile_loras
from .base import CompositionMethod, is_whole, require
from .composite import composite_prediction

WEIGHTINGS = ("dominant", "equal")
CACHE_MODES = ("deep", "output", "reference")


def _fraction(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


@dataclass
class CmloraOptions:
    order: Sequence[str] | None = None  # adapter names, high-frequency first; None: rank by the frequency profile
    # LoRAs at the front of the order forming the high group; None: those with a positive frequency score
    # (profiled order), or all of them (the user's order), as the authors put every category but backgrounds there
    high_count: int | None = None
    split: float = 0.6  # fraction of the steps where the high group dominates
    intervals: int | Sequence[int] = (2, 3, 2)  # cache refresh interval on each of the three time segments
    boundaries: Sequence[float] = (0.375, 0.875)  # the segments' borders as fractions of the steps
    weighting: str = "dominant"  # "dominant": c = N - 0.5 rule; "equal": plain average
    # "deep": reuse a LoRA's deep UNet feature; "output": reuse its guided prediction; "reference": the authors'
    # default run, no cache (every LoRA fresh every step) with the dominant LoRA rotating at the refresh steps
    cache: str = "deep"
    profile_steps: int = 8
    profile_seed: int = 0
    profile_cutoff: float = 0.2
    # None: $LORACOMPOSE_PROFILE_CACHE or ~/.cache/loracompose/profiles. A folder on the machine that runs
    # the pipeline: a server's configuration, never a web form's field.
    profile_cache_dir: str | None = field(default=None, metadata={"server_path": True})

    def __post_init__(self):
        if self.order is not None:
            require(
                isinstance(self.order, (list, tuple)) and all(isinstance(name, str) for name in self.order),
                f"cmlora option order must be a list of adapter names, got {self.order!r}",
            )
            require(len(set(self.order)) == len(self.order), f"cmlora option order repeats a name: {list(self.order)}")
            self.order = tuple(self.order)
        require(
            self.high_count is None or is_whole(self.high_count, 0),
            f"cmlora option high_count must be a whole number >= 0 or None, got {self.high_count!r}",
        )
        require(_fraction(self.split), f"cmlora option split must be a fraction in [0, 1], got {self.split!r}")
        if is_whole(self.intervals, 1):
            self.intervals = (self.intervals,) * 3
        require(
            isinstance(self.intervals, (list, tuple)) and len(self.intervals) == 3
            and all(is_whole(k, 1) for k in self.intervals),
            f"cmlora option intervals must be a whole number >= 1 or three of them, got {self.intervals!r}",
        )  # fmt: skip
        self.intervals = tuple(self.intervals)
        require(
            isinstance(self.boundaries, (list, tuple)) and len(self.boundaries) == 2
            and all(_fraction(b) for b in self.boundaries) and self.boundaries[0] <= self.boundaries[1],
            f"cmlora option boundaries must be two increasing fractions, got {self.boundaries!r}",
        )  # fmt: skip
        self.boundaries = tuple(self.boundaries)
        require(
            self.weighting in WEIGHTINGS,
            f"cmlora option weighting must be one of {WEIGHTINGS}, got {self.weighting!r}",
        )
        require(
            self.cache in CACHE_MODES,
            f"cmlora option cache must be one of {CACHE_MODES}, got {self.cache!r}",
        )
        require(
            self.profile_cache_dir is None or isinstance(self.profile_cache_dir, (str, os.PathLike)),
            f"cmlora option profile_cache_dir must be a folder path or None, got {self.profile_cache_dir!r}",
        )
        self.profile_settings()  # raises on bad profiling options

    def profile_settings(self) -> ProfileSettings:
        return ProfileSettings(steps=self.profile_steps, seed=self.profile_seed, cutoff=self.profile_cutoff)


@dataclass(frozen=True)
class StepPlan:
    """Which LoRA dominates a step and which LoRAs run fresh (indices into the call's LoRAs, ascending)."""

    dominant: int
    fresh: tuple[int, ...]


def step_intervals(num_steps: int, intervals: Sequence[int], boundaries: Sequence[float]) -> list[int]:
    """The cache interval in force at each step: three segments cut at `boundaries` (fractions of the steps)."""
    first, second = int(boundaries[0] * num_steps), int(boundaries[1] * num_steps)
    return [intervals[0] if s < first else intervals[1] if s < second else intervals[2] for s in range(num_steps)]


def refresh_steps(num_steps: int, intervals: Sequence[int], boundaries: Sequence[float]) -> list[bool]:
    """True on the refresh steps: each segment's first step, then every interval of that segment."""
    first, second = int(boundaries[0] * num_steps), int(boundaries[1] * num_steps)
    refresh = [False] * num_steps
    for start, end, interval in zip((0, first, second), (first, second, num_steps), intervals):
        for step in range(start, end, interval):
            refresh[step] = True
    return refresh


def plan_steps(
    num_steps: int,
    order: Sequence[int],
    high_count: int,
    split: float,
    intervals: Sequence[int],
    boundaries: Sequence[float],
    cached: bool = True,
) -> list[StepPlan]:
    """The whole schedule.

    The dominant LoRA runs fresh every step and moves on through its phase's group at every
    refresh step. On a refresh step every other LoRA whose cached prediction is at least one
    interval old runs fresh too; the LoRA that dominated until the step before is still younger
    than that and keeps its prediction until the next refresh step. Not cached: every LoRA runs
    fresh every step (the authors' default run); the dominant LoRA rotates all the same.
    """
    interval = step_intervals(num_steps, intervals, boundaries)
    refresh = refresh_steps(num_steps, intervals, boundaries)
    high, low = list(order[:high_count]), list(order[high_count:])
    phase_end = int(split * num_steps)
    plans, rotation, last_fresh = [], 0, {}
    for step in range(num_steps):
        group = (high if step < phase_end else low) or list(order)
        rotation = 0 if step in (0, phase_end) else rotation + refresh[step]
        dominant = group[rotation % len(group)]
        fresh = [
            k
            for k in sorted(order)
            if not cached
            or k == dominant
            or k not in last_fresh
            or (refresh[step] and step - last_fresh[k] >= interval[step])
        ]
        last_fresh.update((k, step) for k in fresh)
        plans.append(StepPlan(dominant, tuple(fresh)))
    return plans


def predicted_unet_usage(plans: Sequence[StepPlan]) -> tuple[int, int]:
    """(UNet calls, LoRA passes) the schedule costs: one batched call per step, one pass per fresh LoRA."""
    return len(plans), sum(len(plan.fresh) for plan in plans)


def predicted_shallow_usage(plans: Sequence[StepPlan], count: int) -> tuple[int, int]:
    """(calls, passes) of the shallow UNet in `deep` mode: one batched call per step with a cached LoRA."""
    cached = [count - len(plan.fresh) for plan in plans]
    return sum(1 for n in cached if n), sum(cached)


def combination_weights(count: int, dominant: int, weighting: str) -> list[float] | None:
    """The paper's rule: c = N - 0.5, dominant c / (c + N - 1), others 1 / (c + N - 1); None = plain mean."""
    if weighting == "equal":
        return None
    c = count - 0.5
    return [c / (c + count - 1) if k == dominant else 1 / (c + count - 1) for k in range(count)]


def combine(predictions: Sequence[torch.Tensor], weights: Sequence[float] | None) -> torch.Tensor:
    """Weighted sum of guided predictions; without weights the same mean composite takes."""
    if weights is None:
        return torch.stack(list(predictions)).mean(dim=0)
    return sum(weight * prediction for weight, prediction in zip(weights, predictions))


class CmloraMethod(CompositionMethod):
    name = "cmlora"
    options_class = CmloraOptions

    def check(self, pipe, prompt, loras):
        super().check(pipe, prompt, loras)
        names = [lora.adapter for lora in loras]
        order = self.options.order
        if order is not None and sorted(order) != sorted(names):
            raise InvalidOptionError(
                f"cmlora option order {list(order)} must name each LoRA of the call exactly once: {names}"
            )
        if self.options.high_count is not None and self.options.high_count > len(loras):
            raise InvalidOptionError(
                f"cmlora option high_count {self.options.high_count} exceeds the number of LoRAs ({len(loras)})"
            )
        reason = supports_shallow_pass(pipe.unet) if self.options.cache == "deep" else None
        if reason:
            raise InvalidOptionError(f"cmlora cache='deep' cannot run on this UNet: {reason}; use cache='output'")

    def prepare(self, ctx):
        names, scores = [lora.adapter for lora in ctx.loras], None
        if self.options.order is not None:
            ranked = list(self.options.order)
        elif len(ctx.loras) == 1:
            ranked = names
        else:
            settings = self.options.profile_settings()
            profiles = profile_loras(ctx.pipe, ctx.loras, settings, self.options.profile_cache_dir)
            scores = {profile.adapter: profile.score for profile in profiles}
            ctx.outputs["frequency_scores"] = scores
            ranked = rank_by_score(scores)
        high_count = self.options.high_count
        if high_count is None:
            high_count = len(ranked) if scores is None else len(high_group(scores))
        self._plans = plan_steps(
            len(ctx.timesteps),
            [names.index(name) for name in ranked],
            high_count,
            self.options.split,
            self.options.intervals,
            self.options.boundaries,
            cached=self.options.cache != "reference",
        )
        self._cache: dict[int, torch.Tensor] = {}
        self._features: dict[int, torch.Tensor] = {}
        ctx.outputs["order"] = ranked
        ctx.outputs["schedule"] = []
        if self.options.cache == "deep":
            ctx.outputs["shallow_unet_calls"] = ctx.outputs["shallow_unet_passes"] = 0

    def noise_prediction(self, ctx, latents, t, i):
        plan = self._plans[i]
        if self.options.cache == "deep":
            self._deep_step(ctx, latents, t, plan)
        else:
            fresh = composite_prediction(ctx, latents, t, [ctx.loras[k] for k in plan.fresh], batched=True)
            self._cache.update(zip(plan.fresh, fresh))
        predictions = [self._cache[k] for k in range(len(ctx.loras))]
        ctx.outputs["schedule"].append(
            {"dominant": ctx.loras[plan.dominant].adapter, "fresh": [ctx.loras[k].adapter for k in plan.fresh]}
        )
        weights = combination_weights(len(ctx.loras), plan.dominant, self.options.weighting)
        return combine(predictions, weights), latents

    def _deep_step(self, ctx, latents, t, plan: StepPlan) -> None:
        """Fresh LoRAs run fully and leave their deep feature; the others run shallow on their cached one."""
        with deep_features(ctx.unet) as captured:
            fresh = composite_prediction(ctx, latents, t, [ctx.loras[k] for k in plan.fresh], batched=True)
        self._cache.update(zip(plan.fresh, fresh))
        self._features.update(zip(plan.fresh, split_features(captured[0], len(plan.fresh))))
        cached = [k for k in range(len(ctx.loras)) if k not in plan.fresh]
        if cached:
            passes = [ctx.lora_pass(ctx.loras[k]) for k in cached]
            pairs = ctx.predict(latents, t, passes, deep_features=[self._features[k] for k in cached])
            self._cache.update(zip(cached, [ctx.guide(uncond, cond) for uncond, cond in pairs]))
            ctx.outputs["shallow_unet_calls"] += 1
            ctx.outputs["shallow_unet_passes"] += len(cached)

    def release(self, ctx):
        self._cache, self._features = {}, {}
