"""The learner's objective: per-concept CE terms, the textual-inversion term and λ_TI's calibration.

Every term is a vector [C], one loss per concept, and the objective is their sum: that is what lets a
concept learn the same token alone or beside others (`factory.learner`). The TI term draws each
concept's (image, template, noise, timestep) samples from the concept's own generator for the same
reason. λ_TI is set per concept by measurement (`LossWeights.ti_balance`): the raw denoising MSE's
gradient is orders of magnitude below CE's, so a fixed λ leaves the token CE-only.
"""

from __future__ import annotations

import dataclasses
import hashlib

import torch
import torch.nn.functional as F

from factory.concept_group import ConceptGroup
from factory.device import to_device
from factory.losses import image_side_ce, text_side_ce, textual_inversion_loss


def concept_seed(seed: int, concept_id: str) -> int:
    """A stable per-concept seed (Python's hash() is salted per process; sha256 is not)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{concept_id}".encode()).digest()[:8], "little") & (2**63 - 1)


def ce_terms(cfg, text, group: ConceptGroup, scale, others=None) -> dict[str, torch.Tensor]:
    w, terms = cfg.weights, {}
    if w.ce > 0:
        terms["ce"] = w.ce * text_side_ce(text, group.pos, group.pos_mask, group.neg, group.neg_mask, scale)[0]
    if w.image_ce > 0:
        terms["image_ce"] = w.image_ce * image_side_ce(text, group.pos, group.pos_mask, scale, others)
    return terms


def term_gradient_norms(
    backbone,
    cfg,
    group: ConceptGroup,
    batch,
    params,
    scale,
    scheduler,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-concept norms [C] of the gradients that the (weighted) CE terms and the λ = 1 TI term send to
    each concept's parameters, the TI term on ``calibration_samples`` fresh samples per concept (drawn
    from generators of their own, so the training samples are the same with and without calibration).
    Measured on every template, whatever ``templates_per_step`` is, in micro-batches of a step's UNet
    batch (``ti_micro_batch``, or C × ``ti_samples``): run as one batch of ``calibration_samples`` per
    concept it needed 4× a step's memory and was the peak of `learn_tokens`."""
    C, T = len(group.concepts), len(cfg.templates)
    param = next(params.parameters())
    enc = backbone.encode_text(batch, params())
    text = F.normalize(enc.features.float(), dim=-1).view(C, T, -1)
    ce = sum(ce_terms(cfg, text, group, scale).values())
    g_ce = (
        torch.autograd.grad(ce.sum(), param, retain_graph=True)[0].norm(dim=-1)
        if torch.is_tensor(ce)
        else torch.zeros(C, device=param.device)
    )
    gens = [torch.Generator().manual_seed(concept_seed(cfg.seed, "calibrate/" + c.concept_id)) for c in group.concepts]
    cal = dataclasses.replace(
        cfg,
        ti_samples=max(cfg.ti_samples, cfg.calibration_samples),
        ti_micro_batch=cfg.ti_micro_batch or C * cfg.ti_samples,
    )
    cut = enc.hidden.detach().requires_grad_()
    ti_term(backbone, cal, group.concepts, cut, scheduler, gens, torch.ones(C, device=param.device))  # -> cut.grad
    g_ti = torch.autograd.grad(enc.hidden, param, grad_outputs=cut.grad)[0].norm(dim=-1)
    return g_ce.detach(), g_ti.detach()


