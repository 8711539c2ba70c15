"""`loracompose train-tara`: train one TARA concept LoRA from a folder of images."""

from __future__ import annotations

from pathlib import Path

DEFAULTS = {"steps": 1000, "lr": 1e-4, "rank": 8, "alpha": 32.0, "lambda_align": 1.0, "batch_size": 1, "seed": 0, "layers": "attention"}


def register(subparsers) -> None:
    from .tara import LAYER_SETS

    parser = subparsers.add_parser(
        "train-tara",
        help="train a TARA concept LoRA (token-masked k/v, key alignment)",
        description="DreamBooth-style LoRA training with TARA's token mask and key-alignment loss. "
        "The file records the rare token and class word, so `--method tara` needs no extra flags.",
    )
    parser.add_argument("--model", help="diffusers folder, hub id, 'tiny' or 'tiny-sdxl' (default: the built-in model)")
    parser.add_argument("--images", required=True, type=Path, help="folder of .png/.jpg training images")
    parser.add_argument("--rare-token", required=True, help="the new word that will call the concept, e.g. sks")
    parser.add_argument("--class-word", required=True, help="the plain word for the concept's class, e.g. dog")
    parser.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    parser.add_argument("--prompt", help="caption of every image (default: 'a photo of <rare-token> <class-word>')")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--rank", type=int, default=DEFAULTS["rank"])
    parser.add_argument("--alpha", type=float, default=DEFAULTS["alpha"])
    parser.add_argument("--lambda-align", type=float, default=DEFAULTS["lambda_align"], help="weight of L_align")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: the model's native size)")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between resumable checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --out")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    parser.add_argument(
        "--layers", choices=list(LAYER_SETS), default=DEFAULTS["layers"],
        help="layers to train: attention projections, every transformer linear layer, or those and the ResNet convs (LoCon)",
    )
    parser.add_argument(
        "--plain", action="store_true", help="train a plain LoRA (no token mask, no L_align) for the other methods"
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    from pipelines.loading import load_pipeline

    from .tara import TaraTrainingOptions, checkpoint_dir, train_tara

    options = TaraTrainingOptions(
        rare_token=args.rare_token,
        class_word=args.class_word,
        steps=args.steps,
        lr=args.lr,
        rank=args.rank,
        alpha=args.alpha,
        lambda_align=args.lambda_align,
        batch_size=args.batch_size,
        resolution=args.resolution,
        seed=args.seed,
        prompt=args.prompt,
        checkpoint_every=args.checkpoint_every,
        token_mask=not args.plain,
        layers=args.layers,
    )
    pipe = load_pipeline(args.model)
    result = train_tara(pipe, args.images, args.out, options, resume=args.resume)
    print(
        f"saved {result.path} after {result.steps} steps ({result.steps_per_second:.2f} steps/s); "
        f"checkpoint in {checkpoint_dir(args.out)}"
    )
    return 0
