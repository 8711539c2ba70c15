"""`loracompose` command line: one entry point, each subcommand defined next to the code it runs.

Only the chosen subcommand's module is imported, so `generate` does not pay for the web UI's imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from compose.errors import ComposeError

# name -> (module defining `register(subparsers)` whose parser sets `run(args)`, one-line help)
COMMANDS = {
    "generate": ("pipelines.generate", "generate one image with several LoRAs"),
    "ui": ("ui.cli", "serve the web UI"),
    "eval": ("eval.harness", "generate and CLIPScore a grid of prompts x LoRA sets x methods x seeds"),
    "report": ("eval.report", "summarise an eval results folder as tables, plots and an HTML page"),
    "bench": ("eval.bench", "time every method against single-LoRA generation"),
    "profile": ("pipelines.profile", "rank LoRAs by the high-frequency content they add (cmlora's order)"),
    "train-tara": ("compose.training.cli", "train a token-aware (TARA) LoRA on a folder of images"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loracompose", description="Compose several LoRAs in one image.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if name == command:
            importlib.import_module(module).register(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        return args.run(args) or 0
    except ComposeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
