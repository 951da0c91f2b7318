"""Flags and values every command shares: S3 options, absolute URIs, the printed run config, and the
defaults flags read off their config's fields."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from factory.storage import absolute_uri


def effective_config(args: argparse.Namespace) -> dict:
    """The flags of a run as plain JSON-able values: printed at start and stored with its outputs."""
    return {k: v for k, v in vars(args).items() if k != "func"}


def field_defaults(cls) -> dict[str, Any]:
    """name -> default of a config class's fields (a dataclass or a pydantic model), read off the class.

    A flag takes its default from here rather than retyping it, so the command line and the config built in
    Python cannot drift apart (one source per default; ``%(default)s`` in a flag's help shows it). Fields
    without a plain default (required, or built by a factory) are left out.
    """
    if dataclasses.is_dataclass(cls):
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    return {
        name: f.default for name, f in cls.model_fields.items() if not f.is_required() and f.default_factory is None
    }


def add_s3_arguments(p: argparse.ArgumentParser) -> None:
    """--s3-endpoint / --s3-region, shared by every command that reads or writes ``s3://`` URIs.

    Keys are read from the environment only (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the instance
    profile): secrets on a command line show up in ``ps``.
    """
    p.add_argument(
        "--s3-endpoint",
        metavar="URL",
        default=None,
        help="S3 endpoint, e.g. http://127.0.0.1:8333. Default: $TOKENFACTORY_S3_ENDPOINT, "
        "$AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL, else AWS",
    )
    p.add_argument(
        "--s3-region",
        metavar="REGION",
        default=None,
        help="S3 region. Default: $AWS_REGION or $AWS_DEFAULT_REGION, else us-east-1",
    )


def s3_options(args: argparse.Namespace):
    """S3 options from the environment, overridden by --s3-endpoint / --s3-region."""
    import dataclasses

    from factory.storage import S3Options

    opts = S3Options.from_env()
    changes = {k: v for k, v in (("endpoint", args.s3_endpoint), ("region", args.s3_region)) if v}
    return dataclasses.replace(opts, **changes) if changes else opts


__all__ = ["absolute_uri", "add_s3_arguments", "effective_config", "field_defaults", "s3_options"]