def ti_weights(
    backbone,
    cfg,
    group: ConceptGroup,
    batch,
    params,
    scale,
    scheduler,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """λ_TI of each concept [C] (see `LossWeights.ti_balance`) and the measured ‖∇TI‖ / ‖∇CE‖ at λ = 1
    (None when not calibrated)."""
    w, C, dev = cfg.weights, len(group.concepts), backbone.device
    fixed = torch.full((C,), float(w.ti), device=dev)
    if w.ti <= 0 or w.ti_balance <= 0 or (w.ce <= 0 and w.image_ce <= 0):
        return fixed, None  # nothing to balance against (TI-only: Adam does not care about its scale)
    g_ce, g_ti = term_gradient_norms(backbone, cfg, group, batch, params, scale, scheduler)
    ratio = g_ti / g_ce.clamp_min(1e-12)
    calibrated = w.ti * w.ti_balance * g_ce / g_ti.clamp_min(1e-12)
    return torch.where((g_ce > 0) & (g_ti > 0), calibrated, fixed), ratio


def objective_terms(
    backbone,
    cfg,
    group: ConceptGroup,
    text,
    hidden,
    scale,
    scheduler,
    vectors,
    ti_weight,
    others=None,
    ti_samples: TiSamples | None = None,
) -> dict[str, torch.Tensor]:
    """Weighted per-concept terms [C] of the objective; a term with λ = 0 is never computed. ``text`` may
    be None when no CE term is on; ``ti_samples``: the TI term's samples, drawn beforehand (`ti_term`).

    With ``cfg.ti_micro_batch`` the TI term comes back detached: its gradient is already in ``hidden.grad``.
    """
    w, terms = cfg.weights, ce_terms(cfg, text, group, scale, others)
    if w.ti > 0:
        terms["ti"] = ti_weight * ti_term(
            backbone,
            cfg,
            group.concepts,
            hidden,
            scheduler,
            group.gens,
            ti_weight,
            rows_per_concept=None if text is None else text.shape[1],
            samples=ti_samples,
        )
    if w.reg > 0:
        terms["reg"] = w.reg * (vectors - group.init).pow(2).sum(-1)
    return terms


@dataclasses.dataclass
class TiSamples:
    """The TI term's samples of one step, concept-major (``per_concept`` each): a latent, its noise and
    timestep, and the row of the encoded prompt batch that conditions it."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    rows: torch.Tensor
    per_concept: int


def draw_ti_samples(concepts, gens, scheduler, rows_per_concept: int, per_concept: int) -> TiSamples:
    """Each concept's (image, template row, noise, timestep) samples from its own generator, in a fixed
    order, so they do not depend on the other concepts of the step or on how the term is batched."""
    R, S = rows_per_concept, per_concept
    lat, noise, steps, rows = [], [], [], []
    for i, (c, g) in enumerate(zip(concepts, gens)):
        idx = torch.randint(c.latents.shape[0], (S,), generator=g)
        tpl = torch.randint(R, (S,), generator=g)
        x = c.latents[idx].float()
        lat.append(x)
        noise.append(torch.randn(x.shape, generator=g))
        steps.append(torch.randint(scheduler.config.num_train_timesteps, (S,), generator=g))
        rows.append(i * R + tpl)
    return TiSamples(torch.cat(lat), torch.cat(noise), torch.cat(steps), torch.cat(rows), S)


def ti_term(
    backbone,
    cfg,
    concepts,
    hidden,
    scheduler,
    gens,
    weight,
    rows_per_concept: int | None = None,
    samples: TiSamples | None = None,
) -> torch.Tensor:
    """Per-concept denoising MSE [C] under the token prompts' text states ``hidden`` [C·R, L, w], R =
    ``rows_per_concept`` (default: every template) prompts per concept, concept-major.

    The samples are ``samples`` when given (their ``rows`` index ``hidden``), else drawn here
    (`draw_ti_samples`), so micro-batching changes memory, not the samples. With ``cfg.ti_micro_batch``
    each micro-batch is backpropagated at once (scaled by ``weight`` [C], the term's λ) into
    ``hidden.grad`` and the returned losses are detached.
    """
    if samples is None:
        samples = draw_ti_samples(concepts, gens, scheduler, rows_per_concept or len(cfg.templates), cfg.ti_samples)
    S, dev, unet = samples.per_concept, hidden.device, backbone.generator.unet
    # Drawn on the host, copied non-blocking (pinned): a blocking copy here drained the GPU every step.
    lat, noise, steps = (to_device(t, dev) for t in (samples.latents, samples.noise, samples.timesteps))
    rows, micro = to_device(samples.rows, dev), cfg.ti_micro_batch
    if micro <= 0:
        mse = textual_inversion_loss(unet, scheduler, lat, hidden[rows], noise, steps)
        return mse.view(len(concepts), S).mean(1)
    per_sample = weight.repeat_interleave(S) / S  # d(Σ_c weight_c · mean_s mse_cs) / d mse_cs
    out = []
    for a in range(0, len(rows), micro):
        sl = slice(a, a + micro)
        mse = textual_inversion_loss(unet, scheduler, lat[sl], hidden[rows[sl]], noise[sl], steps[sl])
        (mse * per_sample[sl]).sum().backward()
        out.append(mse.detach())
    return torch.cat(out).view(len(concepts), S).mean(1)
