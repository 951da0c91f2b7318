"""Every method of the evaluation, computed the same way on the same data.

Classification (held-out images of each concept, classified among the concepts of the same parent):

    parent_word   the parent word alone, in the learner's templates ("a photo of a dress")
    caption       the catalog's hand-written caption of the concept ("a red striped dress")
    ti            textual-inversion loss only, free token            (learned here: the ablation)
    ti_proj       textual-inversion loss only, projected token        (learned here)
    ce            CE losses only, projected token                     (learned here)
    ce_free       CE losses only, free token                          (learned here)
    ti_ce_free    both losses, free token                             (learned here)
    ti_ce_proj    both losses, projected token: the method            (the registry's tokens)
    polar         POLAR's rank-1 update of the text encoder's last value matrix, queried with a fixed
                  word ("a photo of a sks dress")                     (learned here: an anchor)
    palavra_ft    PALAVRA's second stage: a token from the parent word, contrastive on CLIP features
                                                                      (learned here: an anchor)

so each factor (loss, projection) is isolated: ti vs ti_proj and ce_free vs ce isolate the projection,
ti_proj vs ce vs ti_ce_proj the losses, and the method stands beside two published ones (the anchors,
`factory.evaluation.anchors`, learned on the same few-shot features and backbone). A k-way tie for the
top score counts 1/k (`tie_aware_hits`).

The ablations are learned on the same few-shot images, with the registry run's own learner settings
(steps, learning rate, seed, λs) and its very chunks (`chunks_by_parent` over the catalog, as the job forms
them), changing only what the method name says.

Retrieval (one query per (concept, context); its relevant gallery items are the targets):

    words         the query with the parent word in the concept's place
    token         the token alone ("a photo of a <concept:ID> dress"), no intent
    token_intent  the query with the token in the concept's place
    fixed_<α>     GAIR's query at α for every query: normalize(α · F(token prompt) + (1 − α) · F(the same
                  prompt with the parent word's embedding in the token's place)), F the projected features
                  before normalisation (`factory.gair`), for α in FIXED_ALPHAS: one balance for all queries
                  (fixed_1 is token_intent; fixed_0 is not ``words``: it says the parent word twice, "a
                  dress dress"); the best of them, picked with hindsight, is a ceiling for any fixed choice
    gair_auto     GAIR: the balance α chosen per query by the configured rule (`factory.gair`, default
                  ``retrieval``: what each α's query retrieves, checked against the concept and the intent)
    gair_previews GAIR with the ``previews`` rule (the previews' scores, min-max over the schedule); only
                  with ``GairSettings.previews_for="every"``, as it needs every α's previews
    gair_object   GAIR with the ``object`` rule: the retrieval rule with fidelity measured against the
                  concept's look-alikes (its parent's other concepts), so the scenes cancel
    gair_bisect<r>  the retrieval rule after r rounds of bisection around its α (`factory.gair.bisection_alphas`)
    gair_retrieval_m<margin>  the ``retrieval`` rule at each intent margin of GAIR_MARGINS ("inf": no intent
                  gate); all of these re-decide on the same previews and retrievals, so they differ only
                  by the rule. The default margin is chosen on the tuning seed only.
    gair_expand   gair_auto's query expanded with its chosen α's previews (weight GairSettings.expand)
    oracle_alpha  per query, the fixed α whose query ranks the target best: the ceiling of any per-query
                  rule; ``retrieval_summary.gair_share_of_oracle_gain`` says how much of the way from the
                  best fixed α to it GAIR goes
    polar, palavra_ft  the anchors' queries: the query's words with the anchor's concept word in the slot
                  ("a <word> dress on the beach"), where the evaluation learned them

Every retrieval method reports ``mrr``, ``r1``/``r5``/``r10`` (the first relevant item in the top k) and the
field's metrics as ConCon-Chi computes them (`factory.evaluation.ir_metrics`): ``recall@1``/``@5``/``@10``
(equal to ``r1``…: any relevant item in the top k), ``map`` (over all relevant items) and ``map@50``.

Generation: the previews GAIR makes at α = 1 (exactly the token_intent prompt) and at its chosen α, from
the same noise, judged by the backbone among all intents of the catalog, and against the concept: plain
``fidelity`` (cosine to its few-shot prototype, scenes and all) and ``object_fidelity`` / ``identity`` (the
same against its look-alikes, `metrics.object_fidelity`, so the scene cancels). The default renders only
those two α (``previews_for="chosen"``): the default rule decides on retrieval alone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass
from tqdm.auto import tqdm

from factory.backbones import Backbone
from factory.catalogs.evaluation import EvalCatalog
from factory.concepts import NegativeBank, negative_banks
from factory.evaluation.anchors import ANCHORS, Anchor, anchor_accuracy, anchor_query_features
from factory.evaluation.ir_metrics import field_metrics, ranks_in_ranking
from factory.evaluation.metrics import (
    heldout_accuracy,
    mean_object_scores,
    object_fidelity,
    ranking_metrics,
)
from factory.gair import ConceptToken, Gair, GairOptions, GairRequest, GairResult, choose_alpha
from factory.learner import ConceptData, LearnedToken, LearnerConfig, learn_tokens
from factory.losses import LossWeights
from factory.tokens import marker
from factory.tokens.prompts import template_prompts
from schemas.gair import PreviewsFor, Real

log = logging.getLogger(__name__)

CLASSIFICATION_METHODS = (
    "parent_word",
    "caption",
    "ti",
    "ti_proj",
    "ce",
    "ce_free",
    "ti_ce_free",
    "ti_ce_proj",
    *ANCHORS,
)
FIXED_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
FIXED_METHODS = tuple(f"fixed_{a:g}" for a in FIXED_ALPHAS)
GAIR_MARGINS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.1, float("inf"))
BISECT_ROUNDS = (1, 2, 3)
GAIR_VARIANTS = (
    "gair_previews",
    *(f"gair_retrieval_m{m:g}" for m in GAIR_MARGINS),
    "gair_object",
    *(f"gair_bisect{r}" for r in BISECT_ROUNDS),
    "gair_expand",
)
RETRIEVAL_METHODS = (
    "words",
    "token",
    "token_intent",
    *FIXED_METHODS,
    "gair_auto",
    *GAIR_VARIANTS,
    "oracle_alpha",
    *ANCHORS,
)  # the anchors where the evaluation learned them
GENERATION_METHODS = ("token_intent", "gair_auto")
# The ablations: (loss weights replaced, parametrisation). "ce" keeps both CE terms of the run (text- and
# image-side); "ti" drops both.
ABLATIONS: dict[str, tuple[dict[str, float], str]] = {
    "ti": ({"ce": 0.0, "image_ce": 0.0}, "free"),
    "ti_proj": ({"ce": 0.0, "image_ce": 0.0}, "projected"),
    "ce": ({"ti": 0.0}, "projected"),
    "ce_free": ({"ti": 0.0}, "free"),
    "ti_ce_free": ({}, "free"),
    "ti_ce_proj": ({}, "projected"),
}


def ablation_config(base: LearnerConfig, method: str) -> LearnerConfig:
    """The run's learner settings with the losses and parametrisation of ``method``."""
    overrides, parametrization = ABLATIONS[method]
    weights = LossWeights(**{**dataclasses.asdict(base.weights), **overrides})
    if method.startswith("ti") and weights.ti == 0:
        weights.ti = 1.0  # a run learned without TI still gets TI in the methods named for it
    return dataclasses.replace(base, weights=weights, parametrization=parametrization, log_every=0)


