"""The `tokenfactory` command line.

Each subcommand lives in its own module of `jobs/` and exposes ``register(subparsers)``, which adds its
parser (every flag documented in ``--help``) and sets ``func``. Heavy imports (torch, Ray) happen inside
the command functions, so ``tokenfactory --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Subcommand modules, in the order `--help` lists them.
COMMANDS = ["jobs.demo_cmd", "jobs.onboard_cmd", "jobs.index_cmd", "jobs.world_cmd", "jobs.pretrain_cmd", "jobs.backbones_cmd"]


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
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())


def effective_config(args: argparse.Namespace) -> dict:
    """The flags of a run as plain JSON-able values: printed at start and stored with its outputs."""
    return {k: v for k, v in vars(args).items() if k != "func"}


def absolute_uri(uri: str | None) -> str | None:
    """Local paths made absolute (Ray workers run elsewhere); URIs with a scheme are left alone."""
    import os

    if uri is None or "://" in uri:
        return uri
    return os.path.abspath(uri)
