"""Batched, differentiable injection of token vectors at marker positions, and end-of-text pooling."""

from __future__ import annotations

import torch

from factory.errors import DimensionMismatch
from factory.tokens.tokenizer import PromptBatch


def inject(embeddings: torch.Tensor, batch: PromptBatch, vectors: torch.Tensor | None) -> torch.Tensor:
    """Return ``embeddings`` [B, L, d] with the marker rows replaced by ``vectors[slot]``.

    ``vectors`` is [K, d], one row per ``batch.concept_ids``. `index_put` (not in-place) keeps the
    graph: gradients flow into ``vectors`` and nowhere else, because the frozen table does not require
    grad. One call serves any number of markers per prompt and any number of prompts.
    """
    if batch.marker_rows.numel() == 0:
        return embeddings
    if vectors is None:
        raise ValueError("the prompts contain concept markers but no token vectors were given")
    expected = (len(batch.concept_ids), embeddings.shape[-1])
    if vectors.dim() != 2 or tuple(vectors.shape) != expected:
        raise DimensionMismatch(
            f"token vectors have shape {tuple(vectors.shape)}, expected {expected} "
            f"(one row per concept in the prompts, of the text encoder's width {expected[1]})"
        )
    values = vectors.to(embeddings.dtype)[batch.marker_slots]
    return embeddings.index_put((batch.marker_rows, batch.marker_cols), values)


def pool_at(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Pick ``hidden[b, positions[b]]``: the true end-of-text state of each row."""
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions.to(hidden.device)]
