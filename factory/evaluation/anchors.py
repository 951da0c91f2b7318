"""Two published ways to teach CLIP a concept, learned here as the evaluation's anchors.

Both learn from the same few-shot image features (`factory.learner.ConceptData`, extracted once) and the
same frozen backbone as the method's tokens, for every concept in one batched call.

``polar``  POLAR (CVPR 2025, ``adobe-research/polar-vl``): no token. Each concept is a rank-1 update
           u vᵀ of the value projection of the text encoder's *last* attention layer (2·w numbers, w the
           text width), queried with a fixed word ("a photo of sks dress": the same word for every
           concept, the concept's update applied). Learned with the repository's defaults: an MSE between
           the normalised text feature of a prompt naming the fixed word and the parent and a normalised
           image feature of the concept (one prompt per image), plus λ·mean(u²), λ = 0.1; Adam, lr 1e-3,
           500 iterations; u starts at 0, v at a Kaiming-uniform draw and is kept at unit norm. Two
           departures, both said here: (1) the prompts are the learner's templates
           (`factory.tokens.prompts.DEFAULT_TEMPLATES`, cycled over a concept's images) rather than
           PALAVRA's list sampled at random; (2) the repository trains through head-*averaged* attention
           weights (``nn.MultiheadAttention``'s default) but evaluates through the per-head ones; here
           both use the exact per-head attention, so what is learned is what is queried. Where the
           backbone's vocabulary lacks "sks" (the embedded, trimmed ones), the fixed word is a marker
           whose vector is one fixed pseudo-word (a seeded random direction at the vocabulary's mean
           norm): meaningless and the same for every concept, which is all POLAR asks of it.
``palavra_ft``  PALAVRA's second stage (Cohen et al., ECCV 2022, ``NVlabs/PALAVRA`` ``fsl_eval.py``):
           a free token, here started from the parent word's embedding (PALAVRA starts from its set
           encoder's guess, which is not reproduced), optimised so that the CLIP text feature of "a photo
           of a <token> <parent>" matches the mean of the concept's normalised image features under
           PALAVRA's contrastive loss (NT-Xent, temperature 0.25) with the other concepts of the call
           (texts and images) as the negatives; Adam, lr 0.01, 30 steps (PALAVRA's latent_lr and the
           30 epochs ConCon-Chi runs it with, one step per epoch). With a single concept there is no
           negative and the token stays the parent word.

How the value update stays cheap: the last layer's attention *probabilities* do not depend on the
value matrix, and everything after the attention is per position, so a concept's feature depends on
its update only through the end-of-text row. Per prompt, `_LastLayer.split` keeps that row's residual
input and, per head h, c_h = Σ_j p_h[j] · LN₁(x_j) (the attention-weighted inputs of the values); the
head's output is then (W_v + u vᵀ)_h c_h + b_{v,h}, and the rest (out-projection, MLP, final norm,
projection) is a few small matmuls, and the text transformer runs once per prompt. Measured on the
embedded backbone (fashion-mini), 30 concepts of 5 images on one CPU thread: polar 2.2 s in all (500
steps), palavra_ft 2.2 s (30 steps through the whole text encoder), about 0.07 s per concept each.
"""

from __future__ import annotations

import math
import time
import zlib
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from factory.backbones import Backbone
from factory.errors import ConfigError
from factory.evaluation.metrics import tie_aware_hits
from factory.learner import ConceptData
from factory.tokens import marker
from factory.tokens.injection import inject
from factory.tokens.prompts import DEFAULT_TEMPLATES, template_prompts

ANCHORS = ("polar", "palavra_ft")
POLAR_MARKER_ID = "polar-sks"  # the marker the fixed word is written as (`PolarAnchor.concept_word`)
PSEUDO_WORD_SEED = 20250611  # the fixed pseudo-word where the vocabulary lacks the fixed word
BATCH = 256


