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
averages gradients across workers through the ``grad_sync`` hook.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from factory.backbones import Backbone

log = logging.getLogger(__name__)

# (images uint8 [N, H, W, 3], captions) for a batch size and a NumPy generator.
BatchFn = Callable[[int, np.random.Generator], tuple[np.ndarray, list[str]]]


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

    def __post_init__(self):
        if self.stage not in ("clip", "unet"):
            raise ValueError(f"stage must be 'clip' or 'unet', got {self.stage!r}")
        if self.towers not in ("both", "image"):
            raise ValueError(f"towers must be 'both' or 'image', got {self.towers!r}")


class Pretrainer:
    def __init__(self, backbone: Backbone, cfg: PretrainConfig, batches: BatchFn,
                 grad_sync: Callable[[list[torch.Tensor]], None] | None = None, rank: int = 0):
        self.backbone, self.cfg, self.batches, self.grad_sync = backbone, cfg, batches, grad_sync
        backbone.requires_grad_(False)
        self.module = backbone.clip if cfg.stage == "clip" else backbone.generator.unet
        trained = [self.module] if cfg.stage == "unet" or cfg.towers == "both" else backbone.image_tower()
        for m in trained:
            m.requires_grad_(True).train()
        if cfg.stage == "clip":
            backbone.clip.logit_scale.requires_grad_(True)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
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
    def _clip_loss(self, images, captions) -> torch.Tensor:
        bb = self.backbone
        img = F.normalize(bb.encode_image(bb.preprocess(images)), dim=-1)
        txt = F.normalize(bb.encode_prompts(captions).features, dim=-1)
        logits = bb.clip.logit_scale.exp().clamp(max=100) * img @ txt.T
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T))

    def _unet_loss(self, images, captions) -> torch.Tensor:
        bb, gen = self.backbone, self.backbone.generator
        drop = self.rng.random(len(captions)) < self.cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop)]
        with torch.no_grad():
            cond = bb.encode_prompts(captions).hidden
            x0 = gen.encode(bb.generator_pixels(images))
        noise = torch.randn(x0.shape, generator=self.torch_gen)
        t = torch.randint(self.noise.config.num_train_timesteps, (x0.shape[0],), generator=self.torch_gen)
        pred = gen.unet(self.noise.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        if self.cfg.min_snr_gamma > 0:
            ac = self.noise.alphas_cumprod[t]
            snr = ac / (1 - ac)
            per_sample = per_sample * snr.clamp(max=self.cfg.min_snr_gamma) / snr
        return per_sample.mean()

    def train_steps(self, n: int) -> dict[str, float]:
        """Run up to ``n`` steps (never past ``cfg.steps``); returns the mean loss and the rate."""
        losses, t0 = [], time.perf_counter()
        for _ in range(min(n, self.cfg.steps - self.step)):
            images, captions = self.batches(self.cfg.batch_size, self.rng)
            loss = (self._clip_loss if self.cfg.stage == "clip" else self._unet_loss)(images, captions)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"pretraining loss became {float(loss)} at step {self.step}; lower --lr")
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
            losses.append(float(loss.detach()))
        dt = time.perf_counter() - t0
        return {"step": self.step, "loss": float(np.mean(losses)) if losses else float("nan"),
                "steps_per_s": len(losses) / dt if dt > 0 else 0.0, "lr": self.sched.get_last_lr()[0]}

    @torch.no_grad()
    def _update_ema(self):
        d = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))  # warm-up so early EMA is not stale
        for e, p in zip(self.ema.parameters(), self.module.parameters()):
            e.lerp_(p, 1 - d)

    # ---- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"config": asdict(self.cfg), "step": self.step, "module": self.module.state_dict(),
                "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "rng": self.rng.bit_generator.state, "torch_gen": self.torch_gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if state["config"]["stage"] != self.cfg.stage:
            raise ValueError(f"checkpoint is of stage {state['config']['stage']!r}, not {self.cfg.stage!r}")
        if state["config"].get("towers", "both") != self.cfg.towers:
            raise ValueError(f"checkpoint trained towers={state['config'].get('towers', 'both')!r}, this run "
                             f"towers={self.cfg.towers!r}: use another --out, or the same setting")
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
