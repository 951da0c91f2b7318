"""The vector-index interface (`VectorIndex`), its errors and saved layout; backends in `exact` and
`faiss_backend`.

Similarity is cosine: every vector is L2-normalised on ``add`` and every query on ``search``, so the
inner product the backends compute *is* the cosine. Items are kept in insertion order; a hit's
``indices`` entry is that position, and ``ids``/``uris``/metadata of the item are looked up by it.

Saved layout under a folder URI (any URI ``factory.storage`` takes, S3 included)::

    <folder>/items.parquet   id, uri, metadata (a JSON string), one row per item, in insertion order
    <folder>/vectors.npy     exact backend: the normalised float32 matrix
    <folder>/faiss.index     FAISS backends: ``faiss.serialize_index`` bytes
    <folder>/index.json      written LAST: backend, dim, params, count, format version, file checksums

An index exists if and only if ``index.json`` does, so a save killed half way is not loadable, and the
checksums catch a folder whose data files were replaced behind the manifest's back.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import json
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from factory import storage
from factory.errors import TokenFactoryError
from factory.storage import S3Options

FORMAT_VERSION = 1
MANIFEST_NAME = "index.json"
ITEMS_NAME = "items.parquet"
VECTORS_NAME = "vectors.npy"
FAISS_NAME = "faiss.index"


class IndexDimensionMismatch(TokenFactoryError, ValueError):
    """Vectors or queries whose dimension is not the index's (e.g. features of another backbone)."""

    code = "index_dimension_mismatch"


class DuplicateItemId(TokenFactoryError, ValueError):
    """An item id that is already in the index, or repeated within one ``add``."""

    http_status, code = 409, "duplicate_item"


class EmptyIndex(TokenFactoryError, ValueError):
    """A search on an index with no items: index the gallery first."""

    code = "empty_index"


class InvalidItems(TokenFactoryError, ValueError):
    """Items that cannot be indexed: non-finite or zero vectors, empty or non-string ids, non-string
    URIs, metadata that is not JSON, or counts of vectors/ids/URIs/metadata that disagree."""

    code = "invalid_items"


class InvalidIndexParams(TokenFactoryError, ValueError):
    """An unknown backend, an unknown parameter, or a parameter value the backend cannot use."""

    code = "invalid_index_params"


class IndexNotFound(TokenFactoryError, FileNotFoundError):
    """No saved index at a URI (no ``index.json``)."""

    http_status, code = 404, "index_not_found"


class IncompleteIndex(IndexNotFound):
    """A folder with index data but no ``index.json``: a save that did not finish."""


class CorruptIndex(TokenFactoryError, ValueError):
    """A saved index whose files disagree with its manifest, or a format this version cannot read."""

    http_status, code = 500, "corrupt_index"


@dataclass(frozen=True)
class Hit:
    id: str
    uri: str | None
    score: float
    position: int
    metadata: dict[str, Any] | None


@dataclass(frozen=True, eq=False)  # arrays have no single truth value to compare by
class SearchResult:
    """``scores`` [q, k] float32 (best first) and ``indices`` [q, k] int64 into the index's items.

    ANN backends may find fewer than k items for a query (an IVF probe that reaches too few lists); the
    missing slots hold index -1 and score -inf, and the id/uri/hit helpers skip them.
    """

    scores: np.ndarray
    indices: np.ndarray
    # The index's own item lists, not copies: they are append-only, so positions stay valid.
    _ids: Sequence[str]
    _uris: Sequence[str | None]
    _metadata: Sequence[dict[str, Any] | None]

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    @functools.cached_property
    def ids(self) -> list[list[str]]:
        """Per query, the ids of its hits, best first."""
        return [[self._ids[i] for i in row if i >= 0] for row in self.indices.tolist()]

    @functools.cached_property
    def uris(self) -> list[list[str | None]]:
        """Per query, the URIs of its hits (None for items added without one), best first."""
        return [[self._uris[i] for i in row if i >= 0] for row in self.indices.tolist()]

    def hits(self, row: int = 0) -> list[Hit]:
        """The hits of one query, as records."""
        return [
            Hit(self._ids[i], self._uris[i], float(s), i, self._metadata[i])
            for i, s in zip(self.indices[row].tolist(), self.scores[row].tolist())
            if i >= 0
        ]