@dataclass
class PolarSettings:
    steps: int = 500
    lr: float = 1e-3
    reg: float = 0.1  # λ of λ·mean(u²)
    word: str = "sks"  # the fixed word every concept's queries say
    seed: int = 123  # POLAR's seed; each concept's v is drawn from (seed, its id), whatever it is batched with
    templates: tuple[str, ...] = DEFAULT_TEMPLATES

    def __post_init__(self):
        if self.steps < 0 or self.lr <= 0 or self.reg < 0:
            raise ConfigError(f"polar needs steps >= 0, lr > 0 and reg >= 0, got {self.steps}, {self.lr}, {self.reg}")
        if not self.word.strip() or len(self.word.split()) != 1:
            raise ConfigError(f"polar's fixed word must be one word, got {self.word!r}")
        self.templates = tuple(self.templates)


@dataclass
class PalavraSettings:
    steps: int = 30
    lr: float = 0.01
    temperature: float = 0.25
    template: str = "a photo of a {concept} {parent}"

    def __post_init__(self):
        if self.steps < 0 or self.lr <= 0 or self.temperature <= 0:
            raise ConfigError(
                f"palavra_ft needs steps >= 0, lr > 0 and temperature > 0, got {self.steps}, "
                f"{self.lr}, {self.temperature}"
            )
        if "{concept}" not in self.template:
            raise ConfigError(f"palavra_ft's template needs a {{concept}} slot: {self.template!r}")


@dataclass
class Anchor:
    """A learned anchor: what stands for a concept in a prompt, and how such prompts are encoded."""

    name: str
    seconds: float = 0.0  # learning, wall clock, for all its concepts
    n_concepts: int = 0
    settings: dict = field(default_factory=dict)

    @property
    def seconds_per_concept(self) -> float:
        return self.seconds / self.n_concepts if self.n_concepts else float("nan")

    @property
    def tokens(self) -> dict[str, torch.Tensor] | None:
        """Concept id -> token vector, for an anchor that is a token (None: it is not one)."""
        return None

    def concept_word(self, concept_id: str) -> str:
        raise NotImplementedError

    def text_features(self, backbone: Backbone, prompts: Sequence[str], concept_ids: Sequence[str]) -> torch.Tensor:
        """Normalised text features [len(prompts), D] (CPU) of ``prompts``, each about ``concept_ids[i]``."""
        raise NotImplementedError

    def summary(self) -> dict:
        return {
            "seconds": self.seconds,
            "seconds_per_concept": self.seconds_per_concept,
            "n_concepts": self.n_concepts,
            "has_token": self.tokens is not None,
            "settings": self.settings,
        }


@dataclass
class TokenAnchor(Anchor):
    """An anchor that is a token per concept, written as the concept's marker (`factory.tokens`)."""

    vectors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def tokens(self) -> dict[str, torch.Tensor]:
        return self.vectors

    def concept_word(self, concept_id: str) -> str:
        return marker(concept_id)

    @torch.no_grad()
    def text_features(self, backbone, prompts, concept_ids):
        out = [
            backbone.encode_prompts(list(prompts[i : i + BATCH]), self.vectors).features.float()
            for i in range(0, len(prompts), BATCH)
        ]
        return F.normalize(torch.cat(out), dim=-1).cpu()


@dataclass
class PolarAnchor(Anchor):
    """POLAR's rank-1 value updates: concept id -> (u, v), v of unit norm; the update is u vᵀ."""

    u: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)
    word_vector: torch.Tensor | None = None  # what the fixed word's marker injects

    def concept_word(self, concept_id: str) -> str:
        return marker(POLAR_MARKER_ID)

    @torch.no_grad()
    def text_features(self, backbone, prompts, concept_ids):
        if len(prompts) != len(concept_ids):
            raise ConfigError(f"{len(prompts)} prompts but {len(concept_ids)} concept ids")
        missing = sorted(set(concept_ids) - set(self.u))
        if missing:
            raise ConfigError(f"polar has no update for concept(s) {', '.join(missing)}: learn them first")
        layer, out = _LastLayer(backbone), []
        for i in range(0, len(prompts), BATCH):
            ids = list(concept_ids[i : i + BATCH])
            h, ctx = layer.split(list(prompts[i : i + BATCH]), {POLAR_MARKER_ID: self.word_vector})
            u = torch.stack([self.u[c] for c in ids]).to(h.device)
            v = torch.stack([self.v[c] for c in ids]).to(h.device)
            out.append(layer.finish(layer.base(h, ctx), ctx, u, v).float())
        return F.normalize(torch.cat(out), dim=-1).cpu()