def learn_ablation(
    backbone: Backbone, chunks: Sequence[Sequence[ConceptData]], base: LearnerConfig, method: str
) -> dict[str, torch.Tensor]:
    """Learn one ablation's tokens, chunk by chunk (the registry run's chunks, `chunks_by_parent`), against
    the negative banks of all the chunks' concepts; concept id -> token vector."""
    banks = negative_banks([c for chunk in chunks for c in chunk])
    return {cid: v for chunk in chunks for cid, v in learn_ablation_chunk(backbone, chunk, banks, base, method).items()}


def learn_ablation_chunk(
    backbone: Backbone,
    chunk: Sequence[ConceptData],
    banks: Mapping[str, NegativeBank],
    base: LearnerConfig,
    method: str,
) -> dict[str, torch.Tensor]:
    """One chunk (the concepts of one learner call) of an ablation, against the negative banks of all the
    concepts: the unit `learn_ablation` loops over and parallel learners split on. Each chunk learns what
    it learns inside the whole (its image-side CE sees only the chunk's concepts)."""
    return _vectors(learn_tokens(backbone, chunk, dict(banks), ablation_config(base, method)))


def _vectors(learned: Sequence[LearnedToken]) -> dict[str, torch.Tensor]:
    return {t.concept_id: t.vector.detach().float().cpu() for t in learned}


def _templated(concept):
    return lambda cid, parent: template_prompts(concept(cid), parent)


