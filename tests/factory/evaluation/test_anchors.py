"""The evaluation's anchors (POLAR's value update, PALAVRA's fine-tuned token) on the tiny backbones: the
update is the value-matrix update it claims to be, each anchor learns its concepts, and the evaluation
reports their rows."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from factory.catalogs.evaluation import EvalCatalog
from factory.errors import ConfigError
from factory.evaluation.anchors import (
    POLAR_MARKER_ID,
    AnchorSettings,
    PalavraSettings,
    PolarAnchor,
    PolarSettings,
    anchor_accuracy,
    fixed_word_vector,
    learn_anchors,
    learn_palavra,
    learn_polar,
    nt_xent,
)
from factory.evaluation.ir_metrics import MAP_AT_K, MAP_AT_KEY
from factory.evaluation.metrics import heldout_accuracy
from factory.learner import ConceptData
from factory.tokens import marker
from factory.tokens.prompts import template_prompts

FIELD_KEYS = {"mrr", "recall@1", "recall@5", "recall@10", "map", MAP_AT_KEY}


def _world(backbone, k=4, shots=3, heldout=4, seed=0):
    """K concepts of one parent, each a cluster of image features around its own direction."""
    g = torch.Generator().manual_seed(seed)
    dim = backbone.encode_prompts(["a"]).features.shape[-1]
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=-1)
    noise = lambda n: 0.3 * torch.randn(n, dim, generator=g) / dim**0.5  # noqa: E731
    data = [ConceptData(f"c{i}", "dress", centres[i] + noise(shots)) for i in range(k)]
    held = {f"c{i}": centres[i] + noise(heldout) for i in range(k)}
    return data, held


def _value_weight(backbone):
    """The last text layer's value projection weight, as a view that can be edited in place."""
    if hasattr(backbone.clip, "text_model"):
        return backbone.clip.text_model.encoder.layers[-1].self_attn.v_proj.weight
    return backbone.clip.transformer.resblocks[-1].attn.in_proj_weight[2 * backbone.token_dim :]


def test_polar_is_a_rank_one_update_of_the_last_value_matrix(backbone):
    """POLAR's features equal the backbone's own forward pass with W_v + u vᵀ (and without, for u = 0)."""
    w, g = backbone.token_dim, torch.Generator().manual_seed(1)
    word = fixed_word_vector(backbone, "sks")
    u, v = torch.randn(w, generator=g), F.normalize(torch.randn(w, generator=g), dim=0)
    anchor = PolarAnchor("polar", u={"a": torch.zeros(w), "b": u}, v={"a": v, "b": v}, word_vector=word)
    prompts = [f"a photo of a {marker(POLAR_MARKER_ID)} dress", f"a {marker(POLAR_MARKER_ID)} dress in the snow"]
    got = anchor.text_features(backbone, prompts, ["a", "b"])
    tokens = {POLAR_MARKER_ID: word}
    plain = F.normalize(backbone.encode_prompts(prompts[:1], tokens).features.float(), dim=-1)
    weight = _value_weight(backbone)
    with torch.no_grad():
        before = weight.clone()
        weight += torch.outer(u, v)
        try:
            updated = F.normalize(backbone.encode_prompts(prompts[1:], tokens).features.float(), dim=-1)
        finally:
            weight.copy_(before)
    torch.testing.assert_close(got[0], plain[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], updated[0], atol=1e-5, rtol=0)
    unchanged = F.normalize(backbone.encode_prompts(prompts[1:], tokens).features.float(), dim=-1)
    assert (updated - unchanged).norm() > 1e-2  # the update does change the feature


def test_the_fixed_word_is_the_word_where_the_vocabulary_has_it(hf_backbone):
    torch.testing.assert_close(fixed_word_vector(hf_backbone, "sks"), hf_backbone.word_embedding("sks"))
    # a word the vocabulary lacks: one fixed pseudo-word at the vocabulary's mean norm, the same every time
    from factory.backbones import load_backbone

    trimmed = load_backbone("fashion-mini")
    a, b = fixed_word_vector(trimmed, "sks"), fixed_word_vector(trimmed, "sks")
    assert torch.equal(a, b) and float(a.norm()) == pytest.approx(trimmed.vocab_mean_norm, rel=1e-5)


