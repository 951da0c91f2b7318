"""Generation Aided Image Retrieval (GAIR).

A user wants concept c with an intent ("on the beach"). Words alone find the intent but not the item;
the token alone finds the item but can swamp the intent. GAIR balances the two at inference time:

    q(α) = normalize(α · T(prompt with the token and the intent) + (1 − α) · T(prompt with the parent word
           and the intent))

For each α of a schedule it *shows* what the query means: previews generated under the same balance
(the UNet conditioned on α·H_token + (1 − α)·H_words, with the parent word's embedding standing in for the
token so the two hidden-state sequences align position by position). The retrieval query of that α is
built from the very same two prompts and weights: q(α) = normalize(α·F_token + (1 − α)·F_words), with F
the projected end-of-text states before normalisation. Where the diffusion conditioning is the text
encoder's last layer (SD 1.x, the embedded default) F is a linear map of H at that position, so q(α) is
exactly the CLIP query of the previews' conditioning: a preview shows the query that is run.

``auto`` keeps one α by a rule (`RULES`):

- ``retrieval`` (the default): absolute, retrieval-side evidence. Each q(α) is run; its top item is
  compared with the concept's reference images (``retrieved_fidelity``) and with the words-only query
  (``retrieved_intent``, how well it matches the intent). Among the α whose top item matches the intent
  within ``intent_margin`` (cosine) of the best α's, the one whose top item is most like the concept wins.
- ``object``: as ``retrieval``, but "most like the concept" is measured against its look-alikes
  (``ConceptToken.rivals``: the prototypes of other concepts of the same parent): the top item's cosine to
  the concept's images less its best cosine to a rival's. The concept's few-shot images are in scenes,
  and so are the rivals'; what the two cosines share (the scene, the category) cancels, so it is the
  object that scores (``retrieved_object``). Without rivals it is the ``retrieval`` rule.
- ``previews``: the previews' fidelity and intent, min-max normalised over the schedule and averaged
  (relative evidence: some α always wins, whatever the previews show).

``refine`` rounds of bisection then search between the kept α and its neighbours in the schedule: each
round scores the two midpoints and keeps the best α so far, halving the bracket (`bisection_alphas`).

The ``retrieval`` rule needs no previews to decide, so ``previews_for="chosen"`` renders them for the
kept α only (one sampling batch instead of one per α; ``previews=0`` renders none: retrieval alone).
The ``previews`` rule needs every α's previews.

``manual`` takes the caller's α. Retrieval uses q(α*), optionally expanded with the chosen previews' image
features. Every step's previews (where rendered), what it retrieved and its scores are returned, so a
person can see why.

The request (`GairRequest`: `GairOptions` and one query; it checks and prices itself) and the result
(`GairResult` of `GairStep`) are the method's one shape, in `schemas.gair` so that the HTTP API and the
evaluation derive from them; they are re-exported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from factory.backbones import Backbone
from factory.errors import UnknownConceptMarker
from factory.images import to_uint8
from factory.tokens import marker
from schemas import CONCEPT_SLOT, DEFAULT_INTENT_MARGIN

# The method's request and result live in `schemas.gair` (one shape for the library, the HTTP API and
# the evaluation); they are GAIR's own, so they are named here too.
from schemas.gair import DEFAULT_ALPHAS, PREVIEWS_FOR, RULES, GairOptions, GairRequest, GairResult, GairStep


@dataclass
class ConceptToken:
    """What GAIR needs of a learned concept (a registry row, as tensors)."""

    vector: torch.Tensor  # [d] the token
    parent: str
    prototype: torch.Tensor  # [D] mean normalised image feature of the concept's few-shot images
    rivals: torch.Tensor | None = None  # [R, D] prototypes of its look-alikes (same parent), for ``object``


def prompts_for(
    concepts: Sequence[str], parents: Sequence[str], intent: str, template: str | None = None
) -> tuple[str, str]:
    """(prompt with the tokens and the intent, prompt with the parent words and the intent).

    ``template`` has one ``{concept}`` slot that receives "a <concept:ID> dress" (joined by "and" for
    several concepts) or "a dress"; by default it is "a photo of {concept} <intent>".
    """
    template = template or f"a photo of {CONCEPT_SLOT} {intent}"
    with_tokens = " and ".join(f"a {marker(c)} {p}" for c, p in zip(concepts, parents))
    with_words = " and ".join(f"a {p}" for p in parents)
    fill = lambda phrase: " ".join(template.replace(CONCEPT_SLOT, phrase).split())  # noqa: E731
    return fill(with_tokens), fill(with_words)


class _Balance:
    """One request's two prompts, encoded once: every α's query, retrieval evidence and previews."""

    def __init__(self, gair: "Gair", request: GairRequest, should_stop):
        bb, self.gair, self.request, self.should_stop = gair.backbone, gair, request, should_stop
        chosen = [gair.concepts[c] for c in request.concept_ids]
        tok_prompt, _ = prompts_for(request.concept_ids, [c.parent for c in chosen], request.intent, request.template)
        tokens = {cid: c.vector for cid, c in zip(request.concept_ids, chosen)}
        parents = {cid: bb.word_embedding(c.parent) for cid, c in zip(request.concept_ids, chosen)}
        self.tok = bb.encode_prompts([tok_prompt], tokens)
        self.aligned = bb.encode_prompts([tok_prompt], parents)  # the words, at the token's positions
        self.uncond = bb.encode_prompts([""]).hidden
        self.protos = F.normalize(torch.stack([c.prototype.float() for c in chosen]).to(self.uncond.device), dim=-1)
        self.f_words = F.normalize(self.aligned.features.float(), dim=-1)[0]
        self.rivals = [
            F.normalize(c.rivals.float(), dim=-1).to(self.protos.device)
            if c.rivals is not None and len(c.rivals)
            else None
            for c in chosen
        ]

    def steps(self, alphas: Sequence[float]) -> list[GairStep]:
        """q(α) for each α (module docstring) and what it retrieves; no previews yet."""
        index, k = self.gair.index, max(1, self.request.top_k)
        weights = torch.tensor(list(alphas), device=self.tok.features.device)[:, None]
        queries = F.normalize(
            weights * self.tok.features.float() + (1 - weights) * self.aligned.features.float(), dim=-1
        )
        queries_np = queries.cpu().numpy().astype(np.float32)
        found = index.search(queries_np, k) if len(index) else None
        out = []
        for i, a in enumerate(alphas):
            step = GairStep(alpha=float(a), query=queries_np[i])
            if found is not None and found.ids[i]:
                step.retrieved = list(zip(found.ids[i], found.uris[i], [float(x) for x in found.scores[i]]))
                top = torch.from_numpy(index.vectors_of(found.ids[i][:1])).to(self.protos.device)[0]
                step.retrieved_fidelity = float((self.protos @ top).mean())
                step.retrieved_intent = float(top @ self.f_words)
                step.retrieved_object = float(
                    np.mean(
                        [
                            float(p @ top) - (float((r @ top).max()) if r is not None else 0.0)
                            for p, r in zip(self.protos, self.rivals)
                        ]
                    )
                )
            out.append(step)
        return out

    def render(self, steps: Sequence[GairStep]) -> None:
        """Previews of ``steps``, in one sampling batch. Every α starts from the same noise: previews of
        different α differ only by their conditioning, so their scores compare the balance, not the luck
        of the draw (and one batched UNet pass is much faster than one per α)."""
        n, bb, r = self.request.previews, self.gair.backbone, self.request
        if not steps or n == 0:
            return
        cond = torch.cat(
            [(s.alpha * self.tok.hidden + (1 - s.alpha) * self.aligned.hidden).expand(n, -1, -1) for s in steps]
        )
        noise = bb.generator.initial_noise(n, r.seed).repeat(len(steps), 1, 1, 1)
        u8 = to_uint8(
            bb.generator.sample(
                cond, self.uncond, steps=r.steps, guidance=r.guidance, noise=noise, should_stop=self.should_stop
            )
        )
        feats = F.normalize(bb.encode_image(bb.preprocess(u8)).float(), dim=-1)
        for i, s in enumerate(steps):
            f = feats[i * n : (i + 1) * n]
            s.previews, s.features = u8[i * n : (i + 1) * n], f.cpu().numpy()
            s.fidelity, s.intent = float((f @ self.protos.T).mean()), float((f @ self.f_words).mean())


class Gair:
    """GAIR over one backbone (with a generator), a set of learned concepts and a gallery index."""

    def __init__(self, backbone: Backbone, concepts: Mapping[str, ConceptToken], index):
        if backbone.generator is None:
            raise ValueError(f"GAIR needs a generator; backbone {backbone.name!r} has none")
        self.backbone, self.concepts, self.index = backbone, concepts, index

    @torch.no_grad()
    def __call__(self, request: GairRequest, should_stop: Callable[[], bool] | None = None) -> GairResult:
        """Run one GAIR request; ``should_stop`` is polled between sampling steps (see `DiffusionGenerator.sample`)."""
        missing = [c for c in request.concept_ids if c not in self.concepts]
        if missing:
            raise UnknownConceptMarker(missing, known=len(self.concepts))
        balance = _Balance(self, request, should_stop)
        manual = request.mode == "manual"
        every = request.previews_for == "every"
        steps = balance.steps([float(request.alpha)] if manual else [float(a) for a in request.alphas])
        if every:
            balance.render(steps)
        best = self._decide(steps, request)
        for _ in range(0 if manual else request.refine):
            seen = {s.alpha for s in steps}
            new = [a for a in bisection_alphas(sorted(seen), steps[best].alpha) if a not in seen]
            if not new:
                break
            more = balance.steps(new)
            if every:
                balance.render(more)
            steps = sorted(steps + more, key=lambda s: s.alpha)
            best = self._decide(steps, request)
        chosen = steps[best]
        if not every:
            balance.render([chosen])
        if request.expand > 0:
            if chosen.features is None:
                raise ValueError("expand needs previews of the chosen α (previews >= 1)")
            previews = torch.from_numpy(chosen.features)
            if request.expand_with is not None:
                if any(not 0 <= i < len(previews) for i in request.expand_with):
                    raise ValueError(f"expand_with names previews outside 0..{len(previews) - 1}")
                previews = previews[list(request.expand_with)]
            q = F.normalize(torch.from_numpy(chosen.query) + request.expand * previews.mean(0), dim=-1)
            q = q.numpy().astype(np.float32)
            return GairResult(alpha=chosen.alpha, steps=steps, ranking=self.retrieve(q, request.top_k), query=q)
        return GairResult(
            alpha=chosen.alpha, steps=steps, ranking=chosen.retrieved[: request.top_k], query=chosen.query
        )

    @staticmethod
    def _decide(steps: list[GairStep], request: GairRequest) -> int:
        best, scores, admitted = choose_alpha(steps, request.rule, request.intent_margin)
        for step, score, ok in zip(steps, scores, admitted):  # the trace shows the evidence of its own rule
            step.score, step.admitted = float(score), bool(ok)
        return best

    def retrieve(self, query: np.ndarray, k: int) -> list[tuple[str, str | None, float]]:
        res = self.index.search(query[None], k)
        return list(zip(res.ids[0], res.uris[0], [float(s) for s in res.scores[0]]))


def bisection_alphas(searched: Sequence[float], best: float) -> list[float]:
    """The midpoints between ``best`` and its neighbours among the (sorted) α searched so far: one round of
    bisection. At an end of the schedule there is one neighbour, hence one midpoint."""
    i = list(searched).index(best)
    out = []
    if i > 0:
        out.append(round((searched[i - 1] + best) / 2, 6))
    if i + 1 < len(searched):
        out.append(round((best + searched[i + 1]) / 2, 6))
    return out


def choose_alpha(
    steps: Sequence[GairStep], rule: str = "retrieval", intent_margin: float = DEFAULT_INTENT_MARGIN
) -> tuple[int, np.ndarray, np.ndarray]:
    """(index of the step ``auto`` keeps, each step's score, each step's admission) under ``rule`` (`RULES`).

    A pure function of the steps' evidence (it changes nothing), so the evaluation can score every rule on
    one set of previews. Ties go to the larger α (the more specific query)."""
    if rule == "previews":
        fid = np.array([s.fidelity for s in steps])
        inten = np.array([s.intent for s in steps])
        score = 0.5 * (_minmax(fid) + _minmax(inten))
        admitted = np.ones(len(steps), bool)
    elif rule in ("retrieval", "object"):
        fid = np.array([s.retrieved_object if rule == "object" else s.retrieved_fidelity for s in steps])
        inten = np.array([s.retrieved_intent for s in steps])
        if not np.isfinite(fid).all():  # nothing was retrieved (an empty gallery): no evidence either way
            fid, inten = np.zeros(len(steps)), np.zeros(len(steps))
        score, admitted = fid, inten >= inten.max() - intent_margin
    else:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    best = max((i for i in range(len(steps)) if admitted[i]), key=lambda i: (score[i], steps[i].alpha))
    return best, score, admitted


def _minmax(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 1e-8 else np.full_like(x, 0.5)


__all__ = [
    "DEFAULT_ALPHAS",
    "PREVIEWS_FOR",
    "RULES",
    "ConceptToken",
    "Gair",
    "GairOptions",
    "GairRequest",
    "GairResult",
    "GairStep",
    "bisection_alphas",
    "choose_alpha",
    "prompts_for",
]
