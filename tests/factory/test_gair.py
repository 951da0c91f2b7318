"""GAIR on tiny random models: a well-formed trace, deterministic for a seed, manual mode, bad requests,
and the price a request states against the UNet passes it really makes."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from factory.errors import UnknownConceptMarker
from factory.gair import ConceptToken, Gair, GairRequest, GairStep, bisection_alphas, choose_alpha, prompts_for
from factory.index import create_index


def _req(concept_ids, intent, **options) -> GairRequest:
    return GairRequest(concept_ids=concept_ids, intent=intent, **options)


@pytest.fixture(scope="module")
def gair(hf_backbone):
    g = torch.Generator().manual_seed(0)
    dim = hf_backbone.encode_prompts(["a"]).features.shape[-1]
    concepts = {
        "sku-1": ConceptToken(
            hf_backbone.word_embedding("red") + 0.01 * torch.randn(32, generator=g),
            "dress",
            F.normalize(torch.randn(dim, generator=g), dim=0),
        ),
        "sku-2": ConceptToken(
            hf_backbone.word_embedding("blue"), "coat", F.normalize(torch.randn(dim, generator=g), dim=0)
        ),
    }
    index = create_index("exact", dim)
    vecs = np.random.default_rng(0).standard_normal((50, dim)).astype(np.float32)
    index.add(vecs, [f"g{i}" for i in range(50)], [f"s3://gallery/g{i}.png" for i in range(50)])
    return Gair(hf_backbone, concepts, index)


def test_trace_is_well_formed(gair):
    res = gair(_req(["sku-1"], "on the beach", top_k=5, alphas=[0.0, 0.5, 1.0], previews=2, steps=2))
    assert [s.alpha for s in res.steps] == [0.0, 0.5, 1.0]
    assert res.alpha in (0.0, 0.5, 1.0)
    for s in res.steps:
        assert s.previews.shape == (2, 16, 16, 3) and s.previews.dtype == np.uint8
        assert np.isfinite([s.fidelity, s.intent, s.score, s.retrieved_fidelity, s.retrieved_intent]).all()
        assert len(s.retrieved) == 5
    admitted = [s for s in res.steps if s.admitted]
    assert max(s.score for s in admitted) == next(s.score for s in res.steps if s.alpha == res.alpha)
    assert len(res.ranking) == 5 and res.ranking[0][1].startswith("s3://gallery/")
    assert [r[2] for r in res.ranking] == sorted((r[2] for r in res.ranking), reverse=True)
    assert np.isclose(np.linalg.norm(res.query), 1.0, atol=1e-5)


def test_same_seed_same_result(gair):
    req = _req(["sku-1", "sku-2"], "in the snow", alphas=[0.25, 0.75], previews=1, steps=2, seed=3)
    a, b = gair(req), gair(req)
    assert a.alpha == b.alpha and a.ranking == b.ranking
    assert all(np.array_equal(x.previews, y.previews) for x, y in zip(a.steps, b.steps))


def test_manual_mode_uses_the_given_alpha(gair):
    res = gair(_req(["sku-1"], "on the grass", mode="manual", alpha=0.3, previews=1, steps=2))
    assert res.alpha == 0.3 and [s.alpha for s in res.steps] == [0.3]


def test_query_expansion_changes_the_query(gair):
    base = _req(["sku-1"], "on the grass", mode="manual", alpha=0.5, previews=1, steps=2)
    expanded = _req(["sku-1"], "on the grass", mode="manual", alpha=0.5, previews=1, steps=2, expand=1.0)
    assert not np.allclose(gair(base).query, gair(expanded).query)


def test_bad_requests(gair):
    with pytest.raises(UnknownConceptMarker, match="ghost"):
        gair(_req(["ghost"], "on the beach", previews=1, steps=1))
    with pytest.raises(ValueError, match="plain words") as e:
        _req(["sku-1"], "on the <concept:sku-2> beach")
    assert e.value.errors()[0]["type"] == "malformed_marker"  # the HTTP API answers with this code
    with pytest.raises(ValueError, match="alpha"):
        _req(["sku-1"], "x", mode="manual")
    with pytest.raises(ValueError, match="alphas"):
        _req(["sku-1"], "x", alphas=[1.5])


def test_prompts_pair_tokens_with_parents():
    tok, words = prompts_for(["a1", "b2"], ["dress", "coat"], "on the beach")
    assert tok == "a photo of a <concept:a1> dress and a <concept:b2> coat on the beach"
    assert words == "a photo of a dress and a coat on the beach"


def test_prompts_fill_a_template_slot():
    tok, words = prompts_for(["a1"], ["skirt"], "ignored", template="a person wearing {concept} on a bench")
    assert tok == "a person wearing a <concept:a1> skirt on a bench"
    assert words == "a person wearing a skirt on a bench"
    with pytest.raises(ValueError, match="slot"):
        _req(["sku-1"], "x", template="no slot here")
    with pytest.raises(ValueError, match="slot"):
        _req(["sku-1"], "x", template="{concept} and <concept:sku-2>")


def test_every_alpha_starts_from_the_same_noise(gair):
    # Two equal α values must give identical previews: only the conditioning may differ between steps.
    res = gair(_req(["sku-1"], "on the beach", alphas=[0.5, 0.5, 1.0], previews=2, steps=2, seed=5))
    assert np.array_equal(res.steps[0].previews, res.steps[1].previews)
    assert not np.array_equal(res.steps[0].previews[0], res.steps[0].previews[1])  # previews still differ
    assert res.steps[0].features.shape[0] == 2


def test_the_previews_rule_balances_min_max_scores(gair):
    res = gair(_req(["sku-1"], "on the beach", alphas=[0.0, 0.5, 1.0], previews=1, steps=2, rule="previews"))
    assert all(0.0 <= s.score <= 1.0 and s.admitted for s in res.steps)
    assert max(s.score for s in res.steps) == next(s.score for s in res.steps if s.alpha == res.alpha)


def test_each_alpha_retrieves_with_the_balance_of_its_previews(gair, hf_backbone):
    """q(α) is made of the same two prompts and weights as the previews' conditioning, and the ranking
    returned is what the chosen q(α) retrieves."""
    req = _req(["sku-1"], "on the beach", top_k=3, alphas=[0.0, 0.4, 1.0], previews=1, steps=2)
    res = gair(req)
    tok_prompt, _ = prompts_for(["sku-1"], ["dress"], "on the beach")
    c = gair.concepts["sku-1"]
    f_tok = hf_backbone.encode_prompts([tok_prompt], {"sku-1": c.vector}).features[0]
    f_aligned = hf_backbone.encode_prompts([tok_prompt], {"sku-1": hf_backbone.word_embedding("dress")}).features[0]
    for s in res.steps:
        expected = F.normalize(s.alpha * f_tok + (1 - s.alpha) * f_aligned, dim=0).numpy()
        np.testing.assert_allclose(s.query, expected, atol=1e-5)
        assert [i for i, _, _ in s.retrieved] == gair.index.search(s.query[None], 3).ids[0]
    chosen = next(s for s in res.steps if s.alpha == res.alpha)
    assert res.ranking == chosen.retrieved and np.allclose(res.query, chosen.query)


def _step(alpha, fid, inten):
    return GairStep(
        alpha=alpha,
        fidelity=0.0,
        intent=0.0,
        previews=np.zeros((1, 2, 2, 3), np.uint8),
        retrieved_fidelity=fid,
        retrieved_intent=inten,
    )


def test_the_retrieval_rule_takes_the_most_concept_like_top_item_that_still_matches_the_intent():
    steps = [_step(0.0, 0.50, 0.30), _step(0.5, 0.70, 0.29), _step(1.0, 0.90, 0.20)]
    best, _, admitted = choose_alpha(steps, "retrieval", intent_margin=0.02)
    assert steps[best].alpha == 0.5
    assert admitted.tolist() == [True, True, False]
    assert all(s.score == 0.0 and s.admitted for s in steps)  # pure: the steps themselves are unchanged
    assert steps[choose_alpha(steps, "retrieval", intent_margin=0.2)[0]].alpha == 1.0  # a wide margin: concept wins
    assert steps[choose_alpha(steps, "retrieval", intent_margin=0.0)[0]].alpha == 0.0  # no margin: intent wins


def test_the_retrieval_rule_is_absolute_not_relative_to_the_schedule():
    """Min-max scores always crown some α; absolute evidence keeps the words when no α's top item is
    more like the concept than the words' own top item."""
    steps = [_step(0.0, 0.60, 0.30), _step(0.5, 0.60, 0.25), _step(1.0, 0.55, 0.31)]
    assert steps[choose_alpha(steps, "retrieval", intent_margin=0.02)[0]].alpha == 0.0


