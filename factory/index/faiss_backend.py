"""The FAISS backends of `factory.index`: HNSW, IVF and IVF-PQ approximate search over normalised vectors.

Kept apart from the exact index so that processes that never use ANN never import FAISS (its OpenMP
runtime beside torch's is best avoided when not needed).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from factory.index.base import (
    FAISS_NAME,
    MANIFEST_NAME,
    CorruptIndex,
    InvalidIndexParams,
    VectorIndex,
    _as_matrix,
    _normalise,
)

_FAISS_DEFAULTS: dict[str, dict[str, Any]] = {
    # HNSW: M links per node, efConstruction/efSearch candidate-list sizes (recall vs build/query time).
    "hnsw": {"m": 32, "ef_construction": 200, "ef_search": 64},
    # IVF: nlist clusters (None: chosen from the first batch's size), nprobe clusters visited per query.
    "ivf": {"nlist": None, "nprobe": 16},
    # IVF-PQ: IVF whose lists hold product-quantised codes (m sub-quantizers of nbits each, so m * nbits / 8
    # bytes a vector instead of 4 * dim) and no raw vectors: the point is memory, so there is no exact
    # re-rank. m None: the largest divisor of dim up to dim / 8 (64 bytes for 512-d). train_size: how
    # many vectors of the first add (a seeded sample) the clusters and codebooks learn from; None: all
    # of them (FAISS then subsamples to 256 points per cluster itself).
    "ivfpq": {"nlist": None, "m": None, "nbits": 8, "nprobe": 16, "train_size": None},
}
_IVF_KINDS = ("ivf", "ivfpq")
# FAISS's rule of thumb for k-means: fewer than this many training points per list learns poor lists.
_POINTS_PER_LIST = 39


def default_pq_m(dim: int) -> int:
    """The largest divisor of ``dim`` that is at most ``dim // 8``: about 8 dimensions per sub-quantizer,
    which keeps recall usable, and always a divisor, which FAISS requires."""
    return max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)


class FaissIndex(VectorIndex):
    """Approximate search with FAISS: ``kind="hnsw"`` (IndexHNSWFlat), ``kind="ivf"`` (IndexIVFFlat) or
    ``kind="ivfpq"`` (IndexIVFPQ), all with the inner-product metric over normalised vectors.

    IVF kinds learn their clusters (IVF-PQ: and codebooks) from the first non-empty ``add``: add the
    gallery in one call, or at least a representative first batch (≥ 39 vectors per list, FAISS's own
    rule of thumb). IVF-PQ keeps only codes, so its scores are approximate cosines and ``vectors_of``
    returns the codes' reconstructions, not the vectors that were added.
    """

    def __init__(self, dim: int, kind: str = "hnsw", **params: Any) -> None:
        super().__init__(dim)
        if kind not in _FAISS_DEFAULTS:
            raise InvalidIndexParams(f"unknown FAISS kind {kind!r}; use one of {sorted(_FAISS_DEFAULTS)}")
        unknown = set(params) - set(_FAISS_DEFAULTS[kind])
        if unknown:
            raise InvalidIndexParams(
                f"unknown {kind} parameter(s) {sorted(unknown)}; known: {sorted(_FAISS_DEFAULTS[kind])}"
            )
        self._kind = kind
        self._params = {**_FAISS_DEFAULTS[kind], **params}
        for name, value in self._params.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidIndexParams(f"{kind} parameter {name} must be a positive integer, got {value!r}")
        if kind == "ivfpq":
            self._check_pq_params()
        self._faiss = _import_faiss()
        self._index: Any = None
        if kind == "hnsw":
            self._index = self._faiss.IndexHNSWFlat(dim, self._params["m"], self._faiss.METRIC_INNER_PRODUCT)
            self._index.hnsw.efConstruction = self._params["ef_construction"]
        elif self._params["nlist"] is not None:
            self._index = self._new_ivf(self._params["nlist"])
        self._apply_search_params()

    def _check_pq_params(self) -> None:
        if self._params["m"] is None:
            self._params["m"] = default_pq_m(self._dim)  # resolved now, so index.json records what was built
        if self._dim % self._params["m"]:
            raise InvalidIndexParams(
                f"ivfpq m={self._params['m']} does not divide dim {self._dim}: each of the m sub-quantizers "
                f"codes dim / m dimensions (e.g. m={default_pq_m(self._dim)} for dim {self._dim})"
            )
        if self._params["nbits"] > 16:
            raise InvalidIndexParams(
                f"ivfpq nbits must be 1..16 (bits per sub-quantizer code), got {self._params['nbits']}"
            )

    @property
    def backend(self) -> str:
        return self._kind

    @property
    def params(self) -> dict[str, Any]:
        return dict(self._params)

    def set_search_params(self, *, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Trade recall for speed at query time (HNSW ``ef_search``, IVF ``nprobe``); saved with the index."""
        for name, value in (("ef_search", ef_search), ("nprobe", nprobe)):
            if value is None:
                continue
            if name not in self._params or isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidIndexParams(f"{name}={value!r} is not a valid {self._kind} search parameter")
            self._params[name] = value
        self._apply_search_params()

    def _apply_search_params(self) -> None:
        if self._index is None:
            return
        if self._kind == "hnsw":
            self._index.hnsw.efSearch = self._params["ef_search"]
        else:
            self._index.nprobe = self._params["nprobe"]

    def _new_ivf(self, nlist: int) -> Any:
        quantizer = self._faiss.IndexFlatIP(self._dim)
        if self._kind == "ivfpq":
            index = self._faiss.IndexIVFPQ(
                quantizer, self._dim, nlist, self._params["m"], self._params["nbits"], self._faiss.METRIC_INNER_PRODUCT
            )
        else:
            index = self._faiss.IndexIVFFlat(quantizer, self._dim, nlist, self._faiss.METRIC_INNER_PRODUCT)
        # The Python wrapper does not always keep the quantizer alive on its own.
        self._quantizer = quantizer
        return index

    def _training_size(self, n: int) -> int:
        """How many of a first batch of ``n`` vectors an IVF kind trains on."""
        cap = self._params.get("train_size")
        return n if cap is None else min(n, cap)

    def _nlist_for(self, n: int) -> int:
        if self._params["nlist"] is not None:
            return self._params["nlist"]
        # sqrt(n)-ish lists for n vectors, but never fewer than 39 training points per list.
        return max(1, min(int(4 * math.sqrt(n)), self._training_size(n) // _POINTS_PER_LIST))

    def check_add(self, n: int) -> None:
        if self._kind not in _IVF_KINDS or n == 0 or (self._index is not None and self._index.is_trained):
            return
        nlist, trained_on = self._nlist_for(n), self._training_size(n)
        if trained_on < nlist:
            raise InvalidIndexParams(
                f"{self._kind} with nlist={nlist} needs at least that many vectors to train on in its first add, "
                f"got {trained_on}: add more, or lower nlist"
            )
        if self._kind == "ivfpq" and trained_on < 2 ** self._params["nbits"]:
            raise InvalidIndexParams(
                f"ivfpq with nbits={self._params['nbits']} learns {2 ** self._params['nbits']} centroids per "
                f"sub-quantizer and needs at least that many vectors to train on in its first add, got {trained_on}"
            )

    @property
    def needs_training(self) -> bool:
        """True for an IVF kind that has not learned its lists yet (its first add, or `train`, will)."""
        return self._kind in _IVF_KINDS and (self._index is None or not self._index.is_trained)

    def train(self, vectors: np.ndarray) -> None:
        """Learn an untrained IVF kind's lists (IVF-PQ: and codebooks) from ``vectors`` without adding them,
        as its first add would (nlist from their count, ``train_size`` sample); then `empty_copy` hands what
        was learned to other indexes (`ShardedIndex` trains once for all its shards)."""
        if not self.needs_training:
            raise InvalidIndexParams(f"this {self._kind} index has nothing to learn (already trained, or not IVF)")
        self._train(_normalise(_as_matrix(vectors, self._dim, "vectors"), reject_zero=True))

    def empty_copy(self) -> FaissIndex:
        """A new, empty index with this one's parameters and what it learned (IVF lists, PQ codebooks), so
        its scores come from the same model as this one's."""
        copy = FaissIndex(self._dim, kind=self._kind, **self._params)
        if self._kind in _IVF_KINDS and self._index is not None:
            copy._index = self._faiss.clone_index(self._index)
            copy._index.reset()  # drops the vectors, keeps the training
            copy._apply_search_params()
        return copy

    def _train(self, vectors: np.ndarray) -> None:
        self.check_add(vectors.shape[0])
        if self._index is None:
            self._params["nlist"] = self._nlist_for(vectors.shape[0])
            self._index = self._new_ivf(self._params["nlist"])
            self._apply_search_params()
        if not self._index.is_trained:
            t = self._training_size(vectors.shape[0])
            # A seeded sample, so a rebuild of the same gallery learns the same lists.
            rows = np.sort(np.random.default_rng(0).choice(vectors.shape[0], t, replace=False))
            self._index.train(vectors if t == vectors.shape[0] else vectors[rows])

    def _add_normalised(self, vectors: np.ndarray) -> None:
        if self._kind in _IVF_KINDS:
            self._train(vectors)
        self._index.add(vectors)

    def _search_normalised(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, indices = self._index.search(queries, k)
        indices = indices.astype(np.int64, copy=False)
        scores = np.where(indices < 0, -np.inf, scores).astype(np.float32)
        return scores, indices

    def _reconstruct(self, rows: np.ndarray) -> np.ndarray:
        if self._index is None or rows.size == 0:
            return np.zeros((rows.size, self._dim), np.float32)
        if self._kind in _IVF_KINDS:
            # IVF lists do not map a position to its vector until asked (idempotent; costs 8 bytes a vector).
            self._index.make_direct_map()
        return np.asarray(self._index.reconstruct_batch(rows), dtype=np.float32)

    def _payload(self) -> dict[str, bytes]:
        # An IVF saved before its first add has no FAISS index yet (nlist is still open): store an empty
        # placeholder, which _restore ignores because nlist is None in the params.
        index = self._index if self._index is not None else self._new_ivf(1)
        return {FAISS_NAME: self._faiss.serialize_index(index).tobytes()}

    def _stored_count(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    @classmethod
    def _restore(cls, backend: str, dim: int, params: dict[str, Any], files: dict[str, bytes]) -> FaissIndex:
        index = cls(dim, kind=backend, **params)
        if backend in _IVF_KINDS and params.get("nlist") is None:
            return index  # saved before its first add: nothing was trained
        restored = index._faiss.deserialize_index(np.frombuffer(files[FAISS_NAME], dtype=np.uint8))
        if restored.d != dim:
            raise CorruptIndex(f"{FAISS_NAME} has dimension {restored.d}, {MANIFEST_NAME} says {dim}")
        index._index = restored
        # The search-time knobs come from index.json, the one place a user may have changed them.
        index._apply_search_params()
        return index


def _import_faiss() -> Any:
    # Imported on first use: processes that only need the exact index never load FAISS's OpenMP runtime
    # next to torch's.
    import faiss

    return faiss
