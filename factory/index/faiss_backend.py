"""The FAISS backends of `factory.index`: HNSW and IVF approximate search over normalised vectors.

Kept apart from the exact index so that processes that never use ANN never import FAISS (its OpenMP
runtime beside torch's is best avoided when not needed).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from factory.index.base import FAISS_NAME, MANIFEST_NAME, CorruptIndex, InvalidIndexParams, VectorIndex

_FAISS_DEFAULTS: dict[str, dict[str, Any]] = {
    # HNSW: M links per node, efConstruction/efSearch candidate-list sizes (recall vs build/query time).
    "hnsw": {"m": 32, "ef_construction": 200, "ef_search": 64},
    # IVF: nlist clusters (None: chosen from the first batch's size), nprobe clusters visited per query.
    "ivf": {"nlist": None, "nprobe": 16},
}


class FaissIndex(VectorIndex):
    """Approximate search with FAISS: ``kind="hnsw"`` (IndexHNSWFlat) or ``kind="ivf"`` (IndexIVFFlat),
    both with the inner-product metric over normalised vectors.

    IVF learns its clusters from the first non-empty ``add``: add the gallery in one call, or at least
    a representative first batch (≥ 39 vectors per list, FAISS's own rule of thumb).
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
        self._faiss = _import_faiss()
        self._index: Any = None
        if kind == "hnsw":
            self._index = self._faiss.IndexHNSWFlat(dim, self._params["m"], self._faiss.METRIC_INNER_PRODUCT)
            self._index.hnsw.efConstruction = self._params["ef_construction"]
        elif self._params["nlist"] is not None:
            self._index = self._new_ivf(self._params["nlist"])
        self._apply_search_params()

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
        index = self._faiss.IndexIVFFlat(quantizer, self._dim, nlist, self._faiss.METRIC_INNER_PRODUCT)
        # The Python wrapper does not always keep the quantizer alive on its own.
        self._quantizer = quantizer
        return index

    def _add_normalised(self, vectors: np.ndarray) -> None:
        if self._kind == "ivf":
            if self._index is None:
                # sqrt(n)-ish lists, but never fewer than 39 training points per list.
                n = vectors.shape[0]
                self._params["nlist"] = max(1, min(int(4 * math.sqrt(n)), n // 39))
                self._index = self._new_ivf(self._params["nlist"])
                self._apply_search_params()
            if not self._index.is_trained:
                if vectors.shape[0] < self._params["nlist"]:
                    raise InvalidIndexParams(
                        f"IVF with nlist={self._params['nlist']} needs at least that many vectors in its "
                        f"first add to train on, got {vectors.shape[0]}: add more, or lower nlist"
                    )
                self._index.train(vectors)
        self._index.add(vectors)

    def _search_normalised(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, indices = self._index.search(queries, k)
        indices = indices.astype(np.int64, copy=False)
        scores = np.where(indices < 0, -np.inf, scores).astype(np.float32)
        return scores, indices

    def _reconstruct(self, rows: np.ndarray) -> np.ndarray:
        if self._index is None or rows.size == 0:
            return np.zeros((rows.size, self._dim), np.float32)
        if self._kind == "ivf":
            self._index.make_direct_map()  # IVF lists do not map a position to its vector until asked (idempotent)
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
        if backend == "ivf" and params.get("nlist") is None:
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
