"""Retrieval metrics as the personalised-retrieval field computes them.

ConCon-Chi's evaluation code (``hsp-iit/concon-chi_benchmark``, ``vlpers/utils/evaluation.py``), which
POLAR reuses unchanged for PerVL-DeepFashion2, defines, per query, from the 1-based ranks of its relevant
gallery items in the ranking:

    rank       the position of the *first* relevant item
    mRR        the mean over queries of 1 / rank
    R@k        whether *any* relevant item is in the top k (1 or 0), averaged over queries. This is what
               IR libraries call success@k or hit rate@k, *not* the fraction of the relevant items found in
               the top k (their recall@k); with one relevant item per query the two agree
    mAP        average precision over all relevant items: the mean over the query's relevant items of
               (their number up to it) / (its rank), averaged over queries
    mAP@k      the same precisions summed over the relevant items ranked in the top k, divided by
               min(#relevant, k) (ConCon-Chi's normalisation; trec_eval's map_cut divides by #relevant)

Two choices ConCon-Chi leaves open are fixed here:

* **Relevant items that were never ranked** (absent from the gallery or beyond a truncated ranking)
  count, as in trec_eval: they add nothing to any sum but stay in #relevant, and a query none of
  whose relevant items was ranked scores 0 on every metric (not NaN, and not dropped: dropping it would
  reward a method for losing items). ConCon-Chi divides by the relevant items it *found*, which is the
  same number whenever every relevant item is in the ranked gallery (always, for a full ranking).
* **Ties in scores** are broken deterministically (ConCon-Chi's ``torch.argsort`` is not stable, so its
  order among tied items is whatever the sort does): ``ties="order"`` ranks tied items by their position
  in the gallery (a stable sort), ``ties="pessimistic"`` ranks the relevant ones after every tied
  irrelevant one (a method is never credited for a tie it did not break). From a ranked list of ids
  (what an index returns) the list's own order is used as it is.

Numpy in, floats out. The metrics of one method over its queries: `field_metrics`; the PerVL numbers in
POLAR's format: `pervl_context_scores`.
"""

from __future__ import annotations

from typing import Collection, Iterable, Sequence

import numpy as np

from factory.errors import ConfigError

TIE_RULES = ("order", "pessimistic")
RECALL_KS = (1, 5, 10)
MAP_AT_K = 50  # ConCon-Chi's default k for mAP@k
MAP_AT_KEY = f"map@{MAP_AT_K}"


def _check_ties(ties: str) -> None:
    if ties not in TIE_RULES:
        raise ConfigError(f"ties must be one of {TIE_RULES}, got {ties!r}")


def ranking_from_scores(scores: np.ndarray, relevant: np.ndarray | None = None, ties: str = "order") -> np.ndarray:
    """Gallery indices of one query, best first, from its scores [N] (higher is better).

    ``ties="order"``: tied items keep their gallery order; ``"pessimistic"``: among tied items the
    ``relevant`` ones [N] (bool) come last, each group in gallery order.
    """
    _check_ties(ties)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ConfigError(f"scores of one query must be 1-D, got shape {s.shape}")
    if np.isnan(s).any():
        raise ConfigError("scores contain NaN: a NaN has no place in a ranking (check the features)")
    if ties == "order":
        return np.argsort(-s, kind="stable")
    if relevant is None:
        raise ConfigError("ties='pessimistic' needs the relevant items, to put them after the tied others")
    rel = np.asarray(relevant, dtype=bool)
    # lexsort sorts by its last key first and is stable: by score (descending), then irrelevant before
    # relevant, then gallery order.
    return np.lexsort((rel.astype(np.int8), -s))


