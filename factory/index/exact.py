"""The exact (brute-force) backend of `factory.index`."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from factory.index.base import VECTORS_NAME, CorruptIndex, InvalidIndexParams, VectorIndex


class ExactIndex(VectorIndex):
    """Brute force: one matrix product per block of queries, then a partial sort for the top k.

    Queries are processed in blocks sized so that the [block, n] score matrix stays under
    ``max_block_bytes``; that is what lets 1M items be searched without a [q, 1M] matrix in memory.
    """

    def __init__(self, dim: int, max_block_bytes: int = 256 << 20) -> None:
        super().__init__(dim)
        if max_block_bytes <= 0:
            raise InvalidIndexParams(f"max_block_bytes must be positive, got {max_block_bytes}")
        self._max_block_bytes = int(max_block_bytes)
        # Batches are kept as chunks and concatenated once at search time, so that adding a gallery in
        # many small batches does not copy the growing matrix at every add.
        self._chunks: list[np.ndarray] = [np.zeros((0, dim), np.float32)]

    @property
    def backend(self) -> str:
        return "exact"

    @property
    def params(self) -> dict[str, Any]:
        return {"max_block_bytes": self._max_block_bytes}

    @property
    def vectors(self) -> np.ndarray:
        """The normalised [n, dim] float32 matrix, in insertion order."""
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]
        return self._chunks[0]

    def _add_normalised(self, vectors: np.ndarray) -> None:
        self._chunks.append(vectors)

    def _search_normalised(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        matrix = self.vectors
        n = matrix.shape[0]
        # Per query row of a block: the float32 scores (4n bytes), argpartition's int64 indices (8n) and
        # its working copy of the scores (4n), so the block's peak stays within the budget (measured:
        # sizing by the scores alone peaked at 3x it).
        block = max(1, self._max_block_bytes // (16 * n))
        scores_out = np.empty((queries.shape[0], k), np.float32)
        indices_out = np.empty((queries.shape[0], k), np.int64)
        for start in range(0, queries.shape[0], block):
            scores = queries[start : start + block] @ matrix.T
            if k < n:
                # Partition the scores themselves (not their negation): no second [block, n] array.
                cand = np.argpartition(scores, n - k, axis=1)[:, n - k :]
            else:
                cand = np.broadcast_to(np.arange(n), scores.shape)
            cand_scores = np.take_along_axis(scores, cand, axis=1)
            # Best first; equal scores by position, so results do not depend on argpartition's order.
            order = np.lexsort((cand, -cand_scores), axis=-1)
            indices_out[start : start + block] = np.take_along_axis(cand, order, axis=1)
            scores_out[start : start + block] = np.take_along_axis(cand_scores, order, axis=1)
        return scores_out, indices_out

    def _reconstruct(self, rows: np.ndarray) -> np.ndarray:
        return self.vectors[rows]

    def _payload(self) -> dict[str, bytes]:
        buf = io.BytesIO()
        np.save(buf, self.vectors, allow_pickle=False)
        return {VECTORS_NAME: buf.getvalue()}

    def _stored_count(self) -> int:
        return int(self.vectors.shape[0])

    @classmethod
    def _restore(cls, backend: str, dim: int, params: dict[str, Any], files: dict[str, bytes]) -> ExactIndex:
        index = cls(dim, **params)
        matrix = np.load(io.BytesIO(files[VECTORS_NAME]), allow_pickle=False)
        if matrix.dtype != np.float32 or matrix.ndim != 2 or matrix.shape[1] != dim:
            raise CorruptIndex(f"{VECTORS_NAME} holds {matrix.dtype} {matrix.shape}, expected float32 [n, {dim}]")
        index._chunks = [matrix]
        return index
