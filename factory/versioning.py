"""Immutable numbered versions under a root URI: the layout and the atomic claim that the token registry
and the gallery index versions share.

    <root>/versions/v000001/   one version: its files, then its manifest (written last = committed)
    <root>/versions/v000002/claim.json   a number taken by a commit that has not finished (or died)

A version number is taken with a conditional create of its ``claim.json`` (`storage.create_exclusive`):
concurrent writers each try max(existing) + 1 and move up on a loss, so no two are told the same number,
and a claimed folder is never cleared or reused, even when its commit died (readers skip it: no manifest).
"""

from __future__ import annotations

import json
import re

from factory import storage
from factory.storage import NotFoundInStorage, S3Options

VERSIONS_DIR = "versions"
CLAIM_NAME = "claim.json"
_VERSION_DIR_RE = re.compile(r"v(\d{6,})")


def version_uri(root: str, version: int) -> str:
    return storage.join(root, VERSIONS_DIR, f"v{version:06d}")


def version_numbers(root: str, s3: S3Options | None = None) -> list[int]:
    """Every numbered folder under ``root`` (committed or not), ascending."""
    names = storage.listdir(storage.join(root, VERSIONS_DIR), s3)
    return sorted(int(m.group(1)) for n in names if (m := _VERSION_DIR_RE.fullmatch(n)))


def claim_next_version(root: str, owner: dict, s3: S3Options | None = None) -> int:
    """The next free version number under ``root``, claimed atomically. ``owner`` must hold a ``nonce``
    unique to this commit: a retried request may report a loss for a claim that landed, and the nonce read
    back tells a claim of ours from another writer's."""
    body = json.dumps(owner).encode()
    version = max(version_numbers(root, s3), default=0) + 1
    while True:
        uri = storage.join(version_uri(root, version), CLAIM_NAME)
        if storage.create_exclusive(uri, body, s3):
            return version
        try:  # a retried request may have created it for us
            if json.loads(storage.read_bytes(uri, s3)).get("nonce") == owner["nonce"]:
                return version
        except (NotFoundInStorage, ValueError):
            pass
        version += 1


__all__ = ["CLAIM_NAME", "VERSIONS_DIR", "claim_next_version", "version_numbers", "version_uri"]