def test_an_empty_gallery_still_answers(hf_backbone, gair):
    empty = Gair(hf_backbone, gair.concepts, create_index("exact", gair.index.dim))
    res = empty(_req(["sku-1"], "on the beach", alphas=[0.0, 1.0], previews=1, steps=1))
    assert res.ranking == [] and res.alpha == 1.0 and all(s.retrieved == [] for s in res.steps)


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="rule"):
        _req(["sku-1"], "x", rule="vibes")
    with pytest.raises(ValueError, match="intent_margin"):
        _req(["sku-1"], "x", intent_margin=-0.1)


def test_chosen_previews_render_only_the_kept_alpha_and_decide_the_same(gair):
    """The retrieval rule decides without previews: rendering only the chosen α keeps its choice, its
    ranking and, from the same noise, that α's very previews."""
    every = gair(_req(["sku-1"], "on the beach", alphas=[0.0, 0.5, 1.0], previews=2, steps=2, seed=4))
    chosen = gair(
        _req(["sku-1"], "on the beach", alphas=[0.0, 0.5, 1.0], previews=2, steps=2, seed=4, previews_for="chosen")
    )
    assert chosen.alpha == every.alpha and chosen.ranking == every.ranking
    for a, b in zip(every.steps, chosen.steps):
        if b.alpha == chosen.alpha:
            assert np.array_equal(a.previews, b.previews) and np.isfinite([b.fidelity, b.intent]).all()
        else:
            assert len(b.previews) == 0 and b.features is None and np.isnan([b.fidelity, b.intent]).all()
            assert b.retrieved == a.retrieved and b.retrieved_fidelity == a.retrieved_fidelity


