"""A gallery split across shards: each item lives in exactly one shard, chosen by a stable hash of its
id, and a search asks every shard for its own top k and merges them by score.

Why: a compressed index (IVF-PQ) shrinks a 512-d vector from 2 KiB to about 75 bytes, but past some
gallery size even that outgrows one replica's memory. Each shard is an ordinary `VectorIndex` of any
backend, so a serving replica can hold just one shard (`load_shard`) while the ingress fans a query out
and merges the answers (`merge_hits`), or one process can hold them all (`ShardedIndex`, searched with a
thread pool: FAISS and NumPy release the GIL, so shards are searched in parallel where there are cores).

IVF shards are trained once, together (`ShardedIndex.add`): shards that learned their own lists and
codebooks would score on slightly different scales, and a merge by score would favour some of them.

The merge is exact with respect to the shards: every item of the global top k is in its own shard's
top k, so merging the shards' top k loses nothing. With exact shards the merged answer is the unsharded
exact answer (up to the order of equal scores); with ANN shards it is as good as the shards' searches.

Saved layout under a root URI (any URI ``factory.storage`` takes)::

    <root>/shard-00000/   a saved index (`VectorIndex.save`: its data files, then its own index.json)
    <root>/shard-00001/   ...
    <root>/shards.json    written LAST: routing, dim, count and, per shard, its folder, item count and
                          the sha256 of its index.json (which holds the checksums of its data files)

A sharded index exists if and only if ``shards.json`` does (a save killed half way is not loadable), and
the checksum chain catches a shard folder replaced behind the manifest's back.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from factory import storage
from factory.index import create_index, load_saved_index
from factory.index.base import (
    MANIFEST_NAME,
    CorruptIndex,
    EmptyIndex,
    IncompleteIndex,
    IndexDimensionMismatch,
    IndexNotFound,
    InvalidIndexParams,
    SearchResult,
    VectorIndex,
    _as_matrix,
    _check_unique,
    _normalise,
    prepare_items,
)
from factory.storage import NotFoundInStorage, S3Options

SHARDS_MANIFEST = "shards.json"
SHARDS_FORMAT_VERSION = 1
# Named in shards.json, so a loader that routed differently would refuse the index instead of looking
# items up in the wrong shard.
ROUTING = "blake2b-64 mod shards"


def shard_of(item_id: str, shards: int) -> int:
    """The shard of an item id: the same in every process and on every machine (Python's own ``hash`` of a
    string is salted per process, so it cannot be used), and spread evenly whatever the ids look like."""
    digest = hashlib.blake2b(item_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def merge_top_k(scores: np.ndarray, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row of candidates [q, c] (c ≥ k), best first; equal scores by index, so the
    order does not depend on which shard answered first. Empty slots (-1, -inf) sort last."""
    order = np.lexsort((indices, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(indices, order, axis=1)


def merge_hits(per_shard: Sequence[Sequence[list[tuple]]], ks: Sequence[int]) -> list[list[tuple]]:
    """Merge the shards' hit lists: ``per_shard[s][i]`` holds shard s's hits of query i as (id, uri, score)
    tuples, best first; the answer holds each query's ``ks[i]`` best over all shards (a stable sort: equal
    scores keep the shards' order)."""
    return [
        sorted(itertools.chain.from_iterable(rows), key=lambda hit: -hit[2])[:k] for rows, k in zip(zip(*per_shard), ks)
    ]


class _Concat(Sequence):
    """The concatenation of the shards' (append-only) item lists as they were when it was made: a search's
    positions stay valid after later adds, and nothing is copied."""

    def __init__(self, parts: Sequence[Sequence[Any]]) -> None:
        self._parts = list(parts)
        self._ends = list(itertools.accumulate(len(p) for p in self._parts))

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i) + len(self) if i < 0 else int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"position {i} out of range for {len(self)} items")
        s = bisect.bisect_right(self._ends, i)
        return self._parts[s][i - (self._ends[s - 1] if s else 0)]

    def __iter__(self) -> Iterator[Any]:
        starts = [0, *self._ends[:-1]]
        return itertools.chain.from_iterable(
            itertools.islice(p, end - start) for p, start, end in zip(self._parts, starts, self._ends)
        )


