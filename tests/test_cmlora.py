"""cmlora: equivalences with composite and a single LoRA, UNet cost vs schedule, frequency profiles and their cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from compose.deep_cache import deep_features, shallow_forward
from compose.errors import InvalidOptionError
import compose.methods.cmlora as cmlora_module
from compose.frequency import high_band, high_frequency_score, high_group, radial_profile, rank_by_score
from compose.methods.cmlora import (
    CmloraOptions,
    combination_weights,
    plan_steps,
    predicted_shallow_usage,
    predicted_unet_usage,
    refresh_steps,
    step_intervals,
)
from compose.profiling import LoraProfile, ProfileSettings, profile_lora_files
from tests.conftest import run

ORDER = ["car", "cat", "dog"]
PROMPT3 = "a sks cat and a zwx dog and a vrn car"


def three(loras):
    return [loras["cat"], loras["dog"], loras["car"]]


def test_every_interval_one_with_equal_weights_is_composite(pipe, loras):
    composite = run(pipe, PROMPT3, loras=three(loras), method="composite", steps=2)
    options = dict(order=ORDER, intervals=1, weighting="equal")
    cmlora = run(pipe, PROMPT3, loras=three(loras), method="cmlora", method_options=options, steps=2)
    assert np.array_equal(cmlora.images, composite.images)
    assert (cmlora.unet_calls, cmlora.unet_passes) == (composite.unet_calls, composite.unet_passes) == (2, 6)


def test_one_lora_is_that_lora_alone(pipe, loras, tmp_path):
    alone = run(pipe, loras=[loras["cat"]], method="merge")
    cmlora = run(pipe, loras=[loras["cat"]], method="cmlora", method_options=dict(profile_cache_dir=str(tmp_path)))
    assert np.array_equal(cmlora.images, alone.images)
    assert not list(tmp_path.iterdir())  # nothing to order, so nothing profiled


@pytest.mark.parametrize(
    ("names", "intervals", "steps"),
    [(["cat", "dog"], (2, 3, 2), 5), (["cat", "dog", "car"], (2, 3, 2), 6), (["cat", "dog", "car"], (3, 3, 3), 4)],
)
def test_unet_calls_and_passes_equal_the_schedule(pipe, loras, names, intervals, steps):
    options = dict(order=names[::-1], intervals=intervals, high_count=1)
    out = run(pipe, PROMPT3, loras=[loras[n] for n in names], method="cmlora", method_options=options, steps=steps)
    plans = plan_steps(steps, list(range(len(names)))[::-1], 1, 0.6, intervals, (0.375, 0.875))
    assert (out.unet_calls, out.unet_passes) == predicted_unet_usage(plans)
    assert out.unet_passes < len(names) * steps  # cheaper than composite
    assert out.extras["order"] == names[::-1]
    assert [s["fresh"] for s in out.extras["schedule"]] == [[names[k] for k in p.fresh] for p in plans]
    assert [s["dominant"] for s in out.extras["schedule"]] == [names[p.dominant] for p in plans]


def test_schedule_follows_the_paper_at_200_steps():
    refresh = refresh_steps(200, (2, 3, 2), (0.375, 0.875))
    assert [s for s in range(82) if refresh[s]][-5:] == [72, 74, 75, 78, 81]  # every 2 before step 75, 3 after
    assert [s for s in range(170, 180) if refresh[s]] == [171, 174, 175, 177, 179]  # every 2 from step 175
    interval = step_intervals(200, (2, 3, 2), (0.375, 0.875))
    plans = plan_steps(200, [0, 1, 2], 2, 0.6, (2, 3, 2), (0.375, 0.875))
    assert plans[0].fresh == (0, 1, 2)
    assert {p.dominant for p in plans[:120]} == {0, 1} and {p.dominant for p in plans[120:]} == {2}
    last_fresh = {}
    for step, plan in enumerate(plans):
        assert plan.dominant in plan.fresh
        if step and step != 120 and plan.dominant != plans[step - 1].dominant:
            assert refresh[step]  # the dominant LoRA moves on only on refresh steps
        if not refresh[step]:
            assert plan.fresh == (plan.dominant,)
        for k in {0, 1, 2} - {plan.dominant}:
            age = step - last_fresh.get(k, -999) if step else 999
            assert (k in plan.fresh) == (refresh[step] and age >= interval[step])
            assert k in plan.fresh or age <= 3  # a cached prediction is never older than the longest interval
        last_fresh.update((k, step) for k in plan.fresh)
    calls, passes = predicted_unet_usage(plans)
    assert calls == 200 and passes == sum(len(p.fresh) for p in plans) < 0.53 * 3 * 200


def test_shallow_pass_on_the_same_steps_deep_feature_is_the_full_pass(pipe):
    sample, embeds = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 32)
    with torch.no_grad():
        with deep_features(pipe.unet) as captured:
            full = pipe.unet(sample, torch.tensor(500), embeds).sample
        shallow = shallow_forward(pipe.unet, sample, torch.tensor(500), embeds, captured[0])
    assert torch.equal(shallow, full)


def test_deep_cache_counts_full_and_shallow_passes(pipe, loras):
    options = dict(order=ORDER, cache="deep", high_count=2)
    out = run(pipe, PROMPT3, loras=three(loras), method="cmlora", method_options=options, steps=4)
    plans = plan_steps(4, [2, 0, 1], 2, 0.6, (2, 3, 2), (0.375, 0.875))
    assert (out.unet_calls, out.unet_passes) == predicted_unet_usage(plans)
    shallow = predicted_shallow_usage(plans, 3)
    assert (out.extras["shallow_unet_calls"], out.extras["shallow_unet_passes"]) == shallow and shallow[1] > 0
    output_cache = {**options, "cache": "output"}
    output = run(pipe, PROMPT3, loras=three(loras), method="cmlora", method_options=output_cache, steps=4)
    assert not np.array_equal(out.images, output.images)  # cached LoRAs really ran their outer blocks again
    every_step = dict(order=ORDER, intervals=1, weighting="equal")
    deep_cache = {**every_step, "cache": "deep"}
    deep = run(pipe, PROMPT3, loras=three(loras), method="cmlora", method_options=deep_cache, steps=2)
    composite = run(pipe, PROMPT3, loras=three(loras), method="composite", steps=2)
    assert np.array_equal(deep.images, composite.images) and deep.extras["shallow_unet_passes"] == 0


def test_high_group_is_every_lora_with_a_positive_score():
    assert high_group({"style": -0.1, "cat": 0.3, "background": 0.0, "hat": 0.05}) == ["cat", "hat"]
    assert high_group({"style": -0.2}) == []


@pytest.mark.parametrize(
    "scores, dominants",
    [
        # all positive: one group; the phase switch at int(0.6 * 5) = 3 restarts the rotation, and the
        # refresh steps of 5 steps are 0, 1 (segment [1, 4), every 3) and 4
        ({"cat": 0.2, "dog": 0.1, "car": 0.05}, ["cat", "dog", "dog", "cat", "dog"]),
        ({"cat": 0.2, "dog": -0.1, "car": 0.05}, ["cat", "car", "car", "dog", "dog"]),  # dog alone is low
    ],
)
def test_profiled_grouping_follows_the_scores(pipe, loras, monkeypatch, scores, dominants):
    profiles = [LoraProfile(name, "0" * 64, score, [], [], True) for name, score in scores.items()]
    monkeypatch.setattr(cmlora_module, "profile_loras", lambda *a: profiles)
    out = run(pipe, PROMPT3, loras=three(loras), method="cmlora", steps=5)
    assert out.extras["order"] == rank_by_score(scores)
    assert [s["dominant"] for s in out.extras["schedule"]] == dominants


def test_reference_mode_runs_every_lora_every_step_with_the_dominant_rotating_at_refresh_steps(pipe, loras):
    # 6 steps: refresh steps 0, 2 (segment [2, 5), every 3) and 5; the phase switch at step 3
    plans = plan_steps(6, [0, 1], 2, 0.6, (2, 3, 2), (0.375, 0.875), cached=False)
    assert [p.dominant for p in plans] == [0, 0, 1, 0, 0, 1]
    assert all(p.fresh == (0, 1) for p in plans)
    names = ["cat", "dog"]
    options = dict(order=names, cache="reference")
    out = run(pipe, loras=[loras[n] for n in names], method="cmlora", method_options=options, steps=6)
    assert [s["dominant"] for s in out.extras["schedule"]] == ["cat", "cat", "dog", "cat", "cat", "dog"]
    assert (out.unet_calls, out.unet_passes) == (6, 12)
    equal = run(pipe, loras=[loras[n] for n in names], method="cmlora", method_options={**options, "weighting": "equal"},
                steps=2)  # fmt: skip
    composite = run(pipe, loras=[loras[n] for n in names], method="composite", steps=2)
    assert np.array_equal(equal.images, composite.images)


def test_combination_weights_follow_the_paper():
    assert combination_weights(2, 0, "dominant") == pytest.approx([0.6, 0.4])
    assert combination_weights(3, 1, "dominant") == pytest.approx([2 / 9, 5 / 9, 2 / 9])
    for count in (1, 4, 5):
        weights = combination_weights(count, count - 1, "dominant")
        assert math.isclose(sum(weights), 1.0) and weights[-1] == max(weights)
    assert combination_weights(3, 0, "equal") is None


def _forward_counter(pipe):
    calls = []
    pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_profile_is_deterministic_and_read_back_from_the_cache(pipe, loras, tmp_path):
    settings = ProfileSettings(steps=1)
    calls = _forward_counter(pipe)
    first = profile_lora_files(pipe, [loras["cat"], loras["dog"]], settings, tmp_path / "a")
    assert len(calls) == 4  # two LoRAs and the base on each one's prompt ("a sks cat", "a zwx dog"), 1 step each
    again = profile_lora_files(pipe, [loras["cat"], loras["dog"]], settings, tmp_path / "a")
    assert len(calls) == 4 and all(p.cached for p in again) and not any(p.cached for p in first)
    elsewhere = profile_lora_files(pipe, [loras["cat"], loras["dog"]], settings, tmp_path / "b")
    for a, b, c in zip(first, again, elsewhere):
        assert a.profile == b.profile == c.profile and a.score == b.score == c.score
        assert any(path.name.startswith(a.sha256[:16]) for path in (tmp_path / "a").iterdir())


def test_automatic_order_ranks_by_the_cached_profile(pipe, loras, tmp_path):
    options = dict(profile_cache_dir=str(tmp_path), profile_steps=1)
    out = run(pipe, PROMPT3, loras=three(loras), method="cmlora", method_options=options, steps=2)
    profiles = profile_lora_files(pipe, three(loras), ProfileSettings(steps=1), tmp_path)
    assert all(p.cached for p in profiles)
    scores = {p.adapter: p.score for p in profiles}
    assert out.extras["frequency_scores"] == scores
    assert out.extras["order"] == rank_by_score(scores)
    assert out.unet_calls == 2  # profiling is not charged to the image


def _smooth(size: int, seed: int) -> torch.Tensor:
    coarse = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0, 0]


def test_high_frequency_change_outranks_low_frequency_change():
    size = 64
    base = _smooth(size, 0) + 0.05 * torch.randn(size, size, generator=torch.Generator().manual_seed(1))
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    fine = 0.3 * torch.cos(2 * math.pi * 20 * xs / size) + 0.3 * torch.cos(2 * math.pi * 24 * ys / size)  # radii 20, 24
    coarse = 0.8 * torch.cos(2 * math.pi * xs / size)  # one period across the image: radius 1
    reference = radial_profile(base)
    scores = {
        "style": high_frequency_score(radial_profile(base + coarse), reference),
        "character": high_frequency_score(radial_profile(base + fine), reference),
    }
    assert scores["character"] > 1e-3
    assert abs(scores["style"]) < 1e-6  # nothing changed in the high band (float32 rounding only)
    assert rank_by_score(scores) == ["character", "style"]


def test_radial_profile_of_rgb_and_size():
    image = torch.rand(3, 20, 30)
    profile = radial_profile(image)
    assert profile.shape == (11,) and torch.isfinite(profile).all()


@pytest.mark.parametrize("cutoff", [0.0, 1.5, 80, -0.1])
def test_cutoff_outside_the_unit_interval_is_an_error(cutoff):
    with pytest.raises(InvalidOptionError, match="fraction"):
        high_band(33, cutoff)


def test_empty_high_band_is_an_error():
    with pytest.raises(InvalidOptionError, match="no high-frequency band"):
        high_frequency_score(radial_profile(torch.rand(1, 1)), radial_profile(torch.rand(1, 1)))
    assert high_band(33, 1.0).tolist() == [32]


@pytest.mark.parametrize(
    "options",
    [
        dict(intervals=0),
        dict(intervals=(2, 3)),
        dict(split=1.5),
        dict(weighting="loud"),
        dict(cache="feature"),
        dict(cache="none"),
        dict(order="cat"),
        dict(order=["cat", "cat"]),
        dict(profile_cutoff=80),
        dict(boundaries=(0.9, 0.1)),
    ],
)
def test_bad_options_are_refused(options):
    with pytest.raises(InvalidOptionError):
        CmloraOptions(**options)


def test_order_naming_other_loras_fails_before_denoising(pipe, loras):
    calls = _forward_counter(pipe)
    with pytest.raises(InvalidOptionError, match="exactly once"):
        run(pipe, PROMPT3, loras=three(loras), method="cmlora", method_options=dict(order=["cat", "dog"]))
    with pytest.raises(InvalidOptionError, match="high_count"):
        run(pipe, PROMPT3, loras=three(loras), method="cmlora", method_options=dict(order=ORDER, high_count=4))
    assert not calls


def _profile_command(argv):
    import argparse

    from pipelines import profile

    parser = argparse.ArgumentParser()
    profile.register(parser.add_subparsers())
    args = parser.parse_args(["profile", *argv])
    return args.run(args)


def test_profile_command_prints_the_ranking_and_plots(loras, tmp_path, capsys):
    plot = tmp_path / "spectra.png"
    argv = ["--model", "tiny", "--lora", str(loras["cat"]), "--lora", f"{loras['car']}:0.5", "--steps", "1"]
    assert _profile_command([*argv, "--cache-dir", str(tmp_path), "--out", str(plot)]) == 0
    lines = capsys.readouterr().out.splitlines()
    ranked = [line.split()[2] for line in lines[1:3]]
    assert sorted(ranked) == ["car", "cat"] and plot.stat().st_size > 0
    scores = [float(line.split()[1]) for line in lines[1:3]]
    assert scores == sorted(scores, reverse=True)
    _profile_command([*argv, "--cache-dir", str(tmp_path)])
    assert capsys.readouterr().out.count("(cached)") == 2


def test_profile_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    from compose.profiling import PROFILE_CACHE_ENV, default_cache_dir

    monkeypatch.setenv(PROFILE_CACHE_ENV, str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv(PROFILE_CACHE_ENV)
    assert default_cache_dir().parts[-3:] == (".cache", "loracompose", "profiles")