def test_no_previews_is_retrieval_alone(gair):
    res = gair(_req(["sku-1"], "on the beach", alphas=[0.0, 1.0], previews=0, steps=2))
    assert all(len(s.previews) == 0 for s in res.steps) and len(res.ranking) == 10


def test_bisection_takes_the_midpoints_beside_the_best_alpha():
    assert bisection_alphas([0.0, 0.25, 0.5, 0.75, 1.0], 0.5) == [0.375, 0.625]
    assert bisection_alphas([0.0, 0.25, 0.5, 0.75, 1.0], 1.0) == [0.875]  # an end has one neighbour
    assert bisection_alphas([0.0, 0.5, 0.75, 1.0], 0.0) == [0.25]
    assert bisection_alphas([1.0], 1.0) == []


def test_refinement_searches_around_the_kept_alpha_and_keeps_the_best(gair):
    base = _req(["sku-1"], "on the beach", alphas=[0.0, 0.5, 1.0], previews=1, steps=2, seed=2)
    plain = gair(base)
    refined = gair(dataclasses.replace(base, refine=2))
    searched = [s.alpha for s in refined.steps]
    assert searched == sorted(searched) and len(searched) > 3 and {0.0, 0.5, 1.0} <= set(searched)
    assert all(len(s.previews) == 1 for s in refined.steps)  # previews_for="every": each new α rendered
    first_new = bisection_alphas([0.0, 0.5, 1.0], plain.alpha)
    assert set(first_new) <= set(searched)
    best, _, _ = choose_alpha(refined.steps, "retrieval", base.intent_margin)
    assert refined.alpha == refined.steps[best].alpha  # the kept α is the best of everything searched
    assert refined.steps[best].retrieved_fidelity >= max(s.retrieved_fidelity for s in plain.steps) - 1e-9


