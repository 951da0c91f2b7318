"""The field's retrieval metrics: by hand, and against trec_eval (through ir-measures) on random rankings
with ties, several relevant items per query and relevant items that were never ranked."""

import numpy as np
import pytest

from factory.errors import ConfigError
from factory.evaluation.ir_metrics import (
    MAP_AT_KEY,
    average_precision,
    average_precision_at,
    field_metrics,
    field_metrics_from_rankings,
    field_metrics_from_scores,
    format_pervl,
    pervl_context_scores,
    ranking_from_scores,
    ranks_in_ranking,
    reciprocal_rank,
    relevant_ranks,
    success_at,
)
from factory.evaluation.metrics import ranking_metrics


def test_one_query_by_hand():
    # relevant items at ranks 2, 3 and 7, and a fourth one never ranked
    ranks = [7, 2, 3]
    assert reciprocal_rank(ranks) == 0.5
    assert success_at(ranks, 1) == 0.0 and success_at(ranks, 2) == 1.0
    assert average_precision(ranks, 4) == pytest.approx((1 / 2 + 2 / 3 + 3 / 7) / 4)
    # ConCon-Chi's mAP@k divides by min(#relevant, k), not by #relevant
    assert average_precision_at(ranks, 4, 3) == pytest.approx((1 / 2 + 2 / 3) / 3)
    assert average_precision_at(ranks, 4, 10) == pytest.approx((1 / 2 + 2 / 3 + 3 / 7) / 4)
    assert average_precision_at([], 2, 5) == 0.0 and reciprocal_rank([]) == 0.0


def test_ties_are_broken_by_gallery_order_or_pessimistically():
    scores = np.array([0.5, 0.9, 0.5, 0.5, 0.1])
    relevant = np.array([True, False, False, True, False])
    assert ranking_from_scores(scores).tolist() == [1, 0, 2, 3, 4]
    assert ranking_from_scores(scores, relevant, "pessimistic").tolist() == [1, 2, 0, 3, 4]
    assert [r.tolist() for r in relevant_ranks(scores[None], [relevant])] == [[2, 4]]
    assert [r.tolist() for r in relevant_ranks(scores[None], [[0, 3]], "pessimistic")] == [[3, 4]]
    # deterministic: the same scores always give the same ranking
    assert all(ranking_from_scores(scores).tolist() == [1, 0, 2, 3, 4] for _ in range(5))


def test_ranks_in_a_ranked_list_keep_its_order():
    assert ranks_in_ranking(["x", "a", "y", "b", "a"], {"a", "b", "z"}).tolist() == [2, 4]


def test_first_relevant_metrics_agree_with_the_project_s_ranking_metrics():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, (30, 25)).astype(float)
    relevant = [rng.choice(25, size=rng.integers(1, 4), replace=False) for _ in range(30)]
    ranks = relevant_ranks(scores, relevant)
    field = field_metrics(ranks, [len(r) for r in relevant])
    old = ranking_metrics([int(r[0]) if r.size else None for r in ranks])
    assert field["mrr"] == pytest.approx(old["mrr"])
    for k in (1, 5, 10):
        assert field[f"recall@{k}"] == pytest.approx(old[f"r{k}"])


def test_bad_input_is_refused():
    with pytest.raises(ConfigError, match="ties"):
        ranking_from_scores(np.zeros(3), ties="optimistic")
    with pytest.raises(ConfigError, match="NaN"):
        ranking_from_scores(np.array([0.1, np.nan]))
    with pytest.raises(ConfigError, match="at least one relevant"):
        average_precision([], 0)
    with pytest.raises(ConfigError, match="no queries"):
        field_metrics([], [])
    with pytest.raises(ConfigError, match="indices"):
        relevant_ranks(np.zeros((1, 3)), [[5]])