def _as_matrix(vectors: Any, dim: int, what: str) -> np.ndarray:
    """``vectors`` as float32 [n, dim] (a single [dim] vector counts as one row), checked."""
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise IndexDimensionMismatch(f"{what} must be a [n, {dim}] matrix, got shape {arr.shape}")
    if arr.shape[1] != dim:
        raise IndexDimensionMismatch(
            f"{what} have dimension {arr.shape[1]} but the index has dimension {dim}: were they made "
            "with the same backbone as the index?"
        )
    if not np.isfinite(arr).all():
        raise InvalidItems(f"{what} contain NaN or infinite values")
    return arr


def _normalise(arr: np.ndarray, reject_zero: bool) -> np.ndarray:
    norms = np.linalg.norm(arr, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    if reject_zero and zero.any():
        # A zero vector has no direction, so it has no cosine with anything: refuse rather than store
        # an item that would silently score 0 against every query.
        raise InvalidItems(f"{int(zero.sum())} vector(s) have zero length (first at row {int(zero.argmax())})")
    return arr / np.maximum(norms, np.float32(1e-12))


def prepare_items(
    vectors: Any,
    ids: Sequence[str],
    uris: Sequence[str | None] | None,
    metadata: list[dict[str, Any] | None] | None,
    dim: int,
) -> tuple[np.ndarray, list[str], list[str | None], list[dict[str, Any] | None]]:
    """A batch of items checked (everything but the uniqueness of ids, which depends on the index) and
    its vectors normalised: (vectors, ids, uris, metadata), the last two filled with None when absent."""
    arr = _as_matrix(vectors, dim, "vectors")
    ids = list(ids)
    n = arr.shape[0]
    if len(ids) != n:
        raise InvalidItems(f"{n} vectors but {len(ids)} ids")
    if uris is not None and len(uris) != n:
        raise InvalidItems(f"{n} vectors but {len(uris)} uris")
    if metadata is not None and len(metadata) != n:
        raise InvalidItems(f"{n} vectors but {len(metadata)} metadata entries")
    bad = next((i for i in ids if not isinstance(i, str) or not i), None)
    if bad is not None:
        raise InvalidItems(f"item ids must be non-empty strings, got {bad!r}")
    uri_list = list(uris) if uris is not None else [None] * n
    bad = next((u for u in uri_list if u is not None and not isinstance(u, str)), None)
    if bad is not None:
        raise InvalidItems(f"item URIs must be strings or None, got {bad!r}")
    meta = list(metadata) if metadata is not None else [None] * n
    for m in meta:
        # Checked now so that a bad entry fails here, not at save time hours later.
        try:
            json.dumps(m)
        except (TypeError, ValueError) as e:
            raise InvalidItems(f"item metadata must be JSON-serialisable: {e}") from None
    return _normalise(arr, reject_zero=True), ids, uri_list, meta


class VectorIndex(abc.ABC):
    """Cosine-similarity index of items (id, optional URI, optional JSON-able metadata) with vectors.

    Searches may run concurrently with each other, but not with ``add``: build, then serve (a serving
    replica that moves to a new gallery loads a new index and swaps the reference).
    """

    def __init__(self, dim: int) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise InvalidIndexParams(f"dim must be a positive integer, got {dim!r}")
        self._dim = int(dim)
        self._ids: list[str] = []
        self._uris: list[str | None] = []
        self._metadata: list[dict[str, Any] | None] = []
        self._positions: dict[str, int] = {}

    # --- what a backend implements -------------------------------------------------------------
    @property
    @abc.abstractmethod
    def backend(self) -> str:
        """The name ``create_index`` and ``index.json`` use: "exact", "hnsw" or "ivf"."""

    @property
    @abc.abstractmethod
    def params(self) -> dict[str, Any]:
        """The backend's construction/search parameters, JSON-able (saved in index.json)."""

    @abc.abstractmethod
    def _add_normalised(self, vectors: np.ndarray) -> None: ...

    @abc.abstractmethod
    def _search_normalised(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    @abc.abstractmethod
    def _reconstruct(self, rows: np.ndarray) -> np.ndarray:
        """The stored (normalised) vectors at insertion positions ``rows``, [len(rows), dim] float32."""

    @abc.abstractmethod
    def _payload(self) -> dict[str, bytes]:
        """File name -> bytes of the backend's vector data, for ``save``."""

    @abc.abstractmethod
    def _stored_count(self) -> int:
        """How many vectors the backend holds (checked against the items on load)."""

    @classmethod
    @abc.abstractmethod
    def _restore(cls, backend: str, dim: int, params: dict[str, Any], files: dict[str, bytes]) -> VectorIndex:
        """The index (without its items) from its ``index.json`` fields and payload files."""

    # --- the shared interface ------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._dim

    @property
    def ids(self) -> Sequence[str]:
        """Item ids in insertion order (the index's own list: read it, do not modify it)."""
        return self._ids

    @property
    def uris(self) -> Sequence[str | None]:
        return self._uris

    @property
    def metadata(self) -> Sequence[dict[str, Any] | None]:
        return self._metadata

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._positions

    def position(self, item_id: str) -> int:
        """The insertion position of an item id (KeyError if absent)."""
        return self._positions[item_id]

    def vectors_of(self, ids: Sequence[str]) -> np.ndarray:
        """The stored normalised vectors of these items, [len(ids), dim] float32 (KeyError if one is absent).

        What GAIR's retrieval-side rule compares with the concept: the items a query actually found."""
        rows = np.fromiter((self._positions[i] for i in ids), dtype=np.int64, count=len(ids))
        return self._reconstruct(rows)

    def check_add(self, n: int) -> None:
        """Raise the error an ``add`` of ``n`` (valid) vectors would raise for a reason of the backend's own
        (an untrained IVF given too few vectors to learn its lists from); nothing by default. Lets a caller
        that adds one batch across several indexes (`factory.index.sharded`) check them all before any
        of them changes."""

    def add(
        self,
        vectors: np.ndarray,
        ids: Sequence[str],
        uris: Sequence[str | None] | None = None,
        metadata: list[dict[str, Any] | None] | None = None,
    ) -> None:
        """Add items. Everything is validated before anything is stored, so a rejected batch leaves
        the index unchanged."""
        arr, ids, uri_list, meta = prepare_items(vectors, ids, uris, metadata, self._dim)
        _check_unique(ids, self._positions)
        n = len(ids)
        if n == 0:
            return
        self.check_add(n)
        self._add_normalised(arr)
        start = len(self._ids)
        self._ids.extend(ids)
        self._uris.extend(uri_list)
        self._metadata.extend(meta)
        self._positions.update((item, start + j) for j, item in enumerate(ids))

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """The ``min(k, len(self))`` most similar items of each query, best first."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidIndexParams(f"k must be a positive integer, got {k!r}")
        if len(self) == 0:
            raise EmptyIndex("the index has no items: add the gallery's vectors before searching")
        q = _normalise(_as_matrix(queries, self._dim, "queries"), reject_zero=False)
        k_eff = min(int(k), len(self))
        if q.shape[0] == 0:
            scores, indices = np.zeros((0, k_eff), np.float32), np.zeros((0, k_eff), np.int64)
        else:
            scores, indices = self._search_normalised(q, k_eff)
        return SearchResult(scores, indices, self._ids, self._uris, self._metadata)

    def save(self, uri: str, s3: S3Options | None = None) -> None:
        """Write the index under the folder ``uri``; an existing index there is replaced."""
        manifest_uri = storage.join(uri, MANIFEST_NAME)
        # Remove the old manifest first: while the data files are being replaced the folder must read
        # as "incomplete", not as the old manifest over new data.
        storage.delete(manifest_uri, missing_ok=True, s3=s3)
        files = {ITEMS_NAME: storage.parquet_bytes(self._items_table()), **self._payload()}
        for name, data in files.items():
            storage.write_bytes(storage.join(uri, name), data, s3)
        manifest = {
            "format_version": FORMAT_VERSION,
            "backend": self.backend,
            "dim": self._dim,
            "count": len(self),
            "params": self.params,
            "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()},
        }
        storage.write_json(manifest_uri, manifest, s3)

    def _items_table(self) -> pa.Table:
        return pa.table(
            {
                "id": pa.array(self._ids, pa.string()),
                "uri": pa.array(self._uris, pa.string()),
                "metadata": pa.array([None if m is None else json.dumps(m) for m in self._metadata], pa.string()),
            }
        )

    def _restore_items(self, table: pa.Table) -> None:
        self._ids = table.column("id").to_pylist()
        self._uris = table.column("uri").to_pylist()
        self._metadata = [None if m is None else json.loads(m) for m in table.column("metadata").to_pylist()]
        self._positions = {item: j for j, item in enumerate(self._ids)}


def _check_unique(ids: list[str], existing: Container[str]) -> None:
    seen: set[str] = set()
    for item in ids:
        if item in existing or item in seen:
            where = "already in the index" if item in existing else "repeated in this batch"
            raise DuplicateItemId(f"item id {item!r} is {where}: ids must be unique")
        seen.add(item)
