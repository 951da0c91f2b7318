"""Generation Aided Image Retrieval (GAIR).

A user wants concept c with an intent ("on the beach"). Words alone find the intent but not the item;
the token alone finds the item but can swamp the intent. GAIR balances the two at inference time:

    q(α) = normalize(α · T(prompt with the token and the intent) + (1 − α) · T(prompt with the parent word
           and the intent))

For each α of a schedule it *shows* what the query means: previews generated under the same balance
(the UNet conditioned on α·H_token + (1 − α)·H_words, with the parent word's embedding standing in for the
token so the two hidden-state sequences align position by position), scored for concept fidelity
(similarity to the concept's reference image features) and intent satisfaction (similarity to the
words-only prompt). ``auto`` keeps the α whose previews balance both best; ``manual`` takes the caller's
α. Retrieval uses q(α*), optionally expanded with the chosen previews' image features. Every step's
previews and scores are returned, so a person can see why.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from factory.backbones import Backbone
from factory.errors import MalformedMarker, UnknownConceptMarker
from factory.figures import to_uint8
from factory.tokens import marker, split_on_markers
from schemas import CONCEPT_SLOT

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


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

    def __post_init__(self):
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
    score: float  # the balance `auto` maximises (fidelity and intent min-max normalised over the schedule)
    previews: np.ndarray  # uint8 [n, H, W, 3]
    features: np.ndarray | None = field(default=None, repr=False)  # [n, D] normalised CLIP features of previews


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
        """Run one GAIR request; ``should_stop`` is polled between sampling steps (see `Generator.sample`)."""
        bb = self.backbone
        missing = [c for c in request.concept_ids if c not in self.concepts]
        if missing:
            raise UnknownConceptMarker(missing, known=len(self.concepts))
        chosen = [self.concepts[c] for c in request.concept_ids]
        tok_prompt, word_prompt = prompts_for(request.concept_ids, [c.parent for c in chosen], request.intent,
                                              request.template)
        tokens = {cid: c.vector for cid, c in zip(request.concept_ids, chosen)}
        parents = {cid: bb.word_embedding(c.parent) for cid, c in zip(request.concept_ids, chosen)}

        tok = bb.encode_prompts([tok_prompt], tokens)
        words = bb.encode_prompts([word_prompt])
        aligned = bb.encode_prompts([tok_prompt], parents)  # the words, at the token's positions
        uncond = bb.encode_prompts([""]).hidden
        f_tok, f_words = F.normalize(tok.features, dim=-1)[0], F.normalize(words.features, dim=-1)[0]
        protos = F.normalize(torch.stack([c.prototype.float() for c in chosen]).to(f_tok.device), dim=-1)

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
        raw = []
        for i, a in enumerate(alphas):
            f = feats[i * n: (i + 1) * n]
            raw.append((a, float((f @ protos.T).mean()), float((f @ f_words).mean()), u8[i * n: (i + 1) * n], f))
        steps = _score(raw)
        best = max(range(len(steps)), key=lambda i: (steps[i].score, steps[i].alpha))
        alpha = steps[best].alpha
        q = F.normalize(alpha * f_tok + (1 - alpha) * f_words, dim=-1)
        if request.expand > 0:
            previews = raw[best][4]
            if request.expand_with is not None:
                if any(not 0 <= i < len(previews) for i in request.expand_with):
                    raise ValueError(f"expand_with names previews outside 0..{len(previews) - 1}")
                previews = previews[list(request.expand_with)]
            q = F.normalize(q + request.expand * previews.mean(0), dim=-1)
        q = q.cpu().numpy().astype(np.float32)
        return GairResult(alpha, steps, q, self.retrieve(q, request.top_k))

    def retrieve(self, query: np.ndarray, k: int) -> list[tuple[str, str | None, float]]:
        res = self.index.search(query[None], k)
        return list(zip(res.ids[0], res.uris[0], [float(s) for s in res.scores[0]]))


def _score(raw) -> list[GairStep]:
    """Min-max normalise fidelity and intent over the schedule; the score is their mean."""
    fid = np.array([r[1] for r in raw])
    inten = np.array([r[2] for r in raw])

    def norm(x):
        span = x.max() - x.min()
        return (x - x.min()) / span if span > 1e-8 else np.full_like(x, 0.5)

    score = 0.5 * (norm(fid) + norm(inten))
    return [GairStep(r[0], r[1], r[2], float(s), r[3], r[4].cpu().numpy()) for r, s in zip(raw, score)]
