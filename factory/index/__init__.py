"""Vector indexes for gallery retrieval: one interface (`base`), an exact backend (`exact`), FAISS ANN
backends (`faiss_backend`, imported only when used) and a gallery split over shards (`sharded`). See
`factory.index.base` for the saved layout (`factory.index.sharded` for the sharded one)."""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from factory import storage
from factory.index.base import (
    FAISS_NAME,
    FORMAT_VERSION,
    ITEMS_NAME,
    MANIFEST_NAME,
    VECTORS_NAME,
    CorruptIndex,
    DuplicateItemId,
    EmptyIndex,
    Hit,
    IncompleteIndex,
    IndexDimensionMismatch,
    IndexNotFound,
    InvalidIndexParams,
    InvalidItems,
    SearchResult,
    VectorIndex,
)
from factory.index.exact import ExactIndex
from factory.storage import NotFoundInStorage, S3Options

FAISS_KINDS = ("hnsw", "ivf", "ivfpq")  # the backends factory.index.faiss_backend implements
BACKENDS = ("exact", *FAISS_KINDS)


def create_index(backend: str, dim: int, **params: Any) -> VectorIndex:
    """``backend`` is one of `BACKENDS` ("exact", "hnsw", "ivf", "ivfpq"); ``params`` are that backend's
    keyword arguments."""
    if backend == "exact":
        return ExactIndex(dim, **params)
    if backend in FAISS_KINDS:
        from factory.index.faiss_backend import FaissIndex

        return FaissIndex(dim, kind=backend, **params)
    raise InvalidIndexParams(f"unknown index backend {backend!r}; use one of {', '.join(map(repr, BACKENDS))}")


def load_index(uri: str, s3: S3Options | None = None) -> VectorIndex:
    """A saved index at ``uri``, a sharded one (`factory.index.sharded.ShardedIndex`: same search and item
    interface), or the newest committed version when ``uri`` is the root of index versions
    (`factory.index.versions`, written by ``tokenfactory index --append``)."""
    if not storage.exists(storage.join(uri, MANIFEST_NAME), s3):
        from factory.index.sharded import SHARDS_MANIFEST, load_sharded_index

        if storage.exists(storage.join(uri, SHARDS_MANIFEST), s3):
            return load_sharded_index(uri, s3)  # type: ignore[return-value]  # duck-typed VectorIndex
        from factory.index.versions import IndexVersions

        versions = IndexVersions(uri, s3)
        if versions.latest() is not None:
            return versions.open()[1]
    return load_saved_index(uri, s3)  # or its error: absent, incomplete, corrupt


def load_saved_index(uri: str, s3: S3Options | None = None) -> VectorIndex:
    """The index saved at ``uri`` by `VectorIndex.save`, every file checked against its manifest's checksum."""
    manifest_uri = storage.join(uri, MANIFEST_NAME)
    try:
        manifest = storage.read_json(manifest_uri, s3)
    except NotFoundInStorage:
        if storage.listdir(uri, s3):
            raise IncompleteIndex(
                f"{uri} holds index files but no {MANIFEST_NAME}: its save did not finish; save the index again"
            ) from None
        raise IndexNotFound(f"no index at {uri} (no {MANIFEST_NAME}); build one with `tokenfactory index`") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise CorruptIndex(f"{manifest_uri}: index format version {version!r}, this code reads {FORMAT_VERSION}")
    try:
        backend, dim, count = str(manifest["backend"]), int(manifest["dim"]), int(manifest["count"])
        params, checksums = dict(manifest["params"]), dict(manifest["files"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptIndex(f"{manifest_uri}: missing or malformed field ({e!r})") from e
    if backend != "exact" and backend not in FAISS_KINDS:
        raise CorruptIndex(f"{manifest_uri}: unknown backend {backend!r}")
    if backend == "exact":
        cls: type[VectorIndex] = ExactIndex
    else:
        from factory.index.faiss_backend import FaissIndex

        cls = FaissIndex
    needed = {ITEMS_NAME, VECTORS_NAME if cls is ExactIndex else FAISS_NAME} - set(checksums)
    if needed:
        raise CorruptIndex(f"{manifest_uri} does not list {sorted(needed)}")
    files: dict[str, bytes] = {}
    for name, digest in checksums.items():
        file_uri = storage.join(uri, name)
        try:
            data = storage.read_bytes(file_uri, s3)
        except NotFoundInStorage:
            raise CorruptIndex(f"{file_uri} is listed in {MANIFEST_NAME} but missing: save the index again") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise CorruptIndex(f"{file_uri} does not match the checksum in {MANIFEST_NAME}: save the index again")
        files[name] = data
    index = cls._restore(backend, dim, params, files)
    index._restore_items(pq.read_table(pa.BufferReader(files[ITEMS_NAME])))
    counts = {len(index), index._stored_count(), count}
    if len(counts) != 1:
        raise CorruptIndex(f"{uri}: item, vector and manifest counts disagree ({sorted(counts)})")
    return index


__all__ = [
    "BACKENDS",
    "FAISS_KINDS",
    "FAISS_NAME",
    "FORMAT_VERSION",
    "ITEMS_NAME",
    "MANIFEST_NAME",
    "VECTORS_NAME",
    "CorruptIndex",
    "DuplicateItemId",
    "EmptyIndex",
    "ExactIndex",
    "Hit",
    "IncompleteIndex",
    "IndexDimensionMismatch",
    "IndexNotFound",
    "InvalidIndexParams",
    "InvalidItems",
    "SearchResult",
    "VectorIndex",
    "create_index",
    "load_index",
    "load_saved_index",
]
