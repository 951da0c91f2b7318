"""Learn C concept tokens at once from precomputed image features and latents.

One coefficient tensor [C, k] (or [C, d] for free tokens), one text-encoder batch holding the step's
prompts (T templates, or ``templates_per_step`` sampled ones, per concept still learning), one UNet batch
for the TI samples of those concepts. The frozen models run once per step for the whole group, which is
where the speed over one-concept-at-a-time textual inversion comes from; a concept that stops early
(``patience``) leaves both batches, so stopping saves compute rather than only freezing the token.

Determinism: each concept draws its TI samples and templates from its own generators, seeded from (seed,
concept id), and the objective is a *sum* of per-concept losses (`factory.objective`), so with Adam a
concept learns the same token, and stops at the same step, whether it is learned alone or beside others
(up to float rounding in batched kernels). The exception is the image-side CE (``weights.image_ce``),
which couples a group by design; concepts that stopped stay in it as fixed competitors.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from factory.backbones import Backbone
from factory.errors import DimensionMismatch, EmptyImageSet, NonFiniteLoss
from factory.losses import LossWeights, text_side_ce
from factory.objective import concept_seed, draw_ti_samples, objective_terms, ti_weights
from factory.tokens import Subspace, TokenParameters, build_subspace, get_vocabulary, marker, vocabulary_for_parent
from factory.tokens.prompts import DEFAULT_TEMPLATES

log = logging.getLogger(__name__)

@dataclass
class LearnerConfig:
    steps: int = 200
    lr: float = 0.01
    weights: LossWeights = field(default_factory=LossWeights)
    parametrization: str = "projected"  # or "free" (the ablation)
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    ti_samples: int = 2  # TI (latent, noise, t) samples per concept per step
    # Templates encoded per concept per step, sampled from the concept's own generator (0: all of them).
    # The text encoder runs on C × this many prompts instead of C × T: the CE terms see a fresh subset
    # each step (as the diffusers TI example samples one template per image) at 1/T of the cost.
    templates_per_step: int = 0
    # TI samples per concept that measure its gradient when λ_TI is calibrated (`LossWeights.ti_balance`),
    # once, before the first step. One draw is too noisy; with few steps (early stopping) and one TI sample
    # per step, 8 of them are a large share of a concept's UNet work, hence a setting.
    calibration_samples: int = 8
    patience: int = 0  # early stopping: steps without improvement of the loss EMA; 0 disables
    min_delta: float = 1e-4
    ema: float = 0.9  # smoothing of the per-concept loss used for early stopping and reported losses
    seed: int = 0
    vocabulary: str | None = None  # attribute vocabulary name; None: chosen by parent word
    rank_tol: float = 1e-4
    log_every: int = 50
    # Memory (a GPU at production size): the TI term's UNet samples in micro-batches of this many, each
    # backpropagated to the text states on its own (0: all C × ti_samples in one call; the token is the
    # same either way), and UNet gradient checkpointing (recompute activations in the backward pass).
    ti_micro_batch: int = 0
    gradient_checkpointing: bool = False
    # Bound each token's norm to this multiple of the vocabulary's mean word norm (0: unbounded). A token
    # far longer than any word dominates every prompt it is in, which is what breaks composition.
    max_norm_ratio: float = 0.0

    def __post_init__(self):
        if self.parametrization not in ("projected", "free"):
            raise ValueError(f"parametrization must be 'projected' or 'free', got {self.parametrization!r}")
        if isinstance(self.weights, dict):
            self.weights = LossWeights(**self.weights)
        self.templates = tuple(self.templates)
        if self.ti_micro_batch < 0:
            raise ValueError(f"ti_micro_batch must be >= 0 (0: one batch), got {self.ti_micro_batch}")
        if not 0 <= self.templates_per_step <= len(self.templates):
            raise ValueError(f"templates_per_step must be in [0, {len(self.templates)}] (0: all), "
                             f"got {self.templates_per_step}")
        if self.calibration_samples < 1:
            raise ValueError(f"calibration_samples must be >= 1, got {self.calibration_samples}")
        if self.max_norm_ratio < 0:
            raise ValueError(f"max_norm_ratio must be >= 0 (0: unbounded), got {self.max_norm_ratio}")


@dataclass
class ConceptData:
    """What the learner needs of one concept: normalised-or-not image features and optional latents."""

    concept_id: str
    parent: str
    image_features: torch.Tensor  # [n, D]
    latents: torch.Tensor | None = None  # [n, c, h, w] in the UNet's input space


@dataclass
class NegativeBank:
    """Image features of a parent class; rows owned by the concept being learned are masked out."""

    features: torch.Tensor  # [m, D]
    owners: list[str]  # concept id of each row ("" for distractors owned by no concept)


@dataclass
class LearnedToken:
    concept_id: str
    parent: str
    vector: torch.Tensor  # [d]
    parametrization: str
    coefficients: list[float] | None
    basis_id: str | None
    metrics: dict[str, float]
    prototype: torch.Tensor | None = None  # [D] mean normalised image feature of the concept


def subspaces_for(backbone: Backbone, parents: Sequence[str], vocabulary: str | None = None,
                  rank_tol: float = 1e-4) -> dict[str, Subspace]:
    """One subspace per distinct parent word (shared by every concept of that parent)."""
    out = {}
    for p in dict.fromkeys(parents):
        vocab = get_vocabulary(vocabulary) if vocabulary else vocabulary_for_parent(p)
        with torch.no_grad():
            out[p] = build_subspace(backbone.word_embedding, vocab, p, rank_tol=rank_tol,
                                    salt=backbone.fingerprint())
    return out


def _pad(rows: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(1, max(r.shape[0] for r in rows))
    out = torch.zeros(len(rows), n, rows[0].shape[-1], device=device)
    mask = torch.zeros(len(rows), n, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return out, mask


def _validate(backbone: Backbone, concepts: Sequence[ConceptData], config: LearnerConfig, embed_dim: int):
    if not concepts:
        raise EmptyImageSet("no concepts to learn")
    if len({c.concept_id for c in concepts}) != len(concepts):
        raise ValueError("duplicate concept ids in one learning call")
    for c in concepts:
        if c.image_features is None or c.image_features.shape[0] == 0:
            raise EmptyImageSet(f"concept {c.concept_id!r} has no images: give it at least one valid image")
        if c.image_features.shape[-1] != embed_dim:
            raise DimensionMismatch(
                f"concept {c.concept_id!r}: image features of dimension {c.image_features.shape[-1]}, but "
                f"backbone {backbone.name!r} has a CLIP space of dimension {embed_dim}: encode with this backbone"
            )
        if config.weights.ti > 0 and (c.latents is None or c.latents.shape[0] == 0):
            raise ValueError(f"concept {c.concept_id!r} has no latents but the TI loss is on (weights.ti > 0)")
    if config.weights.ti > 0 and backbone.generator is None:
        raise ValueError(f"backbone {backbone.name!r} has no generator: set weights.ti = 0")


@dataclass
class _Group:
    """The concepts learned together and their tensors; row i of each tensor is concept i."""

    concepts: list[ConceptData]
    pos: torch.Tensor  # [C, N, D] normalised own-image features, ``pos_mask`` [C, N] valid rows
    pos_mask: torch.Tensor
    neg: torch.Tensor  # [C, M, D] the parent's negative bank less the concept's own rows
    neg_mask: torch.Tensor
    init: torch.Tensor  # [C, d] the parent words' embeddings
    gens: list[torch.Generator]  # TI samples, one generator per concept
    template_gens: list[torch.Generator]  # sampled templates (apart, so TI samples do not depend on them)

    def take(self, idx: list[int]) -> "_Group":
        t = torch.as_tensor(idx, dtype=torch.long, device=self.pos.device)
        return _Group([self.concepts[i] for i in idx], self.pos[t], self.pos_mask[t], self.neg[t],
                      self.neg_mask[t], self.init[t], [self.gens[i] for i in idx],
                      [self.template_gens[i] for i in idx])


def _group(backbone: Backbone, cfg: LearnerConfig, concepts: Sequence[ConceptData],
           banks: Mapping[str, NegativeBank]) -> _Group:
    dev = backbone.device
    C = len(concepts)
    with torch.no_grad():
        init = torch.stack([backbone.word_embedding(c.parent) for c in concepts]).float()
    pos, pos_mask = _pad([F.normalize(c.image_features.float(), dim=-1).to(dev) for c in concepts], dev)
    neg_rows = []
    for c in concepts:
        bank = banks.get(c.parent)
        if bank is None or bank.features.shape[0] == 0:
            neg_rows.append(torch.zeros(0, pos.shape[-1], device=dev))
            continue
        keep = torch.tensor([o != c.concept_id for o in bank.owners], dtype=torch.bool)
        neg_rows.append(F.normalize(bank.features.float(), dim=-1)[keep].to(dev))
    if any(r.shape[0] == 0 for r in neg_rows) and cfg.weights.ce > 0:
        lonely = [c.concept_id for c, r in zip(concepts, neg_rows) if r.shape[0] == 0]
        log.warning("no negatives for %d concept(s) (e.g. %s): their CE term is zero", len(lonely), lonely[:3])
    neg, neg_mask = _pad(neg_rows, dev) if any(r.shape[0] for r in neg_rows) else (
        torch.zeros(C, 1, pos.shape[-1], device=dev), torch.zeros(C, 1, dtype=torch.bool, device=dev))
    gens = [torch.Generator().manual_seed(concept_seed(cfg.seed, c.concept_id)) for c in concepts]
    tgens = [torch.Generator().manual_seed(concept_seed(cfg.seed, "templates/" + c.concept_id)) for c in concepts]
    return _Group(list(concepts), pos, pos_mask, neg, neg_mask, init, gens, tgens)


def learn_tokens(backbone: Backbone, concepts: Sequence[ConceptData], banks: Mapping[str, NegativeBank],
                 config: LearnerConfig | None = None, subspaces: Mapping[str, Subspace] | None = None,
                 on_step: Callable[[int, int], None] | None = None) -> list[LearnedToken]:
    """Learn one token per concept; see the module docstring. ``banks`` maps parent -> NegativeBank."""
    cfg = config or LearnerConfig()
    dev = backbone.device
    with torch.no_grad():
        probe = backbone.encode_prompts(["a"]).features
    _validate(backbone, concepts, cfg, probe.shape[-1])
    C = len(concepts)
    parents = [c.parent for c in concepts]

    prompts = [t.format(concept=marker(c.concept_id), parent=c.parent) for c in concepts for t in cfg.templates]
    batch = backbone.tokenize(prompts)
    assert batch.concept_ids == [c.concept_id for c in concepts]  # slots follow first appearance

    group = _group(backbone, cfg, concepts, banks)
    spaces = None
    if cfg.parametrization == "projected":
        spaces = dict(subspaces or {})
        spaces.update(subspaces_for(backbone, [p for p in parents if p not in spaces], cfg.vocabulary, cfg.rank_tol))
    params = TokenParameters(group.init, [spaces[p] for p in parents] if spaces else None).to(dev)

    scheduler = backbone.generator.noise_scheduler() if cfg.weights.ti > 0 else None
    scale = backbone.logit_scale
    opt = torch.optim.Adam(params.parameters(), lr=cfg.lr)

    ti_weight, ti_ratio = ti_weights(backbone, cfg, group, batch, params, scale, scheduler)
    active = torch.ones(C, dtype=torch.bool, device=dev)
    state = {"ti_weight": ti_weight, "ema": torch.full((C,), float("nan"), device=dev),
             "best": torch.full((C,), float("inf"), device=dev), "wait": torch.zeros(C, dtype=torch.long, device=dev),
             "steps_run": torch.zeros(C, dtype=torch.long, device=dev), "last": {}, "stopped_protos": {},
             "max_norm": cfg.max_norm_ratio * backbone.vocab_mean_norm if cfg.max_norm_ratio > 0 else 0.0}
    frozen = [p.detach().clone() for p in params.parameters()]
    t0 = time.perf_counter()
    with _checkpointing(backbone, cfg.gradient_checkpointing and scheduler is not None):
        for step in range(cfg.steps):
            if not _step(backbone, cfg, group, batch, params, opt, frozen, active, state, scale, scheduler,
                         step, t0, on_step):
                break
    return _finish(backbone, cfg, group, batch, params, spaces, scale, state, ti_ratio)


@contextlib.contextmanager
def _checkpointing(backbone: Backbone, on: bool):
    unet = backbone.generator.unet if backbone.generator is not None else None
    was = bool(unet is not None and unet.is_gradient_checkpointing)
    if on and unet is not None:
        unet.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if on and unet is not None and not was:
            unet.disable_gradient_checkpointing()


def _step_rows(cfg, idx: list[int], live: _Group) -> tuple[torch.Tensor, int]:
    """Rows of the tokenised batch (concept-major, T templates each) that this step encodes: every
    template of each active concept, or ``templates_per_step`` of them drawn from its own generator."""
    T, k = len(cfg.templates), cfg.templates_per_step or len(cfg.templates)
    if k == T:
        picks = torch.arange(T).expand(len(idx), T)
    else:
        picks = torch.stack([torch.randperm(T, generator=g)[:k].sort().values for g in live.template_gens])
    return (torch.tensor(idx)[:, None] * T + picks).flatten(), k


def _step(backbone, cfg, group: _Group, batch, params, opt, frozen, active, state, scale, scheduler, step, t0,
          on_step) -> bool:
    """One optimisation step of the active concepts; False once no concept is active.

    Only active concepts run through the text encoder and the UNet: a concept that stopped early costs
    nothing more (its prototype stays in the image-side CE as a fixed competitor, as it was while frozen).
    """
    C, dev = len(group.concepts), backbone.device
    idx = torch.nonzero(active).flatten().tolist()
    live = group if len(idx) == C else group.take(idx)
    rows, k = _step_rows(cfg, idx, live)
    t_idx = torch.tensor(idx, device=dev)
    vectors = params()[t_idx]
    samples = None
    if cfg.weights.ti > 0 and cfg.weights.ce <= 0 and cfg.weights.image_ce <= 0:
        # TI only: the text encoder feeds nothing but the TI samples' conditioning, so encode just the rows
        # they drew (about half of them at 2 samples from 4 templates); the other rows would get no gradient.
        samples = draw_ti_samples(live.concepts, live.gens, scheduler, k, cfg.ti_samples)
        used = samples.rows.unique()  # sorted
        rows, samples.rows = rows[used], torch.searchsorted(used, samples.rows)
    # Every row, in order (all concepts active, every template): the batch as tokenised, not a copy of it.
    enc = backbone.encode_text(batch if len(rows) == len(batch) else batch.take(rows), vectors)
    text = None if samples is not None else F.normalize(enc.features.float(), dim=-1).view(len(idx), k, -1)
    split_ti = cfg.weights.ti > 0 and cfg.ti_micro_batch > 0
    cut = enc.hidden.detach().requires_grad_() if split_ti else enc.hidden
    others = _stopped_prototypes(backbone, cfg, batch, params, active, state)
    terms = objective_terms(backbone, cfg, live, text, cut, scale, scheduler, vectors, state["ti_weight"][t_idx],
                             others, samples)
    per_concept = sum(terms.values())
    if not torch.isfinite(per_concept).all():
        bad = [live.concepts[i].concept_id for i in torch.nonzero(~torch.isfinite(per_concept)).flatten().tolist()]
        raise NonFiniteLoss(
            f"loss became non-finite at step {step} for concept(s) {bad[:5]}: lower the learning rate "
            f"(now {cfg.lr}) or check the images/latents of these concepts for NaN values"
        )
    opt.zero_grad(set_to_none=True)
    if split_ti:
        # The TI term already sent its gradient to the text states (`cut.grad`), one micro-batch at a time;
        # carry it through the text encoder together with the other terms in one backward pass.
        rest = sum(v for name, v in terms.items() if name != "ti")
        loss = rest.sum() if torch.is_tensor(rest) else enc.hidden.sum() * 0
        (loss + (enc.hidden * cut.grad).sum()).backward()
    else:
        per_concept.sum().backward()
    opt.step()
    if state["max_norm"] > 0:
        params.bound_norms_(state["max_norm"])
    _bookkeep(cfg, params, frozen, active, t_idx, state, terms, per_concept)
    if on_step is not None:
        on_step(step + 1, cfg.steps)
    if cfg.log_every and (step + 1) % cfg.log_every == 0:
        rate = (step + 1) / (time.perf_counter() - t0)
        log.info("step %d/%d  loss %.4f  active %d/%d  %.1f steps/s  eta %.0fs", step + 1, cfg.steps,
                 float(state["ema"].mean()), int(active.sum()), C, rate, (cfg.steps - step - 1) / rate)
    return bool(active.any())


@torch.no_grad()
def _stopped_prototypes(backbone, cfg, batch, params, active, state) -> torch.Tensor | None:
    """Template-mean text features [K, D] of the concepts that stopped (for the image-side CE only),
    computed once per concept from its frozen token."""
    if cfg.weights.image_ce <= 0 or bool(active.all()):
        return None
    cache, T = state["stopped_protos"], len(cfg.templates)
    new = [i for i in torch.nonzero(~active).flatten().tolist() if i not in cache]
    if new:
        rows = (torch.tensor(new)[:, None] * T + torch.arange(T)).flatten()
        feats = backbone.encode_text(batch.take(rows), params()[torch.tensor(new, device=backbone.device)]).features
        protos = F.normalize(F.normalize(feats.float(), dim=-1).view(len(new), T, -1).mean(1), dim=-1)
        cache.update(zip(new, protos))
    return torch.stack([cache[i] for i in sorted(cache)])


@torch.no_grad()
def _bookkeep(cfg, params, frozen, active, idx, state, terms, per_concept) -> None:
    """Freeze stopped concepts, update the loss EMA, the last term values and early stopping (in place).
    ``terms`` and ``per_concept`` hold the active concepts ``idx`` only."""
    for p, f in zip(params.parameters(), frozen):
        p[~active] = f[~active]  # a stopped concept stays exactly where it stopped (Adam's momentum moves it)
        f[active] = p[active]
    state["steps_run"] += active.long()
    detached, ema = per_concept.detach(), state["ema"]
    old = ema[idx]
    ema[idx] = torch.where(torch.isnan(old), detached, cfg.ema * old + (1 - cfg.ema) * detached)
    last = state["last"]
    for name, v in terms.items():
        last.setdefault(name, torch.zeros_like(ema))[idx] = v.detach()
    if cfg.patience > 0:
        improved = ema < state["best"] - cfg.min_delta
        state["best"] = torch.where(improved & active, ema, state["best"])
        state["wait"] = torch.where(improved, torch.zeros_like(state["wait"]), state["wait"] + 1)
        active &= state["wait"] < cfg.patience


@torch.no_grad()
def _finish(backbone, cfg, group: _Group, batch, params, spaces, scale, state, ti_ratio) -> list[LearnedToken]:
    last, ema, steps_run, ti_weight = state["last"], state["ema"], state["steps_run"], state["ti_weight"]
    concepts, pos, pos_mask, init = group.concepts, group.pos, group.pos_mask, group.init
    vectors = params()
    C, T = len(concepts), len(cfg.templates)
    text = F.normalize(backbone.encode_text(batch, vectors).features.float(), dim=-1).view(C, T, -1)
    ce, acc = text_side_ce(text, pos, pos_mask, group.neg, group.neg_mask, scale)
    vocab_norm = backbone.vocab_mean_norm
    out = []
    for i, c in enumerate(concepts):
        v = vectors[i].detach().cpu().clone()
        norm = float(v.norm())
        metrics = {
            "loss": float(ema[i]),
            "loss_ce": float(ce[i]),
            "train_acc": float(acc[i]),
            "token_norm": norm,
            "vocab_mean_norm": vocab_norm,
            "norm_ratio": norm / vocab_norm,
            "cos_to_init": float(F.cosine_similarity(v, init[i].cpu(), dim=0)),
            "steps": float(steps_run[i]),
            "n_images": float(pos_mask[i].sum()),
            "n_negatives": float(group.neg_mask[i].sum()),
        }
        if "ti" in last:
            metrics["loss_ti"] = float(last["ti"][i] / ti_weight[i])
            metrics["ti_weight"] = float(ti_weight[i])
        if ti_ratio is not None:
            metrics["ti_grad_ratio_start"] = float(ti_ratio[i])  # ‖∇TI‖ / ‖∇CE‖ at λ_TI = 1
        if spaces:
            metrics["rank"] = float(spaces[c.parent].rank)
        assert math.isfinite(norm)
        out.append(LearnedToken(
            concept_id=c.concept_id, parent=c.parent, vector=v, parametrization=params.mode,
            coefficients=params.coefficients_of(i),
            basis_id=spaces[c.parent].basis_id if spaces else None, metrics=metrics,
            prototype=F.normalize(pos[i][pos_mask[i]].mean(0), dim=-1).cpu(),
        ))
    return out


def to_record(token: LearnedToken, backbone: Backbone, run_id: str, thumbnails: list[str] | None = None):
    """The registry row of a learned token (`schemas.TokenRecord`); ``thumbnails`` are base64 PNGs of its
    few-shot images (`factory.images.thumbnail_b64`)."""
    from schemas import TokenRecord

    return TokenRecord(
        concept_id=token.concept_id, parent=token.parent, backbone=backbone.name,
        backbone_fingerprint=backbone.fingerprint(), dim=int(token.vector.numel()),
        vector=token.vector.tolist(), parametrization=token.parametrization, coefficients=token.coefficients,
        basis_id=token.basis_id, metrics=token.metrics, run_id=run_id,
        prototype=token.prototype.tolist() if token.prototype is not None else None,
        thumbnails=thumbnails[:MAX_THUMBNAILS] if thumbnails else None,
    )


MAX_THUMBNAILS = 3
