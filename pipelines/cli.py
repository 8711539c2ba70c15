"""`loracompose` command line: one entry point, each subcommand defined next to the code it runs."""

from __future__ import annotations

import argparse
import importlib
import sys

from compose.errors import ComposeError

# Modules that define a subcommand with `register(subparsers)`; the parser's `run(args)` does the work.
COMMANDS = (
    "pipelines.generate",
    "ui.cli",
    "eval.bench",
    "eval.harness",
    "eval.report",
    "pipelines.profile",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loracompose", description="Compose several LoRAs in one image.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        importlib.import_module(module).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except ComposeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
