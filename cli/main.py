"""The `tokenfactory` command line: the top layer (schemas <- factory <- jobs, serve <- cli).

Each subcommand lives in its own module (the batch jobs in `jobs/`, the commands that start the
service in `cli/`) and exposes ``register(subparsers)``, which adds its parser (every flag documented in
``--help``) and sets ``func``. Heavy imports (torch, Ray) happen inside the command functions, so
``tokenfactory --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Subcommand modules, in the order `--help` lists them.
COMMANDS = [
    "cli.demo_cmd",
    "cli.onboard_cmd",
    "cli.index_cmd",
    "cli.evaluate_cmd",
    "cli.serve_cmd",
    "cli.export_cmd",
    "cli.world_cmd",
    "cli.pretrain_cmd",
    "cli.backbones_cmd",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenfactory",
        description="Learn, store and serve custom tokens of CLIP-family models at catalog scale.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING). Default: INFO")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from factory.errors import TokenFactoryError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except TokenFactoryError as e:
        # Errors raised on purpose say what to do: one line, no traceback, exit status 2 (a usage error).
        print(f"tokenfactory {args.command}: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
