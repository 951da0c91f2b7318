"""A gallery that grows: immutable, checksummed versions of an index under one root.

    <root>/versions/v000001/   a saved index (`VectorIndex.save`: data files, then index.json)
    <root>/versions/v000002/   the next one: the previous items plus the new ones

The layout and the atomic claim of a version number are the registry's (`factory.versioning`), so
concurrent builds never share a number and a version, once its ``index.json`` is written, never changes.
`tokenfactory index --append` encodes only the items the newest version lacks and commits the union;
the service follows the newest version (or stays on a pinned one) the way it follows token versions.
"""

from __future__ import annotations

import uuid

from factory import storage
from factory.index import load_saved_index
from factory.index.base import MANIFEST_NAME, IndexNotFound, VectorIndex
from factory.storage import S3Options
from factory.versioning import claim_next_version, version_numbers, version_uri


class IndexVersions:
    def __init__(self, root: str, s3: S3Options | None = None) -> None:
        self.root = root.rstrip("/") or root
        self.s3 = s3

    def __repr__(self) -> str:
        return f"IndexVersions({self.root!r})"

    def version_uri(self, version: int) -> str:
        return version_uri(self.root, version)

    def _committed(self, version: int) -> bool:
        return storage.exists(storage.join(self.version_uri(version), MANIFEST_NAME), self.s3)

    def versions(self) -> list[int]:
        """Committed versions (their index.json written), ascending."""
        return [v for v in version_numbers(self.root, self.s3) if self._committed(v)]

    def latest(self) -> int | None:
        # Newest first, stopping at the first committed one: a claimed folder whose build died is skipped.
        return next((v for v in reversed(version_numbers(self.root, self.s3)) if self._committed(v)), None)

    def open(self, version: int | None = None) -> tuple[int, VectorIndex]:
        """(version, index) of ``version`` or the newest; every file is checked against its checksum."""
        v = self.latest() if version is None else version
        if v is None:
            raise IndexNotFound(
                f"no committed index version under {self.root}: build one with "
                f"`tokenfactory index --append --out {self.root}`"
            )
        return v, load_saved_index(self.version_uri(v), self.s3)

    def commit(self, index: VectorIndex) -> int:
        """Save ``index`` as the next version; returns its number."""
        version = claim_next_version(self.root, {"nonce": uuid.uuid4().hex, "items": len(index)}, self.s3)
        index.save(self.version_uri(version), self.s3)
        return version


__all__ = ["IndexVersions"]
