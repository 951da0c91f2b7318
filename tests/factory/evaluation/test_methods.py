"""The evaluation's methods on tiny models: ablation settings, and retrieval wiring that can be checked."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from factory.catalogs.evaluation import EvalCatalog
from factory.evaluation.anchors import ANCHORS
from factory.evaluation.methods import (
    FIXED_METHODS,
    RETRIEVAL_METHODS,
    GairSettings,
    ablation_config,
    retrieval_and_generation,
)
from factory.gair import ConceptToken
from factory.index import create_index
from factory.learner import LearnerConfig
from factory.losses import LossWeights
from schemas import RetrievalQuery


def test_ablations_change_only_losses_and_parametrisation():
    base = LearnerConfig(steps=77, lr=0.02, seed=5, weights=LossWeights(ti=1.0, ce=0.5, image_ce=1.0))
    expect = {
        "ti": ((1.0, 0.0, 0.0), "free"),
        "ce": ((0.0, 0.5, 1.0), "projected"),
        "ti_ce_free": ((1.0, 0.5, 1.0), "free"),
        "ti_ce_proj": ((1.0, 0.5, 1.0), "projected"),
    }
    for method, (weights, param) in expect.items():
        cfg = ablation_config(base, method)
        assert (cfg.weights.ti, cfg.weights.ce, cfg.weights.image_ce) == weights
        assert cfg.parametrization == param
        assert (cfg.steps, cfg.lr, cfg.seed) == (77, 0.02, 5)
    assert base.weights.ce == 0.5  # the base is not modified


def test_schedule_must_contain_alpha_one():
    with pytest.raises(ValueError, match="1.0"):
        GairSettings(alphas=(0.0, 0.5))


def test_token_intent_finds_a_gallery_built_from_its_own_queries(hf_backbone):
    # The gallery holds exactly the token_intent query features (plus noise items), so that method must
    # rank every target first; the words-only query cannot tell the two dresses apart.
    g = torch.Generator().manual_seed(0)
    dim = hf_backbone.encode_prompts(["a"]).features.shape[-1]
    concepts = {
        c: ConceptToken(
            hf_backbone.word_embedding(w) + 0.05 * torch.randn(32, generator=g),
            "dress",
            F.normalize(torch.randn(dim, generator=g), dim=0),
        )
        for c, w in (("sku-1", "red"), ("sku-2", "blue"))
    }
    for c, other in (("sku-1", "sku-2"), ("sku-2", "sku-1")):  # each is the other's look-alike
        concepts[c].rivals = concepts[other].prototype[None]
    intents = ["on the beach", "in the snow"]
    queries = [
        RetrievalQuery(
            query_id=f"q{i}",
            concept_id=c,
            parent="dress",
            template=f"a photo of {{concept}} {it}",
            intent=it,
            relevant=[f"{c}-{i}"],
        )
        for i, (c, it) in enumerate([(c, it) for c in concepts for it in intents])
    ]
    tokens = {c: t.vector for c, t in concepts.items()}
    feats = (
        F.normalize(
            hf_backbone.encode_prompts(
                [q.text(f"a <concept:{q.concept_id}> dress") for q in queries], tokens
            ).features.float(),
            dim=-1,
        )
        .detach()
        .numpy()
    )
    index = create_index("exact", dim)
    noise = np.random.default_rng(0).standard_normal((20, dim)).astype(np.float32)
    index.add(np.concatenate([feats, noise]), [q.relevant[0] for q in queries] + [f"n{i}" for i in range(20)])
    out = retrieval_and_generation(
        hf_backbone,
        EvalCatalog("t", [], queries, []),
        index,
        concepts,
        GairSettings(alphas=(0.0, 1.0), previews=2, steps=2),
        progress=False,
    )
    assert out.retrieval["token_intent"] == {
        "mrr": 1.0,
        "r1": 1.0,
        "r5": 1.0,
        "r10": 1.0,
        "recall@1": 1.0,
        "recall@5": 1.0,
        "recall@10": 1.0,
        "map": 1.0,
        "map@50": 1.0,
        "n_queries": 4,
    }
    # previews of the chosen α and α = 1 only (the default): the previews rule has nothing to decide on
    assert set(out.retrieval) == set(RETRIEVAL_METHODS) - {"gair_previews", *ANCHORS}  # no anchors given
    # the oracle picks each query's best fixed α: no fixed α beats it, and fixed_1 is token_intent itself
    assert all(out.retrieval["oracle_alpha"]["mrr"] >= out.retrieval[m]["mrr"] for m in FIXED_METHODS)
    assert out.retrieval["fixed_1"] == out.retrieval["token_intent"]
    # fixed_<α> is GAIR's own query at α: choosing among a subset of FIXED_ALPHAS, GAIR never beats the
    # per-query oracle on any query, whatever rule or bisection it uses among those α
    rr = out.per_query["reciprocal_rank"]
    for m in ("gair_auto", "gair_object", "gair_retrieval_m0", "gair_retrieval_minf"):
        assert all(g <= o + 1e-12 for g, o in zip(rr[m], rr["oracle_alpha"])), m
    assert out.summary["best_fixed"] in FIXED_METHODS
    assert sum(out.alphas.values()) == 4 and set(out.alphas) <= {"0", "1"}
    for m in ("token_intent", "gair_auto"):
        assert out.generation[m]["n_previews"] == 8 and 0.0 <= out.generation[m]["intent_accuracy"] <= 1.0
        assert out.generation[m]["chance"] == 0.5
        assert out.generation[m]["n_object_queries"] == 4 and 0.0 <= out.generation[m]["identity_accuracy"] <= 1.0
        assert -2.0 <= out.generation[m]["object_fidelity"] <= 2.0
    every = retrieval_and_generation(
        hf_backbone,
        EvalCatalog("t", [], queries, []),
        index,
        concepts,
        GairSettings(alphas=(0.0, 1.0), previews=2, steps=2, previews_for="every"),
        progress=False,
    )
    assert set(every.retrieval) == set(RETRIEVAL_METHODS) - set(ANCHORS)
    # rendering more α changes what is shown, never what the retrieval rule decides
    for m in ("gair_auto", "gair_object", "gair_bisect2", "token_intent"):
        assert every.retrieval[m] == out.retrieval[m]
    # α = 1 from the same noise; the image features of its previews come from a forward pass of another
    # batch size (every α's previews at once), which moves them by float rounding (~5e-9) on some CPUs
    assert every.generation["token_intent"] == pytest.approx(out.generation["token_intent"], rel=1e-6, abs=1e-7)


def test_settings_refuse_the_previews_rule_without_every_alphas_previews():
    with pytest.raises(ValueError, match="previews_for"):
        GairSettings(rule="previews")
    assert GairSettings(rule="previews", previews_for="every").rule == "previews"
