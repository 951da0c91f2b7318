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

On a GPU these equalities hold to rounding only: the backward of row selection and token injection
accumulates with atomics, flash attention's backward accumulates dQ with atomics, and cuBLAS/cuDNN choose
kernels by batch size, so a concept's token alone and in a group (or in two runs) differ in the last bits.
`factory.device.deterministic_cuda()` trades speed for bitwise-repeatable runs where a test needs them.

Steady steps never read the GPU on the host (`Progress`): the host draws rows and TI samples and copies
them non-blocking, so it runs ahead of the GPU; early stopping reads it once per step, finiteness every
``log_every`` steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from factory.backbones import Backbone
from factory.concept_group import ConceptData, ConceptGroup, NegativeBank
from factory.device import to_device
from factory.errors import DimensionMismatch, EmptyImageSet, NonFiniteLoss
from factory.learner_config import LearnerConfig, LossWeights  # noqa: F401  (re-exported: its settings)
from factory.losses import text_side_ce
from factory.objective import concept_seed, draw_ti_samples, objective_terms, ti_weights
from factory.tokens import Subspace, TokenParameters, build_subspace, get_vocabulary, marker, vocabulary_for_parent
from factory.tokens.tokenizer import PromptBatch

log = logging.getLogger(__name__)


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


_SUBSPACES: dict[tuple, Subspace] = {}  # (fingerprint, vocabulary and words, parent, rank_tol) -> subspace


def subspaces_for(
    backbone: Backbone, parents: Sequence[str], vocabulary: str | None = None, rank_tol: float = 1e-4
) -> dict[str, Subspace]:
    """One subspace per distinct parent word (shared by every concept of that parent).

    Built on the CPU in float64 from fp32 word embeddings and cached per backbone fingerprint: the same
    ``basis_id`` then names the same basis on every device and precision (on a GPU it was an SVD on the
    device, rebuilt per chunk, with a blocking copy per word), and a chunk of a known parent costs nothing.
    """
    out, embed = {}, None
    for p in dict.fromkeys(parents):
        vocab = get_vocabulary(vocabulary) if vocabulary else vocabulary_for_parent(p)
        key = (backbone.fingerprint(), vocab.name, tuple(vocab.words()), p, rank_tol)
        if key not in _SUBSPACES:
            embed = embed or backbone.word_embeddings_cpu()
            with torch.no_grad():
                _SUBSPACES[key] = build_subspace(embed, vocab, p, rank_tol=rank_tol, salt=backbone.fingerprint())
        out[p] = _SUBSPACES[key]
    return out


