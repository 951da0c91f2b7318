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
- ``previews``: the previews' fidelity and intent, min-max normalised over the schedule and averaged
  (relative evidence: some α always wins, whatever the previews show).

``manual`` takes the caller's α. Retrieval uses q(α*), optionally expanded with the chosen previews' image
features. Every step's previews, what it retrieved and its scores are returned, so a person can see why.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from factory.backbones import Backbone
from factory.errors import MalformedMarker, UnknownConceptMarker
from factory.images import to_uint8
from factory.tokens import marker, split_on_markers
from schemas import CONCEPT_SLOT, DEFAULT_INTENT_MARGIN

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
RULES = ("retrieval", "previews")


@dataclass
class ConceptToken:
    """What GAIR needs of a learned concept (a registry row, as tensors)."""

    vector: torch.Tensor  # [d] the token
    parent: str
    prototype: torch.Tensor  # [D] mean normalised image feature of the concept's few-shot images


@dataclass
class GairRequest:
    concept_ids: list[str]
    intent: str
    top_k: int = 10
    mode: str = "auto"  # "auto": search the α schedule; "manual": use ``alpha``
    alphas: Sequence[float] = DEFAULT_ALPHAS
    alpha: float | None = None  # manual mode
    previews: int = 2  # generated images per α
    steps: int = 20  # DDIM steps per preview
    guidance: float = 4.0
    seed: int = 0
    expand: float = 0.0  # weight of the chosen previews' mean image feature added to the query (0: off)
    expand_with: Sequence[int] | None = None  # which previews of the chosen α (default: all of them)
    template: str | None = None  # the query with a {concept} slot; None: "a photo of {concept} <intent>"
    rule: str = "retrieval"  # how ``auto`` picks α: see `RULES`
    intent_margin: float = DEFAULT_INTENT_MARGIN  # the ``retrieval`` rule's intent tolerance (cosine)

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if not self.intent_margin >= 0:
            raise ValueError(f"intent_margin must be >= 0, got {self.intent_margin}")
        if self.mode not in ("auto", "manual"):
            raise ValueError(f"mode must be 'auto' or 'manual', got {self.mode!r}")
        if self.mode == "manual" and self.alpha is None:
            raise ValueError("manual mode needs an alpha")
        if not self.concept_ids:
            raise ValueError("name at least one concept")
        if not self.alphas or any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise ValueError("alphas must be a non-empty list of values in [0, 1]")
        if split_on_markers(self.intent)[1]:
            raise MalformedMarker("the intent must be plain words: concept markers belong in concept_ids")
        if self.template is not None:
            if self.template.count(CONCEPT_SLOT) != 1 or split_on_markers(self.template)[1]:
                raise ValueError(f"template must have exactly one {CONCEPT_SLOT} slot and no concept markers")


@dataclass
class GairStep:
    alpha: float
    fidelity: float  # mean cosine of previews to the concepts' reference features
    intent: float  # mean cosine of previews to the words-only prompt
    score: float  # what the request's rule maximises over the admitted α (see `choose_alpha`)
    previews: np.ndarray  # uint8 [n, H, W, 3]
    features: np.ndarray | None = field(default=None, repr=False)  # [n, D] normalised CLIP features of previews
    query: np.ndarray | None = field(default=None, repr=False)  # [D] q(α), normalised
    retrieved: list[tuple[str, str | None, float]] = field(default_factory=list)  # q(α)'s top items
    retrieved_fidelity: float = float("nan")  # cosine of the top item to the concepts' reference features
    retrieved_intent: float = float("nan")  # cosine of the top item to the words-only query q(0)
    admitted: bool = True  # passed the rule's gate (``retrieval``: the intent margin)


@dataclass
class GairResult:
    alpha: float
    steps: list[GairStep]
    query: np.ndarray  # [D] the final normalised query
    ranking: list[tuple[str, str | None, float]] = field(default_factory=list)  # (id, uri, score)


def prompts_for(concepts: Sequence[str], parents: Sequence[str], intent: str,
                template: str | None = None) -> tuple[str, str]:
    """(prompt with the tokens and the intent, prompt with the parent words and the intent).

    ``template`` has one ``{concept}`` slot that receives "a <concept:ID> dress" (joined by "and" for
    several concepts) or "a dress"; by default it is "a photo of {concept} <intent>".
    """
    template = template or f"a photo of {CONCEPT_SLOT} {intent}"
    with_tokens = " and ".join(f"a {marker(c)} {p}" for c, p in zip(concepts, parents))
    with_words = " and ".join(f"a {p}" for p in parents)
    fill = lambda phrase: " ".join(template.replace(CONCEPT_SLOT, phrase).split())  # noqa: E731
    return fill(with_tokens), fill(with_words)


