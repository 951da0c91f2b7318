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
COMMANDS = ["jobs.demo_cmd", "jobs.onboard_cmd", "jobs.index_cmd", "jobs.evaluate_cmd", "jobs.serve_cmd",
            "jobs.export_cmd", "jobs.world_cmd", "jobs.pretrain_cmd", "jobs.backbones_cmd"]


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
    from factory.registry import RegistryError
    from factory.storage import StorageError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except (TokenFactoryError, RegistryError, StorageError) as e:
        # Errors raised on purpose say what to do: one line, no traceback, exit status 2 (a usage error).
        print(f"tokenfactory {args.command}: error: {e}", file=sys.stderr, flush=True)
        return 2


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


def add_s3_arguments(p: argparse.ArgumentParser) -> None:
    """--s3-endpoint / --s3-region, shared by every command that reads or writes ``s3://`` URIs.

    Keys are read from the environment only (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the instance
    profile): secrets on a command line show up in ``ps``.
    """
    p.add_argument("--s3-endpoint", metavar="URL", default=None,
                   help="S3 endpoint, e.g. http://127.0.0.1:8333. Default: $TOKENFACTORY_S3_ENDPOINT, "
                        "$AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL, else AWS")
    p.add_argument("--s3-region", metavar="REGION", default=None,
                   help="S3 region. Default: $AWS_REGION or $AWS_DEFAULT_REGION, else us-east-1")


def s3_options(args: argparse.Namespace):
    """S3 options from the environment, overridden by --s3-endpoint / --s3-region."""
    import dataclasses

    from factory.storage import S3Options

    opts = S3Options.from_env()
    changes = {k: v for k, v in (("endpoint", args.s3_endpoint), ("region", args.s3_region)) if v}
    return dataclasses.replace(opts, **changes) if changes else opts
