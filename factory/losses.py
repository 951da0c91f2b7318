"""The objective: a discriminative CLIP cross-entropy plus the textual-inversion denoising loss.

Every function returns *per-concept* losses ([C]) so the learner can sum them: with Adam, a sum over
concepts keeps each concept's update independent of which other concepts share the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Re-exported: the weights are defined with the learner's settings, which import no torch.
from factory.learner_config import LossWeights  # noqa: F401


def text_side_ce(
    text: torch.Tensor,
    pos: torch.Tensor,
    pos_mask: torch.Tensor,
    neg: torch.Tensor,
    neg_mask: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text → image InfoNCE of each concept against its negative bank.

    Args:
        text: [C, T, D] normalised text features of each concept's T prompt templates.
        pos / pos_mask: [C, N, D] normalised features of each concept's own images, [C, N] valid rows.
        neg / neg_mask: [C, M, D] images of *other* concepts of the same parent, [C, M] valid rows.
    Each (template, own image) pair is one softmax over {that image} ∪ negatives, target the own image.
    Returns the per-concept mean loss [C] and accuracy [C] (own image beats every negative).
    """
    sim_pos = scale * torch.einsum("ctd,cnd->ctn", text, pos)  # [C, T, N]
    sim_neg = scale * torch.einsum("ctd,cmd->ctm", text, neg)  # [C, T, M]
    sim_neg = sim_neg.masked_fill(~neg_mask[:, None, :], float("-inf"))
    lse_neg = torch.logsumexp(sim_neg, dim=-1, keepdim=True)  # -inf when a concept has no negatives
    loss = torch.logaddexp(sim_pos, lse_neg) - sim_pos  # −log softmax of the positive
    hit = (sim_pos > sim_neg.amax(dim=-1, keepdim=True)).float()
    weight = pos_mask[:, None, :].float().expand_as(loss)
    denom = weight.sum(dim=(1, 2)).clamp_min(1.0)
    return (loss * weight).sum(dim=(1, 2)) / denom, (hit * weight).sum(dim=(1, 2)) / denom


def image_side_ce(
    text: torch.Tensor, pos: torch.Tensor, pos_mask: torch.Tensor, scale: float, others: torch.Tensor | None = None
) -> torch.Tensor:
    """Each concept's images classified among all C tokens learned together (template-mean features).

    Couples the concepts of a step (unlike `text_side_ce`), which is why it is optional. ``others`` [K, D]
    are further, fixed competitors (normalised prototypes of concepts of the group that stopped learning).
    Returns the per-concept mean loss [C].
    """
    proto = F.normalize(text.mean(dim=1), dim=-1)  # [C, D]
    if others is not None and others.shape[0]:
        proto = torch.cat([proto, others.to(proto)])
    logits = scale * torch.einsum("cnd,kd->cnk", pos, proto)  # [C, N, C + K]
    c, n, k = logits.shape
    target = torch.arange(c, device=logits.device)[:, None].expand(c, n)
    loss = F.cross_entropy(logits.reshape(c * n, k), target.reshape(-1), reduction="none").view(c, n)
    w = pos_mask.float()
    return (loss * w).sum(1) / w.sum(1).clamp_min(1.0)


def textual_inversion_loss(
    unet, scheduler, latents: torch.Tensor, cond: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """Per-sample denoising MSE [B] of ``unet`` conditioned on text hidden states ``cond`` [B, L, w].

    ``noise`` and ``timesteps`` are drawn by the caller (per concept, from its own generator), which is
    what makes learning deterministic and independent of batch composition. Works with any diffusers
    `UNet2DConditionModel` and a scheduler with `add_noise` (epsilon, v-prediction or sample targets).
    """
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy.to(unet.dtype), timesteps, encoder_hidden_states=cond.to(unet.dtype)).sample
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    elif kind == "sample":
        target = latents
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}")
    return (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