class Gair:
    """GAIR over one backbone (with a generator), a set of learned concepts and a gallery index."""

    def __init__(self, backbone: Backbone, concepts: Mapping[str, ConceptToken], index):
        if backbone.generator is None:
            raise ValueError(f"GAIR needs a generator; backbone {backbone.name!r} has none")
        self.backbone, self.concepts, self.index = backbone, concepts, index

    @torch.no_grad()
    def __call__(self, request: GairRequest, should_stop: Callable[[], bool] | None = None) -> GairResult:
        """Run one GAIR request; ``should_stop`` is polled between sampling steps (see `DiffusionGenerator.sample`)."""
        bb = self.backbone
        missing = [c for c in request.concept_ids if c not in self.concepts]
        if missing:
            raise UnknownConceptMarker(missing, known=len(self.concepts))
        chosen = [self.concepts[c] for c in request.concept_ids]
        tok_prompt, _ = prompts_for(request.concept_ids, [c.parent for c in chosen], request.intent,
                                              request.template)
        tokens = {cid: c.vector for cid, c in zip(request.concept_ids, chosen)}
        parents = {cid: bb.word_embedding(c.parent) for cid, c in zip(request.concept_ids, chosen)}

        tok = bb.encode_prompts([tok_prompt], tokens)
        aligned = bb.encode_prompts([tok_prompt], parents)  # the words, at the token's positions
        uncond = bb.encode_prompts([""]).hidden
        protos = F.normalize(torch.stack([c.prototype.float() for c in chosen]).to(uncond.device), dim=-1)

        alphas = [float(request.alpha)] if request.mode == "manual" else [float(a) for a in request.alphas]
        # The whole schedule is one sampling batch, and every α starts from the same noise: previews of
        # different α differ only by their conditioning, so their scores compare the balance, not the luck
        # of the draw (and one batched UNet pass is much faster than one per α).
        n = request.previews
        cond = torch.cat([(a * tok.hidden + (1 - a) * aligned.hidden).expand(n, -1, -1) for a in alphas])
        noise = bb.generator.initial_noise(n, request.seed).repeat(len(alphas), 1, 1, 1)
        u8 = to_uint8(bb.generator.sample(cond, uncond, steps=request.steps, guidance=request.guidance,
                                          noise=noise, should_stop=should_stop))
        feats = F.normalize(bb.encode_image(bb.preprocess(u8)).float(), dim=-1)
        # q(α) from the same prompts and weights as the previews (module docstring), every α run at once.
        weights = torch.tensor(alphas, device=tok.features.device)[:, None]
        queries = F.normalize(weights * tok.features.float() + (1 - weights) * aligned.features.float(), dim=-1)
        f_words = F.normalize(aligned.features.float(), dim=-1)[0]
        queries_np = queries.cpu().numpy().astype(np.float32)
        found = self.index.search(queries_np, max(1, request.top_k)) if len(self.index) else None
        steps = []
        for i, a in enumerate(alphas):
            f = feats[i * n: (i + 1) * n]
            step = GairStep(a, float((f @ protos.T).mean()), float((f @ f_words).mean()), 0.0, u8[i * n: (i + 1) * n],
                            f.cpu().numpy(), queries_np[i])
            if found is not None and found.ids[i]:
                step.retrieved = list(zip(found.ids[i], found.uris[i], [float(x) for x in found.scores[i]]))
                top = torch.from_numpy(self.index.vectors_of(found.ids[i][:1])).to(protos.device)[0]
                step.retrieved_fidelity = float((protos @ top).mean())
                step.retrieved_intent = float(top @ f_words)
            steps.append(step)
        best, scores, admitted = choose_alpha(steps, request.rule, request.intent_margin)
        for step, score, ok in zip(steps, scores, admitted):  # the trace shows the evidence of its own rule
            step.score, step.admitted = float(score), bool(ok)
        alpha = steps[best].alpha
        q = queries[best]
        if request.expand > 0:
            previews = feats[best * n: (best + 1) * n]
            if request.expand_with is not None:
                if any(not 0 <= i < len(previews) for i in request.expand_with):
                    raise ValueError(f"expand_with names previews outside 0..{len(previews) - 1}")
                previews = previews[list(request.expand_with)]
            q = F.normalize(q + request.expand * previews.mean(0), dim=-1)
            q = q.cpu().numpy().astype(np.float32)
            return GairResult(alpha, steps, q, self.retrieve(q, request.top_k))
        return GairResult(alpha, steps, queries_np[best], steps[best].retrieved[: request.top_k])

    def retrieve(self, query: np.ndarray, k: int) -> list[tuple[str, str | None, float]]:
        res = self.index.search(query[None], k)
        return list(zip(res.ids[0], res.uris[0], [float(s) for s in res.scores[0]]))


def choose_alpha(steps: Sequence[GairStep], rule: str = "retrieval",
                 intent_margin: float = DEFAULT_INTENT_MARGIN) -> tuple[int, np.ndarray, np.ndarray]:
    """(index of the step ``auto`` keeps, each step's score, each step's admission) under ``rule`` (`RULES`).

    A pure function of the steps' evidence (it changes nothing), so the evaluation can score every rule on
    one set of previews. Ties go to the larger α (the more specific query)."""
    if rule == "previews":
        fid = np.array([s.fidelity for s in steps])
        inten = np.array([s.intent for s in steps])
        score = 0.5 * (_minmax(fid) + _minmax(inten))
        admitted = np.ones(len(steps), bool)
    elif rule == "retrieval":
        fid = np.array([s.retrieved_fidelity for s in steps])
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
