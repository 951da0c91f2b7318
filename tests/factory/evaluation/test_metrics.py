"""MRR and recall@k against examples computed by hand."""
import pytest

from factory.evaluation import first_relevant_rank, ranking_metrics


def test_first_relevant_rank_is_one_based_and_none_when_absent():
    assert first_relevant_rank(["a", "b", "c"], {"b", "c"}) == 2
    assert first_relevant_rank(["a", "b"], {"a"}) == 1
    assert first_relevant_rank(["a", "b"], {"z"}) is None


def test_mrr_and_recall_by_hand():
    # ranks 1, 2, 4, 7, 12 and one query whose target was never ranked
    m = ranking_metrics([1, 2, 4, 7, 12, None])
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 7 + 1 / 12 + 0) / 6)
    assert m["r1"] == pytest.approx(1 / 6)
    assert m["r5"] == pytest.approx(3 / 6)
    assert m["r10"] == pytest.approx(4 / 6)


def test_ranking_metrics_needs_queries():
    with pytest.raises(ValueError, match="no queries"):
        ranking_metrics([])


def test_a_k_way_tie_counts_one_kth():
    import torch

    from factory.evaluation.metrics import tie_aware_hits

    scores = torch.tensor([[0.5, 0.5, 0.5], [0.9, 0.1, 0.2], [0.1, 0.9, 0.9]])
    torch.testing.assert_close(tie_aware_hits(scores, 0), torch.tensor([1 / 3, 1.0, 0.0]))
    torch.testing.assert_close(tie_aware_hits(scores, 2), torch.tensor([1 / 3, 0.0, 0.5]))