class _LastLayer:
    """The last layer of a backbone's text transformer, split where a value-matrix update enters.

    ``split`` runs the prompts up to that layer and returns, at each end-of-text position, the residual
    input h [B, w] and the per-head attention-weighted normalised inputs c [B, H, w]; ``finish`` maps
    them, with updates u vᵀ of the value projection, to text features, exactly as the backbone's own
    forward pass would with the updated weights (the evaluation's tests check both families).
    """

    def __init__(self, backbone: Backbone):
        from factory.backbones.hf_clip import HFClipBackbone
        from factory.backbones.open_clip_backbone import OpenClipBackbone

        self.backbone = backbone
        if isinstance(backbone, HFClipBackbone):
            self._hf(backbone)
        elif isinstance(backbone, OpenClipBackbone):
            self._open_clip(backbone)
        else:
            raise ConfigError(
                f"polar needs the text transformer's last layer, which it reads for the HF and "
                f"open_clip families only; backbone {backbone.name!r} is a {type(backbone).__name__}"
            )
        w = backbone.token_dim
        if w % self.heads:
            raise ConfigError(f"text width {w} is not a multiple of the {self.heads} heads")
        self.width, self.head_dim = w, w // self.heads

    def _hf(self, backbone) -> None:
        from transformers.masking_utils import create_causal_mask

        tm = backbone.clip.text_model
        last = tm.encoder.layers[-1]
        att = last.self_attn

        def prefix(emb: torch.Tensor) -> torch.Tensor:
            # `HFClipBackbone.text_transformer` up to (not through) the last layer
            h = tm.embeddings(inputs_embeds=emb)
            mask = create_causal_mask(config=tm.config, inputs_embeds=h, attention_mask=None, past_key_values=None)
            for layer in tm.encoder.layers[:-1]:
                h = layer(h, mask, is_causal=True)
            return h

        self.prefix, self.ln1, self.heads, self.scale = prefix, last.layer_norm1, att.num_heads, float(att.scale)
        self.q = (att.q_proj.weight, att.q_proj.bias)
        self.k = (att.k_proj.weight, att.k_proj.bias)
        self.v = (att.v_proj.weight, att.v_proj.bias)
        self.out = att.out_proj
        self.ls1 = nn.Identity()
        self.tail = lambda x: backbone.clip.text_projection(tm.final_layer_norm(x + last.mlp(last.layer_norm2(x))))

    def _open_clip(self, backbone) -> None:
        c = backbone.clip
        blocks, nld = c.transformer.resblocks, c.transformer.batch_first
        last = blocks[-1]
        att = last.attn
        if not isinstance(att, nn.MultiheadAttention) or not att._qkv_same_embed_dim or hasattr(last, "ln_1_kv"):
            raise ConfigError(
                f"polar reads open_clip's nn.MultiheadAttention; backbone {backbone.name!r}'s last "
                f"text block uses {type(att).__name__}"
            )

        def prefix(emb: torch.Tensor) -> torch.Tensor:
            # `OpenClipBackbone.text_transformer` up to (not through) the last block
            x = emb.to(c.transformer.get_cast_dtype()) + c.positional_embedding.to(emb.dtype)
            x = x if nld else x.transpose(0, 1)
            for block in blocks[:-1]:
                x = block(x, attn_mask=c.attn_mask)
            return x if nld else x.transpose(0, 1)

        def project(x: torch.Tensor) -> torch.Tensor:
            if isinstance(c.text_projection, nn.Linear):
                return c.text_projection(x)
            return x if c.text_projection is None else x @ c.text_projection

        w = att.embed_dim
        self.prefix, self.ln1, self.heads = prefix, last.ln_1, att.num_heads
        self.scale = (w // att.num_heads) ** -0.5
        weights = att.in_proj_weight.split(w)
        biases = att.in_proj_bias.split(w) if att.in_proj_bias is not None else (None,) * 3
        self.q, self.k, self.v = zip(weights, biases)
        self.out = att.out_proj
        self.ls1 = last.ls_1
        self.tail = lambda x: project(c.ln_final(x + last.ls_2(last.mlp(last.ln_2(x)))))

    def split(self, prompts: Sequence[str], tokens: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(h [B, w], c [B, H, w]) at each prompt's end of text (see the class)."""
        b = self.backbone
        batch = b.tokenize(list(prompts)).to(b.device)
        emb = inject(b.token_embedding(batch.input_ids), batch, b.lookup(batch.concept_ids, tokens))
        h = self.prefix(emb)
        rows, eot = torch.arange(h.shape[0], device=h.device), batch.eot_positions.to(h.device)
        x = self.ln1(h)
        n, length = x.shape[:2]
        q = F.linear(x[rows, eot], *self.q).view(n, self.heads, self.head_dim)
        k = F.linear(x, *self.k).view(n, length, self.heads, self.head_dim)
        logits = torch.einsum("bhd,bjhd->bhj", q, k) * self.scale
        future = torch.arange(length, device=h.device)[None, :] > eot[:, None]  # causal: the eot row sees <= eot
        logits = logits.masked_fill(future[:, None, :], float("-inf"))
        p = torch.softmax(logits.float(), dim=-1).to(x.dtype)
        return h[rows, eot], torch.einsum("bhj,bji->bhi", p, x)

    def base(self, h: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """The residual stream after the unchanged attention, at the end of text: h + attention."""
        wv, bv = self.v
        heads = torch.einsum("...hi,hdi->...hd", ctx, wv.view(self.heads, self.head_dim, self.width))
        if bv is not None:
            heads = heads + bv.view(self.heads, self.head_dim)
        return h + self.ls1(self.out(heads.reshape(*heads.shape[:-2], self.width)))

    def finish(self, base: torch.Tensor, ctx: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Text features (not normalised) with the value update u vᵀ: ``base`` from `base`, ``ctx`` [..., H, w],
        ``u``, ``v`` [..., w] (broadcast against ``ctx``'s leading dimensions)."""
        s = torch.einsum("...hi,...i->...h", ctx, v)  # (v · c_h) per head
        delta = s[..., None] * u.reshape(*u.shape[:-1], self.heads, self.head_dim)
        delta = F.linear(delta.reshape(*delta.shape[:-2], self.width), self.out.weight)  # no bias: it is in base
        return self.tail(base + self.ls1(delta))


def _concept_seed(seed: int, concept_id: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(concept_id.encode())) % (2**63)


def _unit_images(d: ConceptData) -> torch.Tensor:
    if d.image_features is None or len(d.image_features) == 0:
        raise ConfigError(f"concept {d.concept_id!r} has no image features to learn an anchor from")
    return F.normalize(d.image_features.float(), dim=-1)


def fixed_word_vector(backbone: Backbone, word: str) -> torch.Tensor:
    """The embedding the fixed word's marker injects: the word's own where the vocabulary has it (the
    prompt is then exactly the one with the word), else a fixed pseudo-word (see the module)."""
    try:
        return backbone.word_embedding(word).detach().float().cpu()
    except KeyError:  # UnknownWord: a trimmed vocabulary
        g = torch.Generator().manual_seed(PSEUDO_WORD_SEED)
        direction = F.normalize(torch.randn(backbone.token_dim, generator=g), dim=0)
        return direction * backbone.vocab_mean_norm


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list[torch.Tensor]) -> None:
    # Gradients of the parameters only: the frozen backbone may have requires_grad weights (a caller's
    # choice), and backward() would fill and keep their .grad for nothing.
    for p, g in zip(params, torch.autograd.grad(loss, params)):
        p.grad = g
    opt.step()


def learn_polar(backbone: Backbone, data: Sequence[ConceptData], settings: PolarSettings | None = None) -> PolarAnchor:
    """POLAR's update for every concept of ``data`` in one batched optimisation (see the module).

    Each concept's loss depends only on its own (u, v), and Adam is per coordinate, so a concept learns
    the same update whatever it is batched with."""
    s = settings or PolarSettings()
    t0 = time.perf_counter()
    if not data:
        raise ConfigError("polar: no concepts to learn")
    layer, dev = _LastLayer(backbone), backbone.device
    word = fixed_word_vector(backbone, s.word)
    phrase = marker(POLAR_MARKER_ID)
    images = [_unit_images(d) for d in data]
    n_max, w = max(len(x) for x in images), backbone.token_dim
    # Prompt of image i of a concept: template i (cycled) with the fixed word and the concept's parent.
    prompts = [
        [
            " ".join(s.templates[i % len(s.templates)].format(concept=phrase, parent=d.parent).split())
            for i in range(len(x))
        ]
        for d, x in zip(data, images)
    ]
    unique = sorted({p for ps in prompts for p in ps})
    with torch.no_grad():
        h, ctx = layer.split(unique, {POLAR_MARKER_ID: word})
        base = layer.base(h, ctx)
    where = {p: i for i, p in enumerate(unique)}
    k = len(data)
    index = torch.zeros(k, n_max, dtype=torch.long)
    mask = torch.zeros(k, n_max)
    target = torch.zeros(k, n_max, images[0].shape[1])
    for j, (ps, x) in enumerate(zip(prompts, images)):
        index[j, : len(ps)] = torch.tensor([where[p] for p in ps])
        mask[j, : len(ps)] = 1.0
        target[j, : len(ps)] = x
    index, mask, target = index.to(dev), mask.to(dev), target.to(dev)
    ctx_k, base_k = ctx[index], base[index]  # [K, N, H, w], [K, N, w]

    bound = 1.0 / math.sqrt(w)  # nn.init.kaiming_uniform_(a=√5) on a [1, w] matrix, as POLAR draws v
    v0 = [
        (torch.rand(w, generator=torch.Generator().manual_seed(_concept_seed(s.seed, d.concept_id))) * 2 - 1) * bound
        for d in data
    ]
    u = torch.zeros(k, w, device=dev, requires_grad=True)
    v = torch.stack(v0).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([u, v], lr=s.lr)
    for _ in range(s.steps):
        opt.zero_grad(set_to_none=True)
        y = F.normalize(layer.finish(base_k, ctx_k, u[:, None], F.normalize(v, dim=-1)[:, None]).float(), dim=-1)
        err = ((y - target) ** 2).mean(-1)  # POLAR's MSE: the mean over a pair's coordinates
        fit = (err * mask).sum(1) / mask.sum(1)  # and over the concept's pairs
        # Summed over concepts (not averaged), so each concept's gradient is what it would be alone.
        _step(opt, (fit + s.reg * (u**2).mean(1)).sum(), [u, v])
    u_out, v_out = u.detach().cpu(), F.normalize(v.detach(), dim=-1).cpu()
    return PolarAnchor(
        "polar",
        time.perf_counter() - t0,
        k,
        asdict(s),
        u={d.concept_id: u_out[j] for j, d in enumerate(data)},
        v={d.concept_id: v_out[j] for j, d in enumerate(data)},
        word_vector=word,
    )


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """PALAVRA's contrastive loss: rows a_i and b_i [K, D] are positives, every other row of both is a
    negative (SimCLR's NT-Xent over the 2K rows), mean over the 2K anchors."""
    z = F.normalize(torch.cat([a, b]), dim=-1)
    sim = (z @ z.T) / temperature
    n = a.shape[0]
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=sim.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(sim.device)
    return F.cross_entropy(sim, positives)


def learn_palavra(
    backbone: Backbone, data: Sequence[ConceptData], settings: PalavraSettings | None = None
) -> TokenAnchor:
    """PALAVRA's second stage for every concept of ``data`` at once (see the module); the concepts are
    each other's negatives, so unlike POLAR a token depends on the concepts it is learned with."""
    s = settings or PalavraSettings()
    t0 = time.perf_counter()
    if not data:
        raise ConfigError("palavra_ft: no concepts to learn")
    dev = backbone.device
    means = F.normalize(torch.stack([_unit_images(d).mean(0) for d in data]), dim=-1).to(dev)
    batch = backbone.tokenize(
        [" ".join(s.template.format(concept=marker(d.concept_id), parent=d.parent).split()) for d in data]
    ).to(dev)
    start = {d.concept_id: backbone.word_embedding(d.parent).detach().float() for d in data}
    vectors = torch.stack([start[c] for c in batch.concept_ids]).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([vectors], lr=s.lr)
    for _ in range(s.steps if len(data) > 1 else 0):  # one concept: no negative, nothing to learn
        opt.zero_grad(set_to_none=True)
        text = backbone.encode_text(batch, vectors).features.float()
        _step(opt, nt_xent(means, text, s.temperature), [vectors])
    out = vectors.detach().cpu()
    return TokenAnchor(
        "palavra_ft",
        time.perf_counter() - t0,
        len(data),
        asdict(s),
        vectors={c: out[i] for i, c in enumerate(batch.concept_ids)},
    )


LEARNERS: dict[str, Callable[..., Anchor]] = {"polar": learn_polar, "palavra_ft": learn_palavra}


@dataclass
class AnchorSettings:
    """Which anchors the evaluation learns, and their settings."""

    methods: tuple[str, ...] = ANCHORS
    polar: PolarSettings = field(default_factory=PolarSettings)
    palavra_ft: PalavraSettings = field(default_factory=PalavraSettings)

    def __post_init__(self):
        self.methods = tuple(self.methods)
        unknown = [m for m in self.methods if m not in LEARNERS]
        if unknown:
            raise ConfigError(f"unknown anchor(s) {unknown}: choose among {list(LEARNERS)}")
        if isinstance(self.polar, dict):
            self.polar = PolarSettings(**self.polar)
        if isinstance(self.palavra_ft, dict):
            self.palavra_ft = PalavraSettings(**self.palavra_ft)


def learn_anchors(
    backbone: Backbone, data: Sequence[ConceptData], settings: AnchorSettings | None = None
) -> dict[str, Anchor]:
    """Every anchor of ``settings.methods``, learned on ``data``; name -> anchor."""
    s = settings or AnchorSettings()
    return {m: LEARNERS[m](backbone, data, getattr(s, m)) for m in s.methods}


def anchor_accuracy(
    backbone: Backbone,
    anchor: Anchor,
    concepts: Sequence[tuple[str, str]],
    heldout: Mapping[str, torch.Tensor],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> tuple[float, dict[str, float]]:
    """`factory.evaluation.metrics.heldout_accuracy` for an anchor: each concept's class embedding is the
    mean of its template prompts' normalised features, encoded as the anchor encodes that concept."""
    by_parent: dict[str, list[str]] = defaultdict(list)
    for cid, parent in concepts:
        by_parent[parent].append(cid)
    per_concept, hits, total = {}, 0.0, 0
    for parent, ids in by_parent.items():
        prompts = [template_prompts(anchor.concept_word(c), parent, templates) for c in ids]
        feats = anchor.text_features(backbone, [p for ps in prompts for p in ps], [c for c in ids for _ in templates])
        emb = F.normalize(feats.view(len(ids), len(templates), -1).mean(1), dim=-1)
        for j, cid in enumerate(ids):
            x = heldout.get(cid)
            if x is None or len(x) == 0:
                continue
            correct = float(tie_aware_hits(F.normalize(x.float(), dim=-1) @ emb.T, j).sum())
            per_concept[cid] = correct / len(x)
            hits, total = hits + correct, total + len(x)
    return (hits / total if total else float("nan")), per_concept


def anchor_query_features(backbone: Backbone, anchor: Anchor, queries) -> torch.Tensor:
    """Normalised features [Q, D] of each retrieval query (`schemas.RetrievalQuery`) with the anchor's
    concept word in its slot ("a <word> dress on the beach"), the words of every other method's query."""
    prompts = [q.text(f"a {anchor.concept_word(q.concept_id)} {q.parent}") for q in queries]
    return anchor.text_features(backbone, prompts, [q.concept_id for q in queries])


__all__ = [
    "ANCHORS",
    "Anchor",
    "AnchorSettings",
    "LEARNERS",
    "POLAR_MARKER_ID",
    "PalavraSettings",
    "PolarAnchor",
    "PolarSettings",
    "TokenAnchor",
    "anchor_accuracy",
    "anchor_query_features",
    "fixed_word_vector",
    "learn_anchors",
    "learn_palavra",
    "learn_polar",
    "nt_xent",
]