def _trec(scores, relevant_masks, unranked, ties):
    """trec_eval's per-query numbers (via ir-measures) for the same rankings. trec_eval breaks ties by
    document name, descending: names chosen so that this is gallery order (``order``), or gallery order
    with the relevant items after the tied others (``pessimistic``)."""
    ir_measures = pytest.importorskip("ir_measures")
    from ir_measures import AP, RR, Success

    n = scores.shape[1]
    qrels, run = {}, {}
    for q, (row, rel) in enumerate(zip(scores, relevant_masks)):

        def name(i, rel=rel):
            prefix = "a" if (ties == "pessimistic" and rel[i]) else "b"
            return f"{prefix}{n - i:05d}"

        run[f"q{q}"] = {name(i): float(row[i]) for i in range(n)}
        qrels[f"q{q}"] = {
            **{name(i): 1 for i in np.flatnonzero(rel)},
            **{f"missing{q}-{j}": 1 for j in range(unranked[q])},
        }
    measures = [RR, Success @ 1, Success @ 5, Success @ 10, AP, AP @ 10]
    out = {m: {} for m in measures}
    for row in ir_measures.iter_calc(measures, qrels, run):
        out[row.measure][row.query_id] = row.value
    return [
        {
            "mrr": out[RR][f"q{q}"],
            "recall@1": out[Success @ 1][f"q{q}"],
            "recall@5": out[Success @ 5][f"q{q}"],
            "recall@10": out[Success @ 10][f"q{q}"],
            "map": out[AP][f"q{q}"],
            "ap@10": out[AP @ 10][f"q{q}"],
        }
        for q in range(len(scores))
    ]


@pytest.mark.parametrize("ties", ["order", "pessimistic"])
def test_matches_trec_eval_on_random_rankings_with_ties(ties):
    rng = np.random.default_rng(0 if ties == "order" else 1)
    n_queries, n_items = 60, 40
    scores = rng.integers(0, 6, (n_queries, n_items)).astype(float)  # few distinct values: many ties
    masks = np.zeros((n_queries, n_items), dtype=bool)
    for q in range(n_queries):
        masks[q, rng.choice(n_items, size=rng.integers(1, 14), replace=False)] = True  # up to 13 > k = 10
    unranked = rng.integers(0, 3, n_queries) * (rng.random(n_queries) < 0.3)  # relevant, never ranked
    unranked[0], masks[0] = 2, False  # a query none of whose relevant items is ranked
    ranks = relevant_ranks(scores, list(masks), ties)
    n_rel = masks.sum(1) + unranked
    expected = _trec(scores, masks, unranked, ties)
    for q in range(n_queries):
        mine = field_metrics([ranks[q]], [n_rel[q]], map_k=10)
        for key in ("mrr", "recall@1", "recall@5", "recall@10", "map"):
            assert mine[key] == pytest.approx(expected[q][key], abs=1e-4), (q, key)
        # trec_eval's AP@k divides by #relevant, ConCon-Chi's by min(#relevant, k)
        assert mine["map@10"] == pytest.approx(expected[q]["ap@10"] * n_rel[q] / min(n_rel[q], 10), abs=1e-4), q
    # the means are the means of the per-query numbers
    total = field_metrics(ranks, n_rel, map_k=10)
    assert total["map"] == pytest.approx(np.mean([e["map"] for e in expected]), abs=1e-4)
    assert total["mrr"] == pytest.approx(np.mean([e["mrr"] for e in expected]), abs=1e-4)


def test_scores_rankings_and_ranks_give_the_same_numbers():
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(12, 30))
    relevant = [rng.choice(30, size=rng.integers(1, 5), replace=False) for _ in range(12)]
    from_scores = field_metrics_from_scores(scores, relevant)
    ids = [[f"g{i}" for i in np.argsort(-row, kind="stable")] for row in scores]
    from_ids = field_metrics_from_rankings(ids, [[f"g{i}" for i in rel] for rel in relevant])
    assert from_scores == pytest.approx(from_ids)
    assert set(from_scores) == {"mrr", "recall@1", "recall@5", "recall@10", "map", MAP_AT_KEY}


def test_pervl_adapter_reports_polar_s_context_numbers():
    ranked = [["a", "b", "c", "d", "e", "f"], ["b", "c", "a", "d", "e", "f"], ["f", "e", "d", "c", "b", "a"]]
    truth = ["a", "a", "a"]  # ranks 1, 3, 6
    scores = pervl_context_scores(ranked, truth)
    assert scores == {"mRR": round((1 + 1 / 3 + 1 / 6) / 3 * 100, 2), "recall@5": round(2 / 3 * 100, 2)}
    assert format_pervl(scores) == "Context: mRR=50.0, recall@5=66.67"
    assert pervl_context_scores(ranked, [{"a"}, ["a", "x"], ("a",)]) == scores