@pytest.fixture(scope="module")
def learned(hf_backbone):
    data, held = _world(hf_backbone)
    return data, held, learn_anchors(hf_backbone, data)


def test_each_anchor_learns_its_concepts_better_than_the_parent_word(hf_backbone, learned):
    data, held, anchors = learned
    pairs = [(d.concept_id, d.parent) for d in data]
    parent, _ = heldout_accuracy(hf_backbone, pairs, held, lambda c, p: template_prompts("", p))
    assert parent <= 0.35  # the parent word stands for every concept alike: about chance (1/4)
    for name, anchor in anchors.items():
        acc, per_concept = anchor_accuracy(hf_backbone, anchor, pairs, held)
        assert acc >= 0.75 and acc > parent + 0.3, (name, acc, parent)
        assert set(per_concept) == {d.concept_id for d in data}


def test_shapes_and_seconds(hf_backbone, learned):
    data, _, anchors = learned
    polar, palavra = anchors["polar"], anchors["palavra_ft"]
    w = hf_backbone.token_dim
    assert polar.tokens is None and set(polar.u) == set(polar.v) == {d.concept_id for d in data}
    for c in polar.u:
        assert polar.u[c].shape == (w,) and polar.v[c].shape == (w,)
        assert float(polar.v[c].norm()) == pytest.approx(1.0, abs=1e-5) and float(polar.u[c].norm()) > 0
    assert set(palavra.tokens) == {d.concept_id for d in data} and all(t.shape == (w,) for t in palavra.tokens.values())
    for a in anchors.values():
        assert a.seconds > 0 and a.n_concepts == len(data)
        assert a.seconds_per_concept == pytest.approx(a.seconds / len(data))
        assert a.summary()["has_token"] == (a.tokens is not None)
    assert polar.settings["steps"] == 500 and polar.settings["reg"] == 0.1 and polar.settings["lr"] == 1e-3
    assert palavra.settings["temperature"] == 0.25