def test_bad_refinement_and_preview_settings_are_refused():
    with pytest.raises(ValueError, match="refine"):
        _req(["sku-1"], "x", refine=99)
    with pytest.raises(ValueError, match="previews_for"):
        _req(["sku-1"], "x", previews_for="some")
    with pytest.raises(ValueError, match="previews rule"):
        _req(["sku-1"], "x", rule="previews", previews_for="chosen")


@pytest.fixture
def unet_images(gair, monkeypatch):
    """Counts the images the UNet is evaluated on (a batch of n is n passes), summed over its calls."""
    unet, seen = gair.backbone.generator.unet, []
    forward = unet.forward

    def counting(x, *args, **kwargs):
        seen.append(x.shape[0])
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", counting)
    return seen


def _keep(monkeypatch, target: float):
    """Make ``auto`` keep the α nearest ``target``, whatever the evidence: at 0.5 each bisection round has two
    neighbours and adds two α (the most a round can cost), at 1.0 it has one."""
    import factory.gair

    def nearest(steps, rule="retrieval", intent_margin=0.0):
        best = min(range(len(steps)), key=lambda i: abs(steps[i].alpha - target))
        return best, np.zeros(len(steps)), np.ones(len(steps), bool)

    monkeypatch.setattr(factory.gair, "choose_alpha", nearest)


@pytest.mark.parametrize(
    "options",
    [
        dict(alphas=[0.0, 0.5, 1.0], previews=2, steps=2),  # every α: 3 x 2 images x 2 steps x 2 (guidance)
        dict(alphas=[0.0, 0.5, 1.0], previews=2, steps=3, previews_for="chosen"),  # the kept α alone
        dict(alphas=[0.0, 1.0], previews=1, steps=2, guidance=1.0),  # no guidance: one pass per image and step
        dict(mode="manual", alpha=0.3, previews=2, steps=2),
        dict(alphas=[0.0, 0.5, 1.0], previews=0, steps=5),  # retrieval alone: no UNet at all
        dict(alphas=[0.0, 0.5, 1.0], previews=1, steps=2, refine=2, previews_for="chosen"),
    ],
    ids=["every", "chosen", "no-guidance", "manual", "no-previews", "refine-chosen"],
)
def test_a_request_prices_the_unet_passes_it_makes(gair, unet_images, options):
    req = _req(["sku-1"], "on the beach", **options)
    gair(req)
    assert sum(unet_images) == req.unet_passes()


def test_bisection_is_priced_at_two_alphas_a_round_the_most_it_renders(gair, unet_images, monkeypatch):
    _keep(monkeypatch, 0.5)
    req = _req(["sku-1"], "on the beach", alphas=[0.0, 0.5, 1.0], previews=1, steps=2, refine=2)
    res = gair(req)
    assert [s.alpha for s in res.steps] == [0.0, 0.25, 0.375, 0.5, 0.625, 0.75, 1.0]  # 3 + 2 + 2 α rendered
    assert sum(unet_images) == req.unet_passes() == 1 * 7 * 2 * 2


def test_bisection_at_an_end_of_the_schedule_costs_less_than_its_price(gair, unet_images, monkeypatch):
    _keep(monkeypatch, 1.0)
    req = _req(["sku-1"], "on the beach", alphas=[0.0, 0.5, 1.0], previews=1, steps=2, refine=3)
    res = gair(req)
    assert [s.alpha for s in res.steps] == [0.0, 0.5, 0.75, 0.875, 0.9375, 1.0]  # one midpoint a round
    assert sum(unet_images) == 6 * 2 * 2 < req.unet_passes() == 9 * 2 * 2  # the price is a bound
