"""Pretraining of a backbone on rendered images with captions (the embedded default's recipe).

Two stages, run one after the other, because the generator is conditioned on the text encoder's hidden
states and must not chase a moving target:

* ``clip``: contrastive image-caption training of the CLIP pair. Captions that repeat within a batch
  (partial captions like "a dress" often do) are soft positives of each other, not false negatives.
  ``towers="image"`` trains only the image tower against the frozen text tower (as LiT does the other
  way round): it keeps the generator's conditioning valid, so a trained pair can be improved afterwards
  without retraining its UNet.
* ``unet``: the diffusion UNet learns to denoise images conditioned on the *frozen* text encoder, with
  caption dropout (for classifier-free guidance), min-SNR loss weighting and an EMA of its weights.

Plain PyTorch: the Ray Train job in `jobs/pretrain.py` drives it, checkpoints its `state_dict` and
averages gradients across workers through the ``grad_sync`` hook (`average_gradients`: one flat
all-reduce per bucket, not one per parameter tensor).

On a GPU (the backbone moved there before the `Pretrainer` is built): ``precision="bf16"`` runs the
forward passes under bf16 autocast with fp32 master weights, random draws stay on the CPU generator
(so a seed means the same noise on every device) and are copied over, and a step makes no host
synchronisation, so the host renders the next batch while the GPU computes: the losses are read back
once per `Pretrainer.train_steps` call. ``precision="fp32"`` (the CPU default) computes exactly what
it always did.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from factory.backbones import Backbone
from factory.device import to_device
from factory.errors import ConfigError

log = logging.getLogger(__name__)

# (images uint8 [N, H, W, 3], captions) for a batch size and a NumPy generator.
BatchFn = Callable[[int, np.random.Generator], tuple[np.ndarray, list[str]]]

# Pretraining precisions. Why not fp16: fp16 autocast needs a loss scaler (its range flushes small
# gradients) that this trainer does not have; bf16 has fp32's range, so it needs none.
PRETRAIN_PRECISIONS = ("fp32", "bf16")

# Bytes of gradients per all-reduce: DDP's default bucket (25 MiB). One bucket per call instead of one
# call per parameter tensor: each NCCL call has a fixed launch + latency cost (tens of µs), and a
# step of fashion-mini's UNet has hundreds of parameter tensors, most of them a few KiB.
BUCKET_BYTES = 25 * 2**20


def gradient_buckets(grads: list[torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> list[list[torch.Tensor]]:
    """Split ``grads`` into consecutive buckets of one dtype and device, each of at most ``bucket_bytes``
    (a single larger tensor gets a bucket of its own). Order is kept, so every worker, holding the same
    parameters, builds the same buckets: a requirement of collectives."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        last = buckets[-1] if buckets else None
        if last is None or last[0].dtype != g.dtype or last[0].device != g.device or size + nbytes > bucket_bytes:
            buckets.append([g])
            size = nbytes
        else:
            last.append(g)
            size += nbytes
    return buckets


def average_gradients(
    grads: list[torch.Tensor],
    world_size: int,
    all_reduce: Callable[[torch.Tensor], object],
    bucket_bytes: int = BUCKET_BYTES,
) -> None:
    """Average ``grads`` in place across ``world_size`` workers, one ``all_reduce`` (a sum, e.g.
    ``torch.distributed.all_reduce``) per bucket of flattened gradients (`gradient_buckets`).

    Each element is summed, then divided by the world size, as the per-tensor loop this replaces did.
    """
    if world_size <= 1:
        return
    for bucket in gradient_buckets(grads, bucket_bytes):
        flat = _flatten_dense_tensors(bucket)
        all_reduce(flat)
        flat /= world_size
        for g, avg in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(avg)