def _pad(rows: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [n_i, D] (on the CPU) -> one padded [len, n, D] tensor and its mask, each copied once."""
    n = max(1, max(r.shape[0] for r in rows))
    out = torch.zeros(len(rows), n, rows[0].shape[-1])
    mask = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return to_device(out, device), to_device(mask, device)


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


def _group(
    backbone: Backbone, cfg: LearnerConfig, concepts: Sequence[ConceptData], banks: Mapping[str, NegativeBank]
) -> ConceptGroup:
    dev = backbone.device
    C = len(concepts)
    with torch.no_grad():
        embed = backbone.word_embeddings_cpu()
        init = to_device(torch.stack([embed(c.parent) for c in concepts]), dev)
    pos, pos_mask = _pad([F.normalize(c.image_features.float().cpu(), dim=-1) for c in concepts], dev)
    neg_rows = []
    for c in concepts:
        bank = banks.get(c.parent)
        if bank is None or bank.features.shape[0] == 0:
            neg_rows.append(torch.zeros(0, pos.shape[-1]))
            continue
        keep = torch.tensor([o != c.concept_id for o in bank.owners], dtype=torch.bool)
        neg_rows.append(F.normalize(bank.features.float().cpu(), dim=-1)[keep])
    if any(r.shape[0] == 0 for r in neg_rows) and cfg.weights.ce > 0:
        lonely = [c.concept_id for c, r in zip(concepts, neg_rows) if r.shape[0] == 0]
        log.warning("no negatives for %d concept(s) (e.g. %s): their CE term is zero", len(lonely), lonely[:3])
    neg, neg_mask = (
        _pad(neg_rows, dev)
        if any(r.shape[0] for r in neg_rows)
        else (torch.zeros(C, 1, pos.shape[-1], device=dev), torch.zeros(C, 1, dtype=torch.bool, device=dev))
    )
    gens = [torch.Generator().manual_seed(concept_seed(cfg.seed, c.concept_id)) for c in concepts]
    tgens = [torch.Generator().manual_seed(concept_seed(cfg.seed, "templates/" + c.concept_id)) for c in concepts]
    return ConceptGroup(list(concepts), pos, pos_mask, neg, neg_mask, init, gens, tgens)


@dataclass
class StepContext:
    """What every step of one `learn_tokens` call reads: fixed for the call."""

    backbone: Backbone
    cfg: LearnerConfig
    group: ConceptGroup
    batch: PromptBatch  # every prompt (C × T, concept-major), on the device
    batch_cpu: PromptBatch  # the same on the host, where sub-batches are cut (`PromptBatch.take`)
    params: TokenParameters
    opt: torch.optim.Optimizer
    frozen: list[torch.Tensor]  # each parameter as of the last step its concept was active
    scale: float  # the CLIP logit scale
    scheduler: object | None  # the DDPM noise scheduler of the TI term (None without it)
    max_norm: float  # bound on a token's norm (0: none)
    on_step: Callable[[int, int], None] | None = None

    @property
    def device(self) -> torch.device:
        return self.backbone.device


@dataclass
class Progress:
    """Per-concept progress [C] of one call, kept on the device: the host reads it only to log, to stop
    early (``patience``) and to check finiteness, so a steady step never waits for the GPU."""

    ti_weight: torch.Tensor
    ema: torch.Tensor
    best: torch.Tensor
    wait: torch.Tensor
    steps_run: torch.Tensor
    active: torch.Tensor  # bool [C] on the device
    nonfinite: torch.Tensor  # bool [C]: the loss was non-finite at some step since the last check
    active_idx: list[int]  # the host's copy of ``active``, as indices
    last: dict[str, torch.Tensor] = field(default_factory=dict)  # each term's last value
    stopped_protos: dict[int, torch.Tensor] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(cls, ti_weight: torch.Tensor) -> "Progress":
        C, dev = ti_weight.shape[0], ti_weight.device
        return cls(
            ti_weight=ti_weight,
            ema=torch.full((C,), float("nan"), device=dev),
            best=torch.full((C,), float("inf"), device=dev),
            wait=torch.zeros(C, dtype=torch.long, device=dev),
            steps_run=torch.zeros(C, dtype=torch.long, device=dev),
            active=torch.ones(C, dtype=torch.bool, device=dev),
            nonfinite=torch.zeros(C, dtype=torch.bool, device=dev),
            active_idx=list(range(C)),
        )


def _resolve_memory(backbone: Backbone, cfg: LearnerConfig, n_concepts: int) -> LearnerConfig:
    """``ti_micro_batch="auto"``: on a GPU, the largest micro-batch that fits the free memory (and
    checkpointing only where none does, `factory.memory`); elsewhere one batch."""
    if cfg.ti_micro_batch != "auto":
        return cfg
    if backbone.device.type != "cuda" or cfg.weights.ti <= 0 or backbone.generator is None:
        return dataclasses.replace(cfg, ti_micro_batch=0)
    from factory.memory import auto_ti_micro_batch

    free, _ = torch.cuda.mem_get_info(backbone.device)
    micro, checkpointing = auto_ti_micro_batch(backbone, cfg, n_concepts, free)
    log.info(
        "ti_micro_batch auto: %d (of %d samples), gradient checkpointing %s",
        micro,
        n_concepts * cfg.ti_samples,
        "on" if checkpointing else "off",
    )
    return dataclasses.replace(
        cfg, ti_micro_batch=micro, gradient_checkpointing=cfg.gradient_checkpointing or checkpointing
    )


def learn_tokens(
    backbone: Backbone,
    concepts: Sequence[ConceptData],
    banks: Mapping[str, NegativeBank],
    config: LearnerConfig | None = None,
    subspaces: Mapping[str, Subspace] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> list[LearnedToken]:
    """Learn one token per concept; see the module docstring. ``banks`` maps parent -> NegativeBank."""
    cfg = config or LearnerConfig()
    dev = backbone.device
    with torch.no_grad():
        probe = backbone.encode_prompts(["a"]).features
    _validate(backbone, concepts, cfg, probe.shape[-1])
    cfg = _resolve_memory(backbone, cfg, len(concepts))
    parents = [c.parent for c in concepts]

    prompts = [t.format(concept=marker(c.concept_id), parent=c.parent) for c in concepts for t in cfg.templates]
    batch_cpu = backbone.tokenize(prompts)
    assert batch_cpu.concept_ids == [c.concept_id for c in concepts]  # slots follow first appearance

    group = _group(backbone, cfg, concepts, banks)
    spaces = None
    if cfg.parametrization == "projected":
        spaces = dict(subspaces or {})
        spaces.update(subspaces_for(backbone, [p for p in parents if p not in spaces], cfg.vocabulary, cfg.rank_tol))
    params = TokenParameters(group.init, [spaces[p] for p in parents] if spaces else None).to(dev)
    scheduler = backbone.generator.noise_scheduler() if cfg.weights.ti > 0 else None
    ctx = StepContext(
        backbone,
        cfg,
        group,
        batch_cpu.to(dev),
        batch_cpu,
        params,
        torch.optim.Adam(params.parameters(), lr=cfg.lr),
        [p.detach().clone() for p in params.parameters()],
        backbone.logit_scale,
        scheduler,
        cfg.max_norm_ratio * backbone.vocab_mean_norm if cfg.max_norm_ratio > 0 else 0.0,
        on_step,
    )

    with _checkpointing(backbone, cfg.gradient_checkpointing and scheduler is not None):
        # Calibration inside checkpointing and in the step's micro-batches: it ran 4× a step's UNet
        # samples in one un-checkpointed batch and was the memory peak of the whole call (C=32 on SD 1.5:
        # 187 GiB against a 50 GiB step).
        ti_weight, ti_ratio = ti_weights(backbone, cfg, group, ctx.batch, params, ctx.scale, scheduler)
        progress = Progress.start(ti_weight)
        for step in range(cfg.steps):
            _step(ctx, progress, step)
            if not progress.active_idx:
                break
    _check_finite(ctx, progress, cfg.steps)
    return _finish(ctx, progress, spaces, ti_ratio)


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


def _step_rows(cfg, idx: list[int], live: ConceptGroup, every: bool) -> tuple[torch.Tensor | None, int]:
    """Rows of the tokenised batch (concept-major, T templates each) that this step encodes (None: all
    of them): every template of each active concept, or ``templates_per_step`` of them drawn from its own
    generator. Host tensors: they index the host batch."""
    T, k = len(cfg.templates), cfg.templates_per_step or len(cfg.templates)
    if k == T:
        if every:
            return None, k
        picks = torch.arange(T).expand(len(idx), T)
    else:
        picks = torch.stack([torch.randperm(T, generator=g)[:k].sort().values for g in live.template_gens])
    return (torch.tensor(idx)[:, None] * T + picks).flatten(), k


def _step(ctx: StepContext, progress: Progress, step: int) -> None:
    """One optimisation step of the active concepts.

    Only active concepts run through the text encoder and the UNet: a concept that stopped early costs
    nothing more (its prototype stays in the image-side CE as a fixed competitor, as it was while frozen).
    Nothing here reads a GPU value on the host in the steady state (`Progress`): the rows and TI samples
    are drawn on the host and copied non-blocking, so the host runs ahead of the GPU.
    """
    cfg, group, backbone = ctx.cfg, ctx.group, ctx.backbone
    idx = progress.active_idx
    every = len(idx) == len(group.concepts)
    live = group if every else group.take(idx)
    rows, k = _step_rows(cfg, idx, live, every)
    t_idx = None if every else to_device(torch.tensor(idx), ctx.device)
    vectors = ctx.params() if every else ctx.params()[t_idx]
    samples = None
    if cfg.weights.ti > 0 and cfg.weights.ce <= 0 and cfg.weights.image_ce <= 0:
        # TI only: the text encoder feeds nothing but the TI samples' conditioning, so encode just the rows
        # they drew (about half of them at 2 samples from 4 templates); the other rows would get no gradient.
        samples = draw_ti_samples(live.concepts, live.gens, ctx.scheduler, k, cfg.ti_samples)
        used = samples.rows.unique()  # sorted (host tensors: no device sync)
        all_rows = rows if rows is not None else torch.arange(len(ctx.batch_cpu))
        rows, samples.rows = all_rows[used], torch.searchsorted(used, samples.rows)
    # Every row (all concepts active, every template): the device batch as tokenised, not a copy of it.
    enc = backbone.encode_text(ctx.batch if rows is None else ctx.batch_cpu.take(rows).to(ctx.device), vectors)
    text = None if samples is not None else F.normalize(enc.features.float(), dim=-1).view(len(idx), k, -1)
    split_ti = cfg.weights.ti > 0 and cfg.ti_micro_batch > 0
    cut = enc.hidden.detach().requires_grad_() if split_ti else enc.hidden
    others = _stopped_prototypes(ctx, progress)
    ti_weight = progress.ti_weight if every else progress.ti_weight[t_idx]
    terms = objective_terms(
        backbone, cfg, live, text, cut, ctx.scale, ctx.scheduler, vectors, ti_weight, others, samples
    )
    per_concept = sum(terms.values())
    # Finiteness is accumulated on the device and read every ``log_every`` steps (every step on a CPU,
    # where reading costs nothing): a check between forward and backward drained the GPU every step.
    bad = ~torch.isfinite(per_concept.detach())
    if every:
        progress.nonfinite |= bad
    else:
        progress.nonfinite.index_put_((t_idx,), progress.nonfinite[t_idx] | bad)
    if ctx.device.type != "cuda":
        _check_finite(ctx, progress, step)
    ctx.opt.zero_grad(set_to_none=True)
    if split_ti:
        # The TI term already sent its gradient to the text states (`cut.grad`), one micro-batch at a time;
        # carry it through the text encoder together with the other terms in one backward pass.
        rest = sum(v for name, v in terms.items() if name != "ti")
        loss = rest.sum() if torch.is_tensor(rest) else enc.hidden.sum() * 0
        (loss + (enc.hidden * cut.grad).sum()).backward()
    else:
        per_concept.sum().backward()
    ctx.opt.step()
    if ctx.max_norm > 0:
        ctx.params.bound_norms_(ctx.max_norm)
    _bookkeep(ctx, progress, t_idx, terms, per_concept)
    if ctx.on_step is not None:
        ctx.on_step(step + 1, cfg.steps)
    if cfg.log_every and (step + 1) % cfg.log_every == 0:
        _check_finite(ctx, progress, step)
        rate = (step + 1) / (time.perf_counter() - progress.t0)
        log.info(
            "step %d/%d  loss %.4f  active %d/%d  %.1f steps/s  eta %.0fs",
            step + 1,
            cfg.steps,
            float(progress.ema.mean()),
            len(progress.active_idx),
            len(group.concepts),
            rate,
            (cfg.steps - step - 1) / rate,
        )


def _check_finite(ctx: StepContext, progress: Progress, step: int) -> None:
    """Raise `NonFiniteLoss` naming the concepts whose loss went non-finite (one host read)."""
    bad = progress.nonfinite.cpu()
    if bool(bad.any()):
        ids = [ctx.group.concepts[i].concept_id for i in torch.nonzero(bad).flatten().tolist()]
        raise NonFiniteLoss(
            f"loss became non-finite by step {step} for concept(s) {ids[:5]}: lower the learning rate "
            f"(now {ctx.cfg.lr}) or check the images/latents of these concepts for NaN values"
        )


@torch.no_grad()
def _stopped_prototypes(ctx: StepContext, progress: Progress) -> torch.Tensor | None:
    """Template-mean text features [K, D] of the concepts that stopped (for the image-side CE only),
    computed once per concept from its frozen token."""
    if ctx.cfg.weights.image_ce <= 0 or len(progress.active_idx) == len(ctx.group.concepts):
        return None
    cache, T = progress.stopped_protos, len(ctx.cfg.templates)
    live = set(progress.active_idx)
    new = [i for i in range(len(ctx.group.concepts)) if i not in live and i not in cache]
    if new:
        rows = (torch.tensor(new)[:, None] * T + torch.arange(T)).flatten()
        vectors = ctx.params()[to_device(torch.tensor(new), ctx.device)]
        feats = ctx.backbone.encode_text(ctx.batch_cpu.take(rows).to(ctx.device), vectors).features
        protos = F.normalize(F.normalize(feats.float(), dim=-1).view(len(new), T, -1).mean(1), dim=-1)
        cache.update(zip(new, protos))
    return torch.stack([cache[i] for i in sorted(cache)])


@torch.no_grad()
def _bookkeep(ctx: StepContext, progress: Progress, idx: torch.Tensor | None, terms, per_concept) -> None:
    """Freeze stopped concepts, update the loss EMA, the last term values and early stopping (in place).
    ``terms`` and ``per_concept`` hold the active concepts ``idx`` only (None: every concept). Only
    early stopping (``patience`` > 0) reads the device, once per step."""
    active, cfg = progress.active, ctx.cfg
    for p, f in zip(ctx.params.parameters(), ctx.frozen):
        if idx is not None:  # a stopped concept stays exactly where it stopped (Adam's momentum moves it)
            p.copy_(torch.where(active.view(-1, *([1] * (p.dim() - 1))), p, f))
        f.copy_(p)
    progress.steps_run += active.long()
    detached, ema = per_concept.detach(), progress.ema
    sel = slice(None) if idx is None else idx
    old = ema[sel]
    ema[sel] = torch.where(torch.isnan(old), detached, cfg.ema * old + (1 - cfg.ema) * detached)
    for name, v in terms.items():
        progress.last.setdefault(name, torch.zeros_like(ema))[sel] = v.detach()
    if cfg.patience > 0:
        improved = ema < progress.best - cfg.min_delta
        progress.best = torch.where(improved & active, ema, progress.best)
        progress.wait = torch.where(improved, torch.zeros_like(progress.wait), progress.wait + 1)
        active &= progress.wait < cfg.patience
        progress.active_idx = torch.nonzero(active.cpu()).flatten().tolist()  # the one read of the step


@torch.no_grad()
def _finish(ctx: StepContext, progress: Progress, spaces, ti_ratio) -> list[LearnedToken]:
    group, cfg, backbone = ctx.group, ctx.cfg, ctx.backbone
    concepts, pos, pos_mask, init = group.concepts, group.pos, group.pos_mask, group.init
    vectors = ctx.params()
    C, T = len(concepts), len(cfg.templates)
    text = F.normalize(backbone.encode_text(ctx.batch, vectors).features.float(), dim=-1).view(C, T, -1)
    ce, acc = text_side_ce(text, pos, pos_mask, group.neg, group.neg_mask, ctx.scale)
    # Every per-concept number in one host copy (the GPU is read once, not per metric per concept).
    columns = {
        "loss": progress.ema,
        "loss_ce": ce,
        "train_acc": acc,
        "cos_to_init": F.cosine_similarity(vectors, init, dim=-1),
        "steps": progress.steps_run,
        "n_images": pos_mask.sum(1),
        "n_negatives": group.neg_mask.sum(1),
        "ti_weight": progress.ti_weight,
    }
    if "ti" in progress.last:
        columns["loss_ti"] = progress.last["ti"] / progress.ti_weight
    if ti_ratio is not None:
        columns["ti_grad_ratio_start"] = ti_ratio  # ‖∇TI‖ / ‖∇CE‖ at λ_TI = 1
    host = dict(zip(columns, torch.stack([c.float() for c in columns.values()]).cpu().tolist()))
    vectors_cpu = vectors.detach().cpu()
    w = pos_mask.float()[..., None]  # a masked mean: a boolean index per concept would read the GPU
    protos = F.normalize((pos * w).sum(1) / w.sum(1).clamp_min(1.0), dim=-1).cpu()
    coefficients = ctx.params.coefficients_cpu()
    vocab_norm = backbone.vocab_mean_norm
    out = []
    for i, c in enumerate(concepts):
        v = vectors_cpu[i].clone()
        norm = float(v.norm())
        metrics = {name: host[name][i] for name in ("loss", "loss_ce", "train_acc")}
        metrics.update(token_norm=norm, vocab_mean_norm=vocab_norm, norm_ratio=norm / vocab_norm)
        metrics.update({name: host[name][i] for name in ("cos_to_init", "steps", "n_images", "n_negatives")})
        if "loss_ti" in host:
            metrics["loss_ti"] = host["loss_ti"][i]
            metrics["ti_weight"] = host["ti_weight"][i]
        if "ti_grad_ratio_start" in host:
            metrics["ti_grad_ratio_start"] = host["ti_grad_ratio_start"][i]
        if spaces:
            metrics["rank"] = float(spaces[c.parent].rank)
        assert math.isfinite(norm)
        out.append(
            LearnedToken(
                concept_id=c.concept_id,
                parent=c.parent,
                vector=v,
                parametrization=ctx.params.mode,
                coefficients=coefficients[i] if coefficients is not None else None,
                basis_id=spaces[c.parent].basis_id if spaces else None,
                metrics=metrics,
                prototype=protos[i],
            )
        )
    return out


def to_record(token: LearnedToken, backbone: Backbone, run_id: str, thumbnails: list[str] | None = None):
    """The registry row of a learned token (`schemas.TokenRecord`); ``thumbnails`` are base64 PNGs of its
    few-shot images (`factory.images.thumbnail_b64`)."""
    from schemas import TokenRecord

    return TokenRecord(
        concept_id=token.concept_id,
        parent=token.parent,
        backbone=backbone.name,
        backbone_fingerprint=backbone.fingerprint(),
        dim=int(token.vector.numel()),
        vector=token.vector.tolist(),
        parametrization=token.parametrization,
        coefficients=token.coefficients,
        basis_id=token.basis_id,
        metrics=token.metrics,
        run_id=run_id,
        prototype=token.prototype.tolist() if token.prototype is not None else None,
        thumbnails=thumbnails[:MAX_THUMBNAILS] if thumbnails else None,
    )


MAX_THUMBNAILS = 3