def classification(
    backbone: Backbone,
    concepts: Sequence[tuple[str, str]],
    heldout: Mapping[str, torch.Tensor],
    captions: Mapping[str, str | None],
    token_sets: Mapping[str, Mapping[str, torch.Tensor]],
    anchors: Mapping[str, Anchor] | None = None,
) -> dict[str, dict[str, float]]:
    """``classification.<method>.accuracy`` for the word baselines, every method in ``token_sets`` and every
    anchor (`factory.evaluation.anchors`, with its ``seconds_per_concept`` of learning).

    ``concepts`` are the (id, parent) pairs every method is scored on (those that have tokens in every
    set), so all methods face the same images and the same candidates.
    """
    n_images = sum(len(heldout[c]) for c, _ in concepts if c in heldout)
    out: dict[str, dict[str, float]] = {}
    prompts = {"parent_word": (_templated(lambda c: ""), None)}
    if all(captions.get(c) for c, _ in concepts):
        prompts["caption"] = (lambda c, p: [captions[c]], None)
    prompts.update({method: (_templated(marker), tokens) for method, tokens in token_sets.items()})
    for method, (prompts_for, tokens) in prompts.items():
        # per_concept: each concept's own held-out accuracy, the unit paired bootstrap intervals resample
        acc, per_concept = heldout_accuracy(backbone, concepts, heldout, prompts_for, tokens)
        out[method] = {"accuracy": acc, "n_images": n_images, "per_concept": per_concept}
    for name, anchor in (anchors or {}).items():
        acc, per_concept = anchor_accuracy(backbone, anchor, concepts, heldout)
        out[name] = {
            "accuracy": acc,
            "n_images": n_images,
            "per_concept": per_concept,
            "seconds_per_concept": anchor.seconds_per_concept,
        }
    return out


def token_norms(token_sets: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, float]:
    return {m: float(torch.stack(list(t.values())).norm(dim=-1).mean()) for m, t in token_sets.items() if t}


@pydantic_dataclass(kw_only=True)
class GairSettings(GairOptions):
    """GAIR's options for every query of the evaluation: the method's own (`schemas.gair.GairOptions`: the same
    fields, checks and defaults; each query adds its concept, intent and template, `GairRequest.of`), but for
    the two the evaluation decides itself."""

    # gair_expand's weight of the chosen previews' mean feature; gair_auto itself is never expanded (the
    # method's default, 0, would make gair_expand a copy of gair_auto).
    expand: Real = Field(default=0.5, ge=0.0)
    # "chosen": previews of the kept α and of α = 1 (the generation metrics' two) only; "every": of every α,
    # which the previews rule (gair_previews) needs; 2.5x the sampling of the default 5-α schedule.
    previews_for: PreviewsFor = "chosen"

    @field_validator("alphas")
    @classmethod
    def _alpha_one_is_searched(cls, v: Sequence[float]) -> Sequence[float]:
        if 1.0 not in [float(a) for a in v]:
            raise ValueError("the α schedule must contain 1.0: its previews are the token_intent baseline's")
        return v


@dataclass
class RetrievalOutcome:
    retrieval: dict[str, dict[str, float]]
    generation: dict[str, dict[str, float]]
    alphas: dict[str, int]  # chosen α -> number of queries
    traces: list[tuple[str, str, GairResult]] = field(default_factory=list)  # (query id, prompt, trace)
    summary: dict = field(default_factory=dict)  # `retrieval_summary`
    per_query: dict = field(default_factory=dict)  # query ids and each method's reciprocal rank per query


@torch.no_grad()
def _features(backbone: Backbone, prompts: list[str], tokens, batch: int = 256, normalize: bool = True) -> torch.Tensor:
    out = [
        backbone.encode_prompts(prompts[i : i + batch], tokens).features.float() for i in range(0, len(prompts), batch)
    ]
    out = torch.cat(out).cpu()
    return F.normalize(out, dim=-1) if normalize else out


def _ranks(index, queries: torch.Tensor, relevant: Sequence[Sequence[str]]) -> list[np.ndarray]:
    """Per query, the sorted 1-based ranks of its relevant items in the whole gallery (in the index's order)."""
    res = index.search(queries.numpy().astype(np.float32), len(index))
    return [ranks_in_ranking(ids, rel) for ids, rel in zip(res.ids, relevant)]


def _first(ranks: np.ndarray) -> int | None:
    return int(ranks[0]) if ranks.size else None


