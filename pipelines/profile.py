"""`loracompose profile`: rank LoRAs by the high-frequency content they add, and plot their spectra."""

from __future__ import annotations

from pathlib import Path

from compose.profiling import LoraProfile, ProfileSettings, profile_lora_files
from compose.spec import LoraSpec

from .loading import load_pipeline


def plot_profiles(profiles: list[LoraProfile], cutoff: float, path: str | Path) -> None:
    """Each LoRA's log-magnitude rise over the base model per radius, with the high band shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    for profile in profiles:
        radii = len(profile.profile) - 1
        rise = [a - b for a, b in zip(profile.profile, profile.base_profile)]
        axes.plot([r / radii for r in range(radii + 1)], rise, label=f"{profile.adapter} ({profile.score:+.3f})")
    axes.axvspan(cutoff, 1.0, color="grey", alpha=0.15, label="high band")
    axes.axhline(0.0, color="black", linewidth=0.5)
    axes.set_xlabel("radius / max radius")
    axes.set_ylabel("log-magnitude, LoRA minus base")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def run(args) -> int:
    settings = ProfileSettings(steps=args.steps, seed=args.seed, cutoff=args.cutoff, prompt=args.prompt)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    profiles = profile_lora_files(pipe, [LoraSpec.parse(text) for text in args.lora], settings, args.cache_dir)
    ranked = sorted(profiles, key=lambda p: -p.score)
    print("rank  score    LoRA (high-frequency first)")
    for rank, profile in enumerate(ranked, 1):
        print(f"{rank:>4}  {profile.score:+.4f}  {profile.adapter}{'  (cached)' if profile.cached else ''}")
    if args.out:
        plot_profiles(ranked, settings.cutoff, args.out)
        print(f"spectra saved to {args.out}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("profile", help="rank LoRAs by the high-frequency content they add (cmlora's order)")
    parser.add_argument("--model", required=True, help="diffusers folder, hub id, 'tiny' or 'tiny-sdxl'")
    parser.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]", help="repeat per LoRA")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps of the profiling pre-pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cutoff", type=float, default=0.2, help="high band: radii >= this fraction of the maximum")
    parser.add_argument("--prompt", help="profiling prompt (default: 'a picture of <trigger>')")
    parser.add_argument(
        "--cache-dir", help="profile cache (default: $LORACOMPOSE_PROFILE_CACHE or ~/.cache/loracompose/profiles)"
    )
    parser.add_argument("--out", help="save a plot of the spectra (PNG)")
    parser.set_defaults(run=run)