@dataclass
class PretrainConfig:
    stage: str = "clip"  # "clip" or "unet"
    steps: int = 2000
    batch_size: int = 256
    lr: float = 7e-4
    weight_decay: float = 0.1
    warmup: int = 100
    caption_dropout: float = 0.1  # unet: share of empty captions, for classifier-free guidance
    ema_decay: float = 0.999  # unet
    min_snr_gamma: float = 5.0  # unet: min-SNR-γ loss weighting (Hang et al. 2023); 0 disables
    towers: str = "both"  # clip: "both", or "image" (the text tower stays frozen)
    seed: int = 0
    precision: str = "fp32"  # "fp32", or "bf16": autocast of the forward passes (weights stay fp32)

    def __post_init__(self):
        if self.stage not in ("clip", "unet"):
            raise ConfigError(f"stage must be 'clip' or 'unet', got {self.stage!r}")
        if self.towers not in ("both", "image"):
            raise ConfigError(f"towers must be 'both' or 'image', got {self.towers!r}")
        if self.precision not in PRETRAIN_PRECISIONS:
            hint = (
                ": fp16 would need loss scaling, which pretraining does not do; use bf16"
                if self.precision == "fp16"
                else ""
            )
            raise ConfigError(
                f"pretraining precision must be one of {list(PRETRAIN_PRECISIONS)}, got {self.precision!r}{hint}"
            )