class ShardedIndex:
    """Items spread over ``len(shards)`` indexes by `shard_of`; the `VectorIndex` search, add, save and
    item interface over all of them. Positions are those of the concatenation shard 0, shard 1, …; an
    add to one shard moves the positions of the shards after it, so a position is valid for the search
    that returned it (searches and adds do not overlap anyway: build, then serve).

    ``workers``: threads searching shards at once (default: one per shard, at most one per core); 1
    searches them one after the other, which is as fast where cores are few and busy (measured on 2 shared
    cores, 4 shards of 250k IVF-PQ codes: 2.5 ms a query either way; 1.3 against 2.4 ms at 25k a shard).

    Untrained IVF shards are trained together by the first add: shard 0 learns from the whole batch and
    the others are replaced by empty copies of it (`FaissIndex.empty_copy`)."""

    backend = "sharded"

    def __init__(
        self, shards: Sequence[VectorIndex], *, check_routing: bool = True, workers: int | None = None
    ) -> None:
        if not shards:
            raise InvalidIndexParams("a sharded index needs at least one shard")
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise InvalidIndexParams(f"workers must be a positive integer, got {workers!r}")
        if len({s.dim for s in shards}) != 1:
            raise IndexDimensionMismatch(f"shards of different dimensions {sorted({s.dim for s in shards})}")
        if check_routing:  # O(items): skipped on load, where the checksums vouch for what save wrote
            for i, shard in enumerate(shards):
                wrong = next((item for item in shard.ids if shard_of(item, len(shards)) != i), None)
                if wrong is not None:
                    raise InvalidIndexParams(
                        f"item {wrong!r} is in shard {i} but routes to shard "
                        f"{shard_of(wrong, len(shards))}: build shards with ShardedIndex.add"
                    )
        self._shards = list(shards)
        self._workers = workers or max(1, min(len(self._shards), os.cpu_count() or 1))
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    @classmethod
    def create(cls, backend: str, dim: int, shards: int, **params: Any) -> ShardedIndex:
        """``shards`` empty indexes of ``backend`` (`create_index`'s names and parameters)."""
        if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
            raise InvalidIndexParams(f"shards must be a positive integer, got {shards!r}")
        return cls([create_index(backend, dim, **params) for _ in range(shards)])

    @classmethod
    def from_index(cls, index: VectorIndex, shards: int, backend: str | None = None, **params: Any) -> ShardedIndex:
        """``index``'s items re-sharded (into ``backend``, by default its own). The vectors are the index's
        stored ones: exact for exact/HNSW/IVF, the codes' reconstructions for IVF-PQ."""
        out = cls.create(backend or index.backend, index.dim, shards, **params)
        if len(index):
            out.add(index.vectors_of(index.ids), list(index.ids), list(index.uris), list(index.metadata))
        return out

    # --- the item interface -------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._shards[0].dim

    @property
    def shards(self) -> tuple[VectorIndex, ...]:
        return tuple(self._shards)

    @property
    def workers(self) -> int:
        return self._workers

    @property
    def params(self) -> dict[str, Any]:
        return {
            "shards": len(self._shards),
            "shard_backend": self._shards[0].backend,
            "shard_params": self._shards[0].params,
        }

    def __len__(self) -> int:
        return sum(len(s) for s in self._shards)

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and item_id in self._shards[shard_of(item_id, len(self._shards))]

    @property
    def ids(self) -> Sequence[str]:
        return _Concat([s.ids for s in self._shards])

    @property
    def uris(self) -> Sequence[str | None]:
        return _Concat([s.uris for s in self._shards])

    @property
    def metadata(self) -> Sequence[dict[str, Any] | None]:
        return _Concat([s.metadata for s in self._shards])

    def position(self, item_id: str) -> int:
        s = shard_of(item_id, len(self._shards))
        return sum(len(x) for x in self._shards[:s]) + self._shards[s].position(item_id)

    def vectors_of(self, ids: Sequence[str]) -> np.ndarray:
        """The stored normalised vectors of these items, [len(ids), dim] (KeyError if one is absent)."""
        out = np.empty((len(ids), self.dim), np.float32)
        routes = [shard_of(i, len(self._shards)) for i in ids]
        for s, shard in enumerate(self._shards):
            rows = [j for j, r in enumerate(routes) if r == s]
            if rows:
                out[rows] = shard.vectors_of([ids[j] for j in rows])
        return out

    # --- add and search -----------------------------------------------------------------------------
    def add(
        self,
        vectors: np.ndarray,
        ids: Sequence[str],
        uris: Sequence[str | None] | None = None,
        metadata: list[dict[str, Any] | None] | None = None,
    ) -> None:
        """Add items, each to its shard. The whole batch is checked first (items, ids unique over all
        shards, and each shard's own conditions, e.g. an untrained IVF's minimum), so a rejected batch
        leaves every shard unchanged."""
        arr, ids, uri_list, meta = prepare_items(vectors, ids, uris, metadata, self.dim)
        _check_unique(ids, self)
        if len(ids) and len(self) == 0 and all(getattr(s, "needs_training", False) for s in self._shards):
            # One model for all shards: the IVF-PQ scores of separately trained shards carry each its own
            # codebooks' bias, so a merge by score favours some shards (measured at 100k, 4 shards: recall@10
            # 0.38 against 0.51 unsharded, though each shard alone found 0.68 of its own top 10).
            self._shards[0]._train(arr)  # type: ignore[attr-defined]  # `train` without re-checking arr
            self._shards = [self._shards[0], *(self._shards[0].empty_copy() for _ in self._shards[1:])]  # type: ignore[attr-defined]
        routes = np.fromiter((shard_of(i, len(self._shards)) for i in ids), np.int64, len(ids))
        parts = [np.flatnonzero(routes == s) for s in range(len(self._shards))]
        for shard, rows in zip(self._shards, parts):
            shard.check_add(len(rows))
        for shard, rows in zip(self._shards, parts):
            if rows.size:
                shard.add(arr[rows], [ids[j] for j in rows], [uri_list[j] for j in rows], [meta[j] for j in rows])

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """The ``min(k, len(self))`` most similar items of each query over all shards, best first."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidIndexParams(f"k must be a positive integer, got {k!r}")
        n = len(self)
        if n == 0:
            raise EmptyIndex("the index has no items: add the gallery's vectors before searching")
        q = _normalise(_as_matrix(queries, self.dim, "queries"), reject_zero=False)
        k_eff = min(int(k), n)
        views = [
            _Concat([s.ids for s in self._shards]),
            _Concat([s.uris for s in self._shards]),
            _Concat([s.metadata for s in self._shards]),
        ]
        if q.shape[0] == 0:
            return SearchResult(np.zeros((0, k_eff), np.float32), np.zeros((0, k_eff), np.int64), *views)
        starts = [0, *itertools.accumulate(len(s) for s in self._shards)][:-1]
        live = [(s, start) for s, start in zip(self._shards, starts) if len(s)]
        found = self._map(lambda shard: shard.search(q, min(k_eff, len(shard))), [s for s, _ in live])
        scores = np.concatenate([r.scores for r in found], axis=1)
        # A shard's -1 (a slot its ANN search could not fill) stays -1, not -1 + the shard's offset.
        indices = np.concatenate(
            [np.where(r.indices >= 0, r.indices + start, -1) for r, (_, start) in zip(found, live)], axis=1
        )
        scores, indices = merge_top_k(scores, indices, k_eff)
        return SearchResult(scores, indices, *views)

    def _map(self, fn, shards: list[VectorIndex]) -> list[Any]:
        if len(shards) == 1 or self._workers == 1:
            return [fn(s) for s in shards]
        with self._pool_lock:  # one pool per index, made on first use and kept: threads are cheap to keep
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="shard-search")
        return list(self._pool.map(fn, shards))

    def set_search_params(self, **params: Any) -> None:
        """Set FAISS search knobs (``nprobe``, ``ef_search``) on every shard; saved with each shard."""
        for shard in self._shards:
            if not hasattr(shard, "set_search_params"):
                raise InvalidIndexParams(f"{shard.backend} shards have no search parameters")
            shard.set_search_params(**params)  # type: ignore[attr-defined]

    # --- save and load ------------------------------------------------------------------------------
    def save(self, uri: str, s3: S3Options | None = None) -> None:
        """Write every shard under ``uri``, then ``shards.json``; an existing sharded index there is replaced
        (folders of shards beyond this index's count are left in place, unlisted and unread)."""
        manifest_uri = storage.join(uri, SHARDS_MANIFEST)
        storage.delete(manifest_uri, missing_ok=True, s3=s3)  # incomplete, not old, while shards are rewritten
        entries = []
        for i, shard in enumerate(self._shards):
            folder = f"shard-{i:05d}"
            shard.save(storage.join(uri, folder), s3)
            index_json = storage.read_bytes(storage.join(uri, folder, MANIFEST_NAME), s3)
            entries.append(
                {
                    "path": folder,
                    "count": len(shard),
                    "backend": shard.backend,
                    "index_json_sha256": hashlib.sha256(index_json).hexdigest(),
                }
            )
        storage.write_json(
            manifest_uri,
            {
                "format_version": SHARDS_FORMAT_VERSION,
                "routing": ROUTING,
                "dim": self.dim,
                "count": len(self),
                "shards": entries,
            },
            s3,
        )


def read_shards_manifest(uri: str, s3: S3Options | None = None) -> dict[str, Any]:
    """The checked ``shards.json`` of a sharded index at ``uri``."""
    manifest_uri = storage.join(uri, SHARDS_MANIFEST)
    try:
        manifest = storage.read_json(manifest_uri, s3)
    except NotFoundInStorage:
        if storage.listdir(uri, s3):
            raise IncompleteIndex(
                f"{uri} holds shard folders but no {SHARDS_MANIFEST}: its save did not finish; "
                "save the sharded index again"
            ) from None
        raise IndexNotFound(f"no sharded index at {uri} (no {SHARDS_MANIFEST})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != SHARDS_FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise CorruptIndex(
            f"{manifest_uri}: sharded format version {version!r}, this code reads {SHARDS_FORMAT_VERSION}"
        )
    if manifest.get("routing") != ROUTING:
        raise CorruptIndex(f"{manifest_uri}: routing {manifest.get('routing')!r}, this code routes by {ROUTING!r}")
    try:
        entries = list(manifest["shards"])
        if not entries or int(manifest["dim"]) < 1:
            raise ValueError("no shards or no dimension")
        for e in entries:
            str(e["path"]), int(e["count"]), str(e["index_json_sha256"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptIndex(f"{manifest_uri}: missing or malformed field ({e!r})") from e
    return manifest


def load_shard(uri: str, shard: int, s3: S3Options | None = None, shards: int | None = None) -> VectorIndex:
    """Shard ``shard`` of the sharded index at ``uri``, checked against ``shards.json`` (and its own
    manifest's checksums): what one serving replica of a sharded gallery holds. ``shards``: the count
    the caller was configured for; a different count in the manifest is an error, not a silent gap."""
    manifest = read_shards_manifest(uri, s3)
    count = len(manifest["shards"])
    if shards is not None and shards != count:
        raise InvalidIndexParams(
            f"the sharded index at {uri} has {count} shards, but {shards} were expected: "
            "configure the service with its shard count"
        )
    if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < count:
        raise InvalidIndexParams(f"shard {shard!r} out of range: the sharded index at {uri} has {count} shards")
    return _load_entry(uri, manifest, shard, s3)


def load_sharded_index(uri: str, s3: S3Options | None = None, workers: int | None = None) -> ShardedIndex:
    """The whole sharded index at ``uri``, every shard checked (``workers``: as in `ShardedIndex`)."""
    manifest = read_shards_manifest(uri, s3)
    shards = [_load_entry(uri, manifest, i, s3) for i in range(len(manifest["shards"]))]
    return ShardedIndex(shards, check_routing=False, workers=workers)


def _load_entry(uri: str, manifest: dict[str, Any], i: int, s3: S3Options | None) -> VectorIndex:
    entry = manifest["shards"][i]
    folder = storage.join(uri, entry["path"])
    try:
        index_json = storage.read_bytes(storage.join(folder, MANIFEST_NAME), s3)
    except NotFoundInStorage:
        raise CorruptIndex(
            f"shard {i} ({folder}) is listed in {SHARDS_MANIFEST} but its {MANIFEST_NAME} is "
            "missing: save the sharded index again"
        ) from None
    if hashlib.sha256(index_json).hexdigest() != entry["index_json_sha256"]:
        raise CorruptIndex(
            f"shard {i} ({folder}): {MANIFEST_NAME} does not match the checksum in "
            f"{SHARDS_MANIFEST}: save the sharded index again"
        )
    index = load_saved_index(folder, s3)  # checks the shard's own data files against its index.json
    if len(index) != int(entry["count"]) or index.dim != int(manifest["dim"]):
        raise CorruptIndex(
            f"shard {i} ({folder}) holds {len(index)} items of dimension {index.dim}; "
            f"{SHARDS_MANIFEST} says {entry['count']} of dimension {manifest['dim']}"
        )
    return index


__all__ = [
    "ROUTING",
    "SHARDS_MANIFEST",
    "ShardedIndex",
    "load_shard",
    "load_sharded_index",
    "merge_hits",
    "merge_top_k",
    "read_shards_manifest",
    "shard_of",
]