def retrieval_and_generation(
    backbone: Backbone,
    catalog: EvalCatalog,
    index,
    concepts: Mapping[str, ConceptToken],
    settings: GairSettings,
    keep_traces: int = 4,
    progress: bool = True,
    anchors: Mapping[str, Anchor] | None = None,
) -> RetrievalOutcome:
    """Retrieval metrics of every method over the catalog's queries (and of every anchor in ``anchors``,
    learned on the same concepts), and generation metrics of GAIR's previews. Queries whose concept has no
    token are left out (counted in ``n_queries``)."""
    queries = [q for q in catalog.queries if q.concept_id in concepts]
    if not queries:
        raise ValueError("no query names a concept that has a token: evaluate the registry learned on this catalog")
    tokens = {c: t.vector for c, t in concepts.items()}
    phrase = {q.query_id: f"a {marker(q.concept_id)} {q.parent}" for q in queries}
    words = _features(backbone, [q.text(f"a {q.parent}") for q in queries], tokens)
    token = _features(backbone, [f"a photo of {phrase[q.query_id]}" for q in queries], tokens)
    # The fixed balances are GAIR's own queries (`factory.gair`): the token prompt's projected features and the
    # same prompt's with the parent word's embedding in the token's place, mixed before normalising. So
    # fixed_<α> is exactly what GAIR runs at that α, and the best fixed α and the per-query oracle are
    # ceilings of the very family GAIR chooses from (``words``, what a person types, is another prompt).
    raw_token = _features(backbone, [q.text(phrase[q.query_id]) for q in queries], tokens, normalize=False)
    parents = {c: backbone.word_embedding(t.parent) for c, t in concepts.items()}
    raw_aligned = _features(backbone, [q.text(phrase[q.query_id]) for q in queries], parents, normalize=False)
    token_intent = F.normalize(raw_token, dim=-1)
    fixed = {m: F.normalize(a * raw_token + (1 - a) * raw_aligned, dim=-1) for m, a in zip(FIXED_METHODS, FIXED_ALPHAS)}

    gair, gair_queries = Gair(backbone, concepts, index), []
    intents = catalog.intents
    judge = {
        p: _features(backbone, [" ".join(f"a photo of a {p} {i}".split()) for i in intents], None)
        for p in {q.parent for q in queries}
    }
    hits = {m: [] for m in GENERATION_METHODS}
    fidelity = {m: [] for m in GENERATION_METHODS}
    chosen, traces = Counter(), []
    variants = {m: [] for m in GAIR_VARIANTS}
    object_scores = {m: [] for m in GENERATION_METHODS}  # (margin, identity) per query, where it has rivals
    for n, q in enumerate(tqdm(queries, desc="GAIR", unit="query", disable=not progress)):
        req = GairRequest.of(
            settings,
            concept_ids=[q.concept_id],
            intent=q.intent,
            top_k=1,
            template=q.template,
            seed=settings.seed + n,
            expand=0.0,
        )
        res = gair(req)
        gair_queries.append(torch.from_numpy(res.query))
        for name, q_alt in _variant_queries(gair, req, res, settings).items():
            variants[name].append(q_alt)
        chosen[f"{res.alpha:g}"] += 1
        concept = concepts[q.concept_id]
        proto = F.normalize(concept.prototype.float(), dim=0)
        steps = {
            "token_intent": next(s for s in res.steps if s.alpha == 1.0),
            "gair_auto": next(s for s in res.steps if s.alpha == res.alpha),
        }
        if steps["token_intent"].features is None:  # not rendered: α = 1 alone, from the same noise
            steps["token_intent"] = gair(dataclasses.replace(req, mode="manual", alpha=1.0, refine=0)).steps[0]
        for m, step in steps.items():
            f = torch.from_numpy(step.features)
            hits[m] += ((f @ judge[q.parent].T).argmax(1) == intents.index(q.intent)).tolist()
            fidelity[m].append(float((f @ proto).mean()))
            scored = object_fidelity(f, proto, concept.rivals)
            if scored is not None:
                object_scores[m].append(scored)
        if len(traces) < keep_traces:
            traces.append((q.query_id, q.text(phrase[q.query_id]), res))

    relevant = [q.relevant for q in queries]
    vectors = {
        "words": words,
        "token": token,
        "token_intent": token_intent,
        **fixed,
        "gair_auto": torch.stack(gair_queries),
        **{m: torch.stack(v) for m, v in variants.items() if v},
    }
    vectors.update({name: anchor_query_features(backbone, anchor, queries) for name, anchor in (anchors or {}).items()})
    all_ranks = {m: _ranks(index, v, relevant) for m, v in vectors.items()}
    all_ranks["oracle_alpha"] = [_oracle(per_alpha) for per_alpha in zip(*(all_ranks[m] for m in FIXED_METHODS))]
    n_relevant = [len(set(rel)) for rel in relevant]
    ranks = {m: [_first(x) for x in r] for m, r in all_ranks.items()}  # each query's first relevant rank
    retrieval = {
        m: {**ranking_metrics(ranks[m]), **field_metrics(r, n_relevant), "n_queries": len(queries)}
        for m, r in all_ranks.items()
    }
    for name, anchor in (anchors or {}).items():
        retrieval[name]["seconds_per_concept"] = anchor.seconds_per_concept
    # Each query's reciprocal rank per method (0: never ranked), the unit paired bootstrap resamples.
    per_query = {
        "query_ids": [q.query_id for q in queries],
        "reciprocal_rank": {m: [1.0 / x if x else 0.0 for x in r] for m, r in ranks.items()},
    }
    generation = {
        m: {
            "intent_accuracy": float(np.mean(hits[m])),
            "fidelity": float(np.mean(fidelity[m])),
            **mean_object_scores(object_scores[m]),
            "n_previews": len(hits[m]),
            "chance": 1.0 / len(intents),
        }
        for m in GENERATION_METHODS
    }
    return RetrievalOutcome(
        retrieval, generation, dict(sorted(chosen.items())), traces, retrieval_summary(retrieval), per_query
    )