def _mask(relevant, n: int) -> np.ndarray:
    """A boolean mask [n] from a mask or from a collection of gallery indices."""
    arr = np.asarray(list(relevant) if not isinstance(relevant, np.ndarray) else relevant)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise ConfigError(f"a relevance mask must have one entry per gallery item ({n}), got shape {arr.shape}")
        return arr
    mask = np.zeros(n, dtype=bool)
    if arr.size:
        idx = arr.astype(np.int64)
        if idx.min() < 0 or idx.max() >= n:
            raise ConfigError(f"relevant gallery indices must lie in [0, {n}), got {idx.min()}..{idx.max()}")
        mask[idx] = True
    return mask


def relevant_ranks(scores: np.ndarray, relevant: Sequence, ties: str = "order") -> list[np.ndarray]:
    """Per query, the sorted 1-based ranks of its relevant items, from ``scores`` [Q, N] and ``relevant``
    (per query a boolean mask [N] or a collection of gallery indices); ties broken by ``ties``."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ConfigError(f"scores must be [queries, gallery], got shape {s.shape}")
    if len(relevant) != s.shape[0]:
        raise ConfigError(f"{s.shape[0]} queries but {len(relevant)} sets of relevant items")
    out = []
    for row, rel in zip(s, relevant):
        mask = _mask(rel, s.shape[1])
        order = ranking_from_scores(row, mask, ties)
        out.append(np.flatnonzero(mask[order]) + 1)
    return out


def ranks_in_ranking(ranked_ids: Sequence, relevant_ids: Collection) -> np.ndarray:
    """Sorted 1-based ranks of the relevant ids found in ``ranked_ids`` (best first, its order as given);
    an id listed twice counts at its first place only."""
    relevant, seen, ranks = set(relevant_ids), set(), []
    for i, item in enumerate(ranked_ids, start=1):
        if item in relevant and item not in seen:
            seen.add(item)
            ranks.append(i)
    return np.asarray(ranks, dtype=np.int64)


def _ranks(ranks) -> np.ndarray:
    r = np.sort(np.asarray(ranks, dtype=np.int64).reshape(-1))
    if r.size and (r[0] < 1 or np.any(np.diff(r) == 0)):
        raise ConfigError(f"ranks must be distinct positive positions, got {r.tolist()}")
    return r


def _n_relevant(ranks: np.ndarray, n_relevant: int) -> int:
    if n_relevant < 1:
        raise ConfigError("a query needs at least one relevant item to be scored")
    if n_relevant < ranks.size:
        raise ConfigError(f"{ranks.size} relevant items ranked but only {n_relevant} relevant")
    return int(n_relevant)


def reciprocal_rank(ranks) -> float:
    """1 / the rank of the first relevant item; 0 when none was ranked."""
    r = _ranks(ranks)
    return 1.0 / float(r[0]) if r.size else 0.0


def success_at(ranks, k: int) -> float:
    """ConCon-Chi's R@k: 1 if any relevant item is in the top ``k``, else 0."""
    r = _ranks(ranks)
    return float(bool(r.size) and r[0] <= k)


def average_precision(ranks, n_relevant: int) -> float:
    """Mean over the ``n_relevant`` relevant items of (relevant items up to it) / (its rank); an item
    never ranked adds 0."""
    r = _ranks(ranks)
    n = _n_relevant(r, n_relevant)
    return float(np.sum(np.arange(1, r.size + 1) / r) / n)


def average_precision_at(ranks, n_relevant: int, k: int) -> float:
    """ConCon-Chi's AP@k: the precisions at the relevant items ranked in the top ``k``, summed, over
    min(``n_relevant``, k)."""
    r = _ranks(ranks)
    n = _n_relevant(r, n_relevant)
    if k < 1:
        raise ConfigError(f"k must be positive, got {k}")
    top = r[r <= k]
    return float(np.sum(np.arange(1, top.size + 1) / top) / min(n, k))