class Pretrainer:
    def __init__(
        self,
        backbone: Backbone,
        cfg: PretrainConfig,
        batches: BatchFn,
        grad_sync: Callable[[list[torch.Tensor]], None] | None = None,
        rank: int = 0,
    ):
        self.backbone, self.cfg, self.batches, self.grad_sync = backbone, cfg, batches, grad_sync
        backbone.requires_grad_(False)
        self.module = backbone.clip if cfg.stage == "clip" else backbone.generator.unet
        trained = [self.module] if cfg.stage == "unet" or cfg.towers == "both" else backbone.image_tower()
        for m in trained:
            m.requires_grad_(True).train()
        if cfg.stage == "clip":
            backbone.clip.logit_scale.requires_grad_(True)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.device = self.params[0].device
        # The fused AdamW (one kernel for all parameters) on GPUs; the CPU keeps the default
        # implementation, so CPU runs compute what they always did.
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.ema = copy.deepcopy(self.module).requires_grad_(False).eval() if cfg.stage == "unet" else None
        self.noise = backbone.generator.noise_scheduler() if cfg.stage == "unet" else None
        self.rng = np.random.default_rng([cfg.seed, rank])
        self.torch_gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
        self.step = 0
        self._uncond = None

    def _lr_factor(self, step: int) -> float:
        if step < self.cfg.warmup:
            return (step + 1) / self.cfg.warmup
        progress = (step - self.cfg.warmup) / max(1, self.cfg.steps - self.cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    # ---- steps -----------------------------------------------------------------------------------
    def _autocast(self):
        """bf16 autocast on the training device for ``precision="bf16"``; nothing at all for fp32 (not even a
        disabled autocast), so fp32 runs are the computation they always were."""
        if self.cfg.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _images(self, images):
        """The batch's uint8 images on the training device, copied from pinned memory without blocking
        (`factory.device.to_device`); `Backbone.preprocess` and `generator_pixels` then convert and resize
        them there. On the CPU the same values as the NumPy path: the tensor shares the array's memory."""
        if isinstance(images, np.ndarray) and images.dtype == np.uint8:
            return to_device(torch.from_numpy(np.require(images, requirements=["C", "W"])), self.device)
        return images

    def _clip_loss(self, images, captions) -> torch.Tensor:
        bb = self.backbone
        with self._autocast():
            img = F.normalize(bb.encode_image(bb.preprocess(images)), dim=-1)
            txt = F.normalize(bb.encode_prompts(captions).features, dim=-1)
            logits = bb.clip.logit_scale.exp().clamp(max=100) * img @ txt.T
        logits = logits.float()  # the softmax over the batch in fp32 (a no-op in fp32 runs)
        # Which captions are equal, on the logits' device: caption ids are found on the host (strings),
        # copied over as one small integer tensor, and compared there.
        _, ids = np.unique(np.asarray(captions, dtype=object), return_inverse=True)
        ids = to_device(torch.from_numpy(ids.reshape(-1).astype(np.int64)), logits.device)
        same = (ids[:, None] == ids[None, :]).to(torch.float32)
        target = same / same.sum(1, keepdim=True)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T))

    def _unet_loss(self, images, captions) -> torch.Tensor:
        bb, gen = self.backbone, self.backbone.generator
        drop = self.rng.random(len(captions)) < self.cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop)]
        with torch.no_grad():
            # The conditioning in fp32, outside autocast: the generator is conditioned on the fp32 text
            # tower at inference (`Backbone.cast_precision` keeps it fp32), so it trains on the same.
            cond = bb.encode_prompts(captions).hidden
            x0 = gen.encode(bb.generator_pixels(images))
        # Drawn on the CPU generator, then copied: the same seed gives the same noise and timesteps on
        # every device, and the generator's state is what checkpoints save.
        noise = to_device(torch.randn(x0.shape, generator=self.torch_gen), x0.device)
        t = to_device(
            torch.randint(self.noise.config.num_train_timesteps, (x0.shape[0],), generator=self.torch_gen), x0.device
        )
        with self._autocast():
            pred = gen.unet(self.noise.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
        per_sample = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
        if self.cfg.min_snr_gamma > 0:
            # Moved explicitly: `add_noise` happens to move the scheduler's table as a side effect, but the
            # loss should not depend on that.
            ac = self.noise.alphas_cumprod.to(x0.device)[t]
            snr = ac / (1 - ac)
            per_sample = per_sample * snr.clamp(max=self.cfg.min_snr_gamma) / snr
        return per_sample.mean()

    def train_steps(self, n: int, deadline: float | None = None) -> dict[str, float]:
        """Run up to ``n`` steps (never past ``cfg.steps``, and none started after ``deadline``, a
        `time.time()`); returns the mean loss and the rate.

        The losses stay on the device until the end of the call: reading each one back (``float(loss)``,
        ``isfinite``) would make the host wait for the GPU every step. A non-finite loss is therefore
        reported at the end of the call (naming its step), before the caller can checkpoint the state.
        """
        losses, t0, first = [], time.perf_counter(), self.step
        for _ in range(min(n, self.cfg.steps - self.step)):
            if deadline is not None and time.time() >= deadline:
                break
            images, captions = self.batches(self.cfg.batch_size, self.rng)
            images = self._images(images)
            loss = (self._clip_loss if self.cfg.stage == "clip" else self._unet_loss)(images, captions)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_sync is not None:
                self.grad_sync([p.grad for p in self.params if p.grad is not None])
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.sched.step()
            if self.ema is not None:
                self._update_ema()
            self.step += 1
            losses.append(loss.detach())
        values = torch.stack(losses).double().cpu().numpy() if losses else np.zeros(0)
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise FloatingPointError(
                f"pretraining loss became {values[bad[0]]} at step {first + int(bad[0])}; lower --lr"
            )
        dt = time.perf_counter() - t0
        return {
            "step": self.step,
            "loss": float(np.mean(values)) if len(values) else float("nan"),
            "steps_per_s": len(values) / dt if dt > 0 else 0.0,
            "lr": self.sched.get_last_lr()[0],
        }

    @torch.no_grad()
    def _update_ema(self):
        d = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))  # warm-up so early EMA is not stale
        # One multi-tensor kernel on GPUs instead of one per parameter (on the CPU, the same per-tensor lerp).
        torch._foreach_lerp_(list(self.ema.parameters()), list(self.module.parameters()), 1 - d)

    # ---- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "config": asdict(self.cfg),
            "step": self.step,
            "module": self.module.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": self.rng.bit_generator.state,
            "torch_gen": self.torch_gen.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["config"]["stage"] != self.cfg.stage:
            raise ValueError(f"checkpoint is of stage {state['config']['stage']!r}, not {self.cfg.stage!r}")
        if state["config"].get("towers", "both") != self.cfg.towers:
            raise ValueError(
                f"checkpoint trained towers={state['config'].get('towers', 'both')!r}, this run "
                f"towers={self.cfg.towers!r}: use another --out, or the same setting"
            )
        self.module.load_state_dict(state["module"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.rng.bit_generator.state = state["rng"]
        self.torch_gen.set_state(state["torch_gen"])
        self.step = state["step"]

    def finish(self) -> Backbone:
        """Put the trained (EMA, for the UNet) weights into the backbone and freeze it."""
        if self.ema is not None:
            self.module.load_state_dict(self.ema.state_dict())
        return self.backbone.freeze()