def test_polar_is_deterministic_and_does_not_depend_on_its_batch(hf_backbone):
    data, _ = _world(hf_backbone, k=3, shots=2)
    s = PolarSettings(steps=40)
    a, b = learn_polar(hf_backbone, data, s), learn_polar(hf_backbone, data, s)
    alone = learn_polar(hf_backbone, data[1:2], s)  # one concept alone learns what it learns in the batch
    other_seed = learn_polar(hf_backbone, data, PolarSettings(steps=40, seed=7))
    for c in a.u:
        assert torch.equal(a.u[c], b.u[c]) and torch.equal(a.v[c], b.v[c])
    torch.testing.assert_close(alone.u["c1"], a.u["c1"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone.v["c1"], a.v["c1"], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(other_seed.v["c0"], a.v["c0"])


def test_palavra_is_deterministic_and_starts_from_the_parent_word(hf_backbone):
    data, _ = _world(hf_backbone, k=3, shots=2)
    s = PalavraSettings(steps=5)
    a, b = learn_palavra(hf_backbone, data, s), learn_palavra(hf_backbone, data, s)
    assert all(torch.equal(a.tokens[c], b.tokens[c]) for c in a.tokens)
    parent = hf_backbone.word_embedding("dress")
    untouched = learn_palavra(hf_backbone, data, PalavraSettings(steps=0))
    assert all(torch.equal(t, parent) for t in untouched.tokens.values())
    assert all(not torch.allclose(t, parent) for t in a.tokens.values())
    # one concept has no negative: NT-Xent is constant, the token stays the parent word
    assert torch.equal(learn_palavra(hf_backbone, data[:1], s).tokens["c0"], parent)


def test_nt_xent_is_palavra_s_contrastive_loss():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    t = 0.25
    v1, v2 = F.normalize(a, dim=1), F.normalize(b, dim=1)  # PALAVRA's formula, written out
    numerator = torch.exp(torch.diag(v1 @ v2.T) / t).repeat(2)
    z = torch.cat([v1, v2])
    pairs = torch.exp(z @ z.T / t)
    denominator = (pairs - pairs * torch.eye(6)).sum(0)
    torch.testing.assert_close(nt_xent(a, b, t), -torch.log(numerator / denominator).mean())


def test_a_token_anchor_scores_like_the_token_methods(hf_backbone, learned):
    data, held, anchors = learned
    pairs = [(d.concept_id, d.parent) for d in data]
    palavra = anchors["palavra_ft"]
    mine = anchor_accuracy(hf_backbone, palavra, pairs, held)
    theirs = heldout_accuracy(hf_backbone, pairs, held, lambda c, p: template_prompts(marker(c), p), palavra.tokens)
    assert mine[0] == pytest.approx(theirs[0]) and mine[1] == pytest.approx(theirs[1])


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="unknown anchor"):
        AnchorSettings(methods=("polar", "dreambooth"))
    with pytest.raises(ConfigError, match="one word"):
        PolarSettings(word="two words")
    with pytest.raises(ConfigError, match="temperature"):
        PalavraSettings(temperature=0.0)
    assert AnchorSettings(polar={"steps": 3}).polar.steps == 3


def test_retrieval_and_classification_report_the_anchor_rows(hf_backbone, learned):
    """Every retrieval method, the anchors included, reports the field's metrics beside its old keys, and
    classification reports the anchors with their seconds per concept."""
    from factory.evaluation.methods import RETRIEVAL_METHODS, GairSettings, classification, retrieval_and_generation
    from factory.gair import ConceptToken
    from factory.index import create_index
    from schemas import RetrievalQuery

    data, held, anchors = learned
    dim = hf_backbone.encode_prompts(["a"]).features.shape[-1]
    intents = ["on the beach", "in the snow"]
    queries = [
        RetrievalQuery(
            query_id=f"q{i}",
            concept_id=d.concept_id,
            parent="dress",
            intent=it,
            template=f"a photo of {{concept}} {it}",
            relevant=[f"{d.concept_id}-{j}" for j in range(2)],
        )
        for i, (d, it) in enumerate([(d, it) for d in data[:2] for it in intents])
    ]
    # the gallery: each concept's held-out images are its items, plus noise
    index = create_index("exact", dim)
    rng = np.random.default_rng(0)
    feats = [held[d.concept_id][j].numpy() for d in data[:2] for j in range(2)]
    index.add(
        np.concatenate([np.stack(feats), rng.standard_normal((10, dim))]).astype(np.float32),
        [f"{d.concept_id}-{j}" for d in data[:2] for j in range(2)] + [f"n{i}" for i in range(10)],
    )
    g = torch.Generator().manual_seed(0)
    concepts = {
        d.concept_id: ConceptToken(
            hf_backbone.word_embedding("red") + 0.05 * torch.randn(32, generator=g),
            "dress",
            F.normalize(d.image_features.float().mean(0), dim=0),
        )
        for d in data[:2]
    }
    out = retrieval_and_generation(
        hf_backbone,
        EvalCatalog("t", [], queries, []),
        index,
        concepts,
        GairSettings(alphas=(0.0, 1.0), previews=1, steps=1),
        progress=False,
        anchors=anchors,
    )
    assert set(out.retrieval) == set(RETRIEVAL_METHODS) - {"gair_previews"}
    for m, row in out.retrieval.items():
        assert FIELD_KEYS <= set(row) and row["n_queries"] == 4, m
        # the field's mRR and R@k come from the same first ranks as the per-query reciprocal ranks and r<k>
        assert (
            row["mrr"] == pytest.approx(np.mean(out.per_query["reciprocal_rank"][m])) and row["recall@5"] == row["r5"]
        )
        assert 0.0 < row["map"] <= 1.0 and row["map"] <= row[MAP_AT_KEY] + 1e-12  # 14 items < 50: map@50 = map
    for name in anchors:
        assert out.retrieval[name]["seconds_per_concept"] == anchors[name].seconds_per_concept
        assert len(out.per_query["reciprocal_rank"][name]) == 4
    # learned on the concepts' own images, both anchors find them: better than the parent word's query
    assert out.retrieval["polar"]["mrr"] > out.retrieval["words"]["mrr"]
    assert out.retrieval["palavra_ft"]["mrr"] > out.retrieval["words"]["mrr"]

    pairs = [(d.concept_id, d.parent) for d in data]
    cls = classification(hf_backbone, pairs, held, {}, {}, anchors)
    assert {"parent_word", "polar", "palavra_ft"} == set(cls)
    assert cls["polar"]["seconds_per_concept"] == anchors["polar"].seconds_per_concept
    assert cls["polar"]["accuracy"] > cls["parent_word"]["accuracy"]


def test_the_evaluation_reports_the_anchors(tmp_path, make_token):
    """`evaluate` on a 4-product world catalog (stub ablation tokens, random gallery vectors: only the wiring
    is under test) reports both anchors in classification and retrieval, their seconds, and the report."""
    from factory.backbones import load_backbone
    from factory.catalogs import read_eval_catalog
    from factory.evaluation.harness import EvaluationConfig, evaluate
    from factory.evaluation.methods import GairSettings
    from factory.evaluation.report import markdown
    from factory.index import create_index
    from factory.world import write_catalog

    backbone = load_backbone("tiny-hf-clip")
    write_catalog(str(tmp_path / "cat"), seed=2, products=4, shots=2, heldout=2, contexts=2, distractors=4)
    catalog = read_eval_catalog(str(tmp_path / "cat"))
    w, dim = backbone.token_dim, backbone.encode_prompts(["a"]).features.shape[-1]
    g = torch.Generator().manual_seed(0)
    records = [
        make_token(
            s.concept_id,
            dim=w,
            parent=s.parent,
            vector=torch.randn(w, generator=g).tolist(),
            coefficients=None,
            basis_id=None,
            parametrization="free",
        )
        for s in catalog.concepts
    ]
    items = sorted({r for q in catalog.queries for r in q.relevant}) + [f"noise-{i}" for i in range(6)]
    index = create_index("exact", dim)
    index.add(np.random.default_rng(0).standard_normal((len(items), dim)).astype(np.float32), items)

    def stub_ablations(chunks, base, methods):  # ablation tokens are not under test: random, at once
        ids = [c.concept_id for chunk in chunks for c in chunk]
        return lambda: {m: ({c: torch.randn(w, generator=g) for c in ids}, 0.01) for m in methods}

    config = EvaluationConfig(
        gair=GairSettings(alphas=(0.0, 1.0), previews=1, steps=1),
        max_queries=2,
        generation_queries=1,
        anchors=AnchorSettings(polar=PolarSettings(steps=50), palavra_ft=PalavraSettings(steps=5)),
    )
    m = evaluate(backbone, catalog, records, index, config, progress=False, ablations=stub_ablations).metrics
    for name in ("polar", "palavra_ft"):
        assert 0.0 <= m["classification"][name]["accuracy"] <= 1.0 and m["classification"][name]["n_images"] == 8
        row = m["retrieval"][name]
        assert FIELD_KEYS <= set(row) and row["n_queries"] == 2 and 0.0 < row["mrr"] <= 1.0
        assert m["anchors"][name]["n_concepts"] == 4 and m["anchors"][name]["seconds_per_concept"] > 0
        assert m["stage_seconds"][f"learn_{name}"] > 0
    assert all(FIELD_KEYS <= set(row) for row in m["retrieval"].values())
    assert m["anchors"]["polar"]["has_token"] is False and "polar" not in m["generation"]  # no token: no row
    assert m["generation"]["palavra_ft"]["token_norm"] > 0
    assert m["targets"]["gair_mrr_gain"]["best_other"] not in ("polar", "palavra_ft")
    report = markdown(m)
    assert "| polar |" in report and "| palavra_ft |" in report and "none: no token" in report
    assert f"mAP@{MAP_AT_K} |" in report