def field_metrics(
    per_query_ranks: Sequence, n_relevant: Iterable[int], ks: Sequence[int] = RECALL_KS, map_k: int = MAP_AT_K
) -> dict[str, float]:
    """``mrr``, ``recall@k`` for each of ``ks``, ``map`` and ``map@<map_k>`` of one method, averaged over
    its queries: ``per_query_ranks`` the ranks of each query's relevant items that were ranked,
    ``n_relevant`` how many relevant items each query has (ranked or not)."""
    per_query_ranks, n_relevant = list(per_query_ranks), list(n_relevant)
    if not per_query_ranks:
        raise ConfigError("no queries to score")
    if len(per_query_ranks) != len(n_relevant):
        raise ConfigError(f"{len(per_query_ranks)} queries but {len(n_relevant)} relevant counts")
    out = {"mrr": float(np.mean([reciprocal_rank(r) for r in per_query_ranks]))}
    for k in ks:
        out[f"recall@{k}"] = float(np.mean([success_at(r, k) for r in per_query_ranks]))
    out["map"] = float(np.mean([average_precision(r, n) for r, n in zip(per_query_ranks, n_relevant)]))
    out[f"map@{map_k}"] = float(
        np.mean([average_precision_at(r, n, map_k) for r, n in zip(per_query_ranks, n_relevant)])
    )
    return out


def field_metrics_from_scores(
    scores: np.ndarray, relevant: Sequence, ties: str = "order", ks: Sequence[int] = RECALL_KS, map_k: int = MAP_AT_K
) -> dict[str, float]:
    """`field_metrics` of a score matrix [Q, N] (see `relevant_ranks` for ``relevant`` and ``ties``)."""
    ranks = relevant_ranks(scores, relevant, ties)
    n = np.asarray(scores).shape[1]
    return field_metrics(ranks, [int(_mask(r, n).sum()) for r in relevant], ks, map_k)


def field_metrics_from_rankings(
    ranked_ids: Sequence[Sequence],
    relevant_ids: Sequence[Collection],
    ks: Sequence[int] = RECALL_KS,
    map_k: int = MAP_AT_K,
) -> dict[str, float]:
    """`field_metrics` of ranked id lists (one per query, best first) and each query's relevant ids."""
    if len(ranked_ids) != len(relevant_ids):
        raise ConfigError(f"{len(ranked_ids)} rankings but {len(relevant_ids)} sets of relevant ids")
    ranks = [ranks_in_ranking(ids, rel) for ids, rel in zip(ranked_ids, relevant_ids)]
    return field_metrics(ranks, [len(set(rel)) for rel in relevant_ids], ks, map_k)


def pervl_context_scores(ranked_ids: Sequence[Sequence], ground_truth: Sequence) -> dict[str, float]:
    """PerVL-DeepFashion2's context retrieval numbers as POLAR's ``eval_deepfashion2.py`` prints them
    ("Context: mRR=…, recall@5=…"): percentages rounded to 2 decimals.

    ``ranked_ids``: per query (caption), the gallery ids best first; ``ground_truth``: per query its
    ground-truth id (PerVL has one image per caption) or a collection of ids.
    """
    truth = [[g] if isinstance(g, (str, int, np.integer)) else list(g) for g in ground_truth]
    m = field_metrics_from_rankings(ranked_ids, truth, ks=(5,))
    return {"mRR": round(m["mrr"] * 100, 2), "recall@5": round(m["recall@5"] * 100, 2)}


def format_pervl(scores: dict[str, float]) -> str:
    """`pervl_context_scores` as POLAR's line."""
    return f"Context: mRR={scores['mRR']}, recall@5={scores['recall@5']}"


__all__ = [
    "MAP_AT_K",
    "MAP_AT_KEY",
    "RECALL_KS",
    "TIE_RULES",
    "average_precision",
    "average_precision_at",
    "field_metrics",
    "field_metrics_from_rankings",
    "field_metrics_from_scores",
    "format_pervl",
    "pervl_context_scores",
    "ranking_from_scores",
    "ranks_in_ranking",
    "relevant_ranks",
    "reciprocal_rank",
    "success_at",
]
