"""MRR and recall@k against examples computed by hand; object fidelity on vectors built by hand."""

import pytest
import torch
import torch.nn.functional as F

from factory.evaluation import first_relevant_rank, ranking_metrics
from factory.evaluation.metrics import look_alikes, object_fidelity


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


def test_object_fidelity_cancels_what_the_concept_shares_with_its_look_alikes():
    """A preview that matches the scene every concept's images share scores high plain fidelity but no
    object fidelity; one that matches the object itself scores on both."""
    scene, obj, other = torch.eye(3)
    own = F.normalize(scene + obj, dim=0)
    rival = F.normalize(scene + other, dim=0)
    scene_only = object_fidelity(scene[None], own, rival[None])
    the_object = object_fidelity(F.normalize(obj + scene, dim=0)[None], own, rival[None])
    assert float(scene[None] @ own) > 0.7  # plain fidelity is fooled by the scene
    assert scene_only[0] == pytest.approx(0.0, abs=1e-6) and scene_only[1] == 0.5  # a tie: 1/2
    assert the_object[0] > 0.4 and the_object[1] == 1.0
    assert object_fidelity(scene[None], own, None) is None


def test_look_alikes_are_the_other_concepts_of_the_same_parent():
    protos = {c: torch.full((2,), float(i)) for i, c in enumerate("abc")}
    rivals = look_alikes(protos, {"a": "dress", "b": "dress", "c": "coat"})
    assert rivals["a"].tolist() == [[1.0, 1.0]] and rivals["b"].tolist() == [[0.0, 0.0]] and rivals["c"] is None
