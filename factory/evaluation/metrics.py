"""Scoring primitives: held-out classification among a parent's concepts, ranking metrics (MRR, recall@k), and
the object fidelity of generated images."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Collection, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from factory.backbones import Backbone


@torch.no_grad()
def class_embeddings(
    backbone: Backbone, prompts: Sequence[Sequence[str]], tokens: Mapping[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """One normalised text embedding per class: the mean of its prompts' normalised features."""
    flat = [p for ps in prompts for p in ps]
    feats = F.normalize(backbone.encode_prompts(flat, tokens or {}).features.float(), dim=-1).cpu()
    out, i = [], 0
    for ps in prompts:
        out.append(F.normalize(feats[i : i + len(ps)].mean(0), dim=-1))
        i += len(ps)
    return torch.stack(out)


def heldout_accuracy(
    backbone: Backbone,
    concepts: Sequence[tuple[str, str]],
    heldout: Mapping[str, torch.Tensor],
    prompts_for: Callable[[str, str], list[str]],
    tokens: Mapping[str, torch.Tensor] | None = None,
) -> tuple[float, dict[str, float]]:
    """Accuracy of classifying each concept's held-out image features among its parent's concepts.

    ``concepts`` are (concept_id, parent) pairs, ``heldout`` maps concept id -> features [n, D],
    ``prompts_for(concept_id, parent)`` gives the prompts that stand for a concept under a method
    (token prompts, the parent word, a caption…). Returns the overall accuracy and per-concept accuracies.
    """
    by_parent: dict[str, list[str]] = defaultdict(list)
    for cid, parent in concepts:
        by_parent[parent].append(cid)
    per_concept, hits, total = {}, 0, 0
    for parent, ids in by_parent.items():
        emb = class_embeddings(backbone, [prompts_for(c, parent) for c in ids], tokens)
        for k, cid in enumerate(ids):
            x = heldout.get(cid)
            if x is None or len(x) == 0:
                continue
            correct = float(tie_aware_hits(F.normalize(x.float(), dim=-1) @ emb.T, k).sum())
            per_concept[cid] = correct / len(x)
            hits, total = hits + correct, total + len(x)
    return (hits / total if total else float("nan")), per_concept


def tie_aware_hits(scores: torch.Tensor, target: int) -> torch.Tensor:
    """Per row of ``scores`` [n, K]: 1/k when the target is among the k classes tied for the top score,
    else 0. Identical prompts (a parent word standing for every concept) tie exactly: argmax would credit
    whichever class comes first, and a method with no information would look better than chance."""
    top = scores.max(dim=1, keepdim=True).values
    tied = scores >= top
    return tied[:, target].float() / tied.sum(dim=1).float()


def first_relevant_rank(ranking: Sequence[str], relevant: Collection[str]) -> int | None:
    """1-based position of the first relevant id in ``ranking``; None when no relevant item was ranked."""
    for i, item in enumerate(ranking, start=1):
        if item in relevant:
            return i
    return None


def ranking_metrics(ranks: Sequence[int | None], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """MRR and recall@k of one method over its queries, from each query's first relevant rank.

    A query whose relevant items were never ranked contributes 0 to MRR and recall (it is not dropped:
    dropping it would reward a method for losing items).
    """
    if not ranks:
        raise ValueError("no queries to score")
    out = {"mrr": sum(1.0 / r for r in ranks if r) / len(ranks)}
    for k in ks:
        out[f"r{k}"] = sum(1 for r in ranks if r and r <= k) / len(ranks)
    return out


def object_fidelity(
    features: torch.Tensor, own: torch.Tensor, rivals: torch.Tensor | None
) -> tuple[float, float] | None:
    """How much generated images look like their concept's *object* rather than its scenes: (margin, identity).

    ``features`` [n, D] normalised image features, ``own`` [D] the concept's prototype, ``rivals`` [R, D] its
    look-alikes' (the other concepts of its parent). Few-shot images of every concept are in scenes, so a
    plain cosine to ``own`` rewards a preview for the scene it shares with them; the cosine to the nearest
    rival shares that part too, and the difference (``margin``) keeps what tells the object apart.
    ``identity``: the share of images whose nearest prototype among own + rivals is their own (ties 1/k).
    None without rivals (a parent with one concept has nothing to tell apart).
    """
    if rivals is None or len(rivals) == 0:
        return None
    own_cos, rival_cos = features @ own, features @ rivals.T
    margin = float((own_cos - rival_cos.max(dim=1).values).mean())
    identity = float(tie_aware_hits(torch.cat([own_cos[:, None], rival_cos], dim=1), 0).mean())
    return margin, identity


def mean_object_scores(scores: Sequence[tuple[float, float]]) -> dict[str, float | None]:
    """Mean `object_fidelity` margin and identity over the queries that have look-alikes (None: none has)."""
    if not scores:
        return {"object_fidelity": None, "identity_accuracy": None, "n_object_queries": 0}
    margin, identity = np.mean(scores, axis=0)
    return {"object_fidelity": float(margin), "identity_accuracy": float(identity), "n_object_queries": len(scores)}


def look_alikes(
    prototypes: Mapping[str, Sequence[float] | torch.Tensor],
    parents: Mapping[str, str],
    of: Iterable[str] | None = None,
) -> dict[str, torch.Tensor | None]:
    """The rivals for `object_fidelity` of each concept in ``of`` (default: all of ``parents``): the stacked
    prototypes [R, D] of the other concepts of its parent that have one (None: no such concept)."""
    out = {}
    for cid in parents if of is None else of:
        others = [prototypes[c] for c, p in parents.items() if p == parents[cid] and c != cid and c in prototypes]
        out[cid] = torch.stack([torch.as_tensor(o) for o in others]).float() if others else None
    return out
