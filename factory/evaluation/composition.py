"""Composition in generation: does a method's token, written beside ordinary words, still draw its concept
*and* the words' context? (The seed paper's claim for the projection.)

For every method with tokens (and for the hand-written caption, the baseline a person would type), each
query's composition prompt "a photo of a <concept> <parent> <context>" is sampled from *fresh* noise
(seeds disjoint from the ones GAIR chose α with, so the scores are not the ones a choice was made on),
and every image is judged zero-shot by the backbone:

    intent_accuracy    the context among the catalog's intents ("a photo of a dress on the beach", …)
    colour_accuracy    the concept's colour among the catalog's colours (world catalogs only)
    category_accuracy  the concept's parent among the catalog's parents
    fidelity           mean cosine to the concept's few-shot prototype (its scenes included)
    object_fidelity    the same less the nearest look-alike's (its parent's other concepts), and
    identity_accuracy  how often the concept's own prototype is the nearest of them: scenes cancel
                       (`factory.evaluation.metrics.object_fidelity`)
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from factory.backbones import Backbone
from factory.catalogs.evaluation import EvalCatalog
from factory.evaluation.metrics import look_alikes, mean_object_scores, object_fidelity
from factory.images import to_uint8
from factory.tokens import marker

SEED_OFFSET = 1_000_003  # composition previews never reuse a GAIR preview's noise
BATCH = 32


def _mean(hits: torch.Tensor) -> float:
    return float(hits.float().mean())


@torch.no_grad()
def _text(backbone: Backbone, prompts: list[str]) -> torch.Tensor:
    return F.normalize(backbone.encode_prompts(prompts).features.float(), dim=-1).cpu()


@torch.no_grad()
def _sample(
    backbone: Backbone, prompts: list[str], tokens, previews: int, steps: int, guidance: float, seed: int
) -> torch.Tensor:
    """Normalised image features of ``previews`` samples per prompt, [len(prompts) * previews, D]."""
    gen, uncond = backbone.generator, backbone.encode_prompts([""]).hidden
    feats = []
    rows = [p for p in prompts for _ in range(previews)]
    for i in range(0, len(rows), BATCH):
        chunk = rows[i : i + BATCH]
        cond = backbone.encode_prompts(chunk, tokens).hidden
        noise = gen.initial_noise(len(chunk), seed + i)
        u8 = to_uint8(gen.sample(cond, uncond, steps=steps, guidance=guidance, noise=noise))
        feats.append(F.normalize(backbone.encode_image(backbone.preprocess(u8)).float(), dim=-1).cpu())
    return torch.cat(feats)


def composition_generation(
    backbone: Backbone,
    catalog: EvalCatalog,
    token_sets: Mapping[str, Mapping[str, torch.Tensor]],
    prototypes: Mapping[str, torch.Tensor],
    previews: int,
    steps: int,
    guidance: float,
    seed: int,
    max_queries: int | None = None,
    caption: bool = True,
) -> dict[str, dict[str, float]]:
    """``generation.<method>.{intent_accuracy, colour_accuracy, category_accuracy, fidelity, …}`` (see above),
    and the caption's where every query's concept has one (``caption=False``: the token methods only).
    Each method samples from the same noise, so methods scored in separate calls compare as if in one."""
    if backbone.generator is None:
        return {}
    specs = {s.concept_id: s for s in catalog.concepts}
    queries = [q for q in catalog.queries if q.concept_id in prototypes][:max_queries]
    if not queries:
        return {}
    intents = catalog.intents
    parents = sorted({specs[q.concept_id].parent for q in queries})
    colours = sorted({specs[q.concept_id].attributes.get("colour") for q in queries} - {None})
    judge_intent = {p: _text(backbone, [" ".join(f"a photo of a {p} {i}".split()) for i in intents]) for p in parents}
    judge_category = _text(backbone, [f"a photo of a {p}" for p in parents])
    judge_colour = {p: _text(backbone, [f"a photo of a {c} {p}" for c in colours]) for p in parents} if colours else {}

    methods: dict[str, tuple[list[str], Mapping[str, torch.Tensor] | None]] = {
        m: ([q.text(f"a {marker(q.concept_id)} {q.parent}") for q in queries], tokens)
        for m, tokens in token_sets.items()
    }
    if caption and all(specs[q.concept_id].caption for q in queries):
        methods["caption"] = ([q.text(specs[q.concept_id].caption) for q in queries], None)
    protos = {c: F.normalize(p.float(), dim=0) for c, p in prototypes.items()}
    rivals = look_alikes(protos, {c: s.parent for c, s in specs.items() if c in protos})
    out = {}
    for m, (prompts, tokens) in methods.items():
        feats = _sample(backbone, prompts, tokens, previews, steps, guidance, seed + SEED_OFFSET)
        per_query = {
            "intent": [],
            "colour": [],
            "category": [],
            "fidelity": [],
            "object_fidelity": [],
            "identity": [],
        }  # one value per query (None: not defined for it)
        for n, q in enumerate(queries):
            spec, f = specs[q.concept_id], feats[n * previews : (n + 1) * previews]
            per_query["intent"].append(_mean((f @ judge_intent[spec.parent].T).argmax(1) == intents.index(q.intent)))
            per_query["category"].append(_mean((f @ judge_category.T).argmax(1) == parents.index(spec.parent)))
            colour = spec.attributes.get("colour")
            per_query["colour"].append(
                _mean((f @ judge_colour[spec.parent].T).argmax(1) == colours.index(colour))
                if colour in colours
                else None
            )
            per_query["fidelity"].append(float((f @ protos[q.concept_id]).mean()))
            scored = object_fidelity(f, protos[q.concept_id], rivals[q.concept_id])
            per_query["object_fidelity"].append(scored[0] if scored else None)
            per_query["identity"].append(scored[1] if scored else None)
        coloured = [c for c in per_query["colour"] if c is not None]
        objects = [(a, b) for a, b in zip(per_query["object_fidelity"], per_query["identity"]) if a is not None]
        object_means = mean_object_scores(objects)
        # Every query has the same number of previews, so the mean of per-query means is the mean over images.
        out[m] = {
            "intent_accuracy": float(np.mean(per_query["intent"])),
            "category_accuracy": float(np.mean(per_query["category"])),
            "colour_accuracy": float(np.mean(coloured)) if coloured else None,
            "fidelity": float(np.mean(per_query["fidelity"])),
            "n_images": len(queries) * previews,
            **object_means,
            "prompt_example": prompts[0],
            "per_query": {"query_ids": [q.query_id for q in queries], **per_query},
        }
    return out


__all__ = ["composition_generation"]
