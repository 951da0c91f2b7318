"""Where a catalog's tables are: the one resolver of a catalog URI and of the relative URIs in its manifest."""

from __future__ import annotations

from factory import storage

MANIFEST_NAME = "manifest.json"


def manifest_uri(uri: str) -> str:
    """A catalog folder's ``manifest.json``, or ``uri`` itself when it names a manifest."""
    return uri if uri.endswith(".json") else storage.join(uri, MANIFEST_NAME)


def base_of(uri: str) -> str:
    """The folder of a file URI: what the relative URIs written in that file are relative to."""
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


def resolve(base: str, uri: str) -> str:
    """``uri`` as written in a manifest or table, made absolute against ``base``."""
    return uri if "://" in uri or uri.startswith("/") else storage.join(base, uri)


__all__ = ["MANIFEST_NAME", "base_of", "manifest_uri", "resolve"]