def _oracle(per_alpha: Sequence[np.ndarray]) -> np.ndarray:
    """The relevant ranks of the fixed α whose first relevant item comes first (on a tie the earliest of
    FIXED_ALPHAS), so the oracle's mAP is that of the very query its MRR comes from."""
    ranked = [r for r in per_alpha if r.size]
    return min(ranked, key=lambda r: r[0]) if ranked else per_alpha[0]


def _variant_queries(gair: Gair, req: GairRequest, res: GairResult, settings: GairSettings) -> dict[str, torch.Tensor]:
    """The query each of GAIR_VARIANTS would have run: the rules re-decided on ``res``'s own previews and
    retrievals, bisection as retrieval-only requests (no previews: the retrieval rule needs none)."""
    out = {}
    rules = [
        *((f"gair_retrieval_m{m:g}", "retrieval", m) for m in GAIR_MARGINS),
        ("gair_object", "object", settings.intent_margin),
    ]
    if all(s.features is not None for s in res.steps):
        rules.insert(0, ("gair_previews", "previews", 0.0))
    for name, rule, margin in rules:
        out[name] = torch.from_numpy(res.steps[choose_alpha(res.steps, rule, margin)[0]].query)
    for r in BISECT_ROUNDS:
        refined = gair(
            dataclasses.replace(req, rule="retrieval", refine=r, previews=0, previews_for="chosen", expand=0.0)
        )
        out[f"gair_bisect{r}"] = torch.from_numpy(refined.query)
    chosen = next(s for s in res.steps if s.alpha == res.alpha)
    expanded = torch.from_numpy(chosen.query) + settings.expand * torch.from_numpy(chosen.features).mean(0)
    out["gair_expand"] = F.normalize(expanded, dim=0)
    return out


def retrieval_summary(retrieval: Mapping[str, Mapping[str, float]]) -> dict[str, float | str]:
    """The best fixed α (with hindsight), the per-query oracle, and the share of the way GAIR goes from
    the first to the second: 1 is the oracle, 0 no better than the best fixed balance, < 0 worse."""
    best = max(FIXED_METHODS, key=lambda m: retrieval[m]["mrr"])
    b, o, g = retrieval[best]["mrr"], retrieval["oracle_alpha"]["mrr"], retrieval["gair_auto"]["mrr"]
    return {
        "best_fixed": best,
        "best_fixed_mrr": b,
        "oracle_mrr": o,
        "gair_mrr": g,
        "gair_share_of_oracle_gain": (g - b) / (o - b) if o > b else float("nan"),
    }


__all__ = [
    "ABLATIONS",
    "BISECT_ROUNDS",
    "CLASSIFICATION_METHODS",
    "FIXED_ALPHAS",
    "FIXED_METHODS",
    "GENERATION_METHODS",
    "GairSettings",
    "GAIR_MARGINS",
    "GAIR_VARIANTS",
    "RETRIEVAL_METHODS",
    "retrieval_summary",
    "RetrievalOutcome",
    "ablation_config",
    "classification",
    "learn_ablation",
    "learn_ablation_chunk",
    "retrieval_and_generation",
    "token_norms",
]
