"""Onboarding at production size on one GPU, beside its anchor: concepts per GPU-minute, MFU, memory, encoding.

Models are random-init at the real shapes (OpenAI CLIP ViT-L/14 + the SD 1.5 UNet and VAE, 512 px;
nothing is downloaded), built from the configs below through the same `create_backbone` the factory uses,
and placed as a Ray Train worker places them (text tower + UNet on the device, image tower and VAE off it).

What it measures, and how it keeps the numbers honest:
- **Learner** (`learn_tokens` through its public API, C concepts at a time): it times a 1-step and an N-step
  run and takes the difference, so a step's time is not mixed with the per-run one-off cost (λ_TI
  calibration, subspaces, the final evaluation), which is reported apart (``one_off_s``).
  ``concepts_per_gpu_minute`` = 60·C / (one_off_s + --steps · s_per_step). ``mfu`` = the FLOPs of one step
  (counted by ``torch.utils.flop_counter`` as a 2-step minus a 1-step run, without gradient checkpointing's
  recompute: model FLOPs) / s_per_step / --peak-tflops (790 TFLOP/s: H200 dense bf16).
- **Anchor**: the diffusers ``examples/textual_inversion`` recipe step on the same shapes, in the same run:
  bf16 mixed precision (UNet and VAE in bf16, the trained text encoder fp32 under autocast), the VAE
  encoding the image every step, AdamW on the whole embedding table with the other rows restored after
  each step, batch 1 × gradient accumulation 4, 3,000 optimizer steps per concept. Written here from
  diffusers/transformers components (not the example script, which needs a hub download).
  ``speedup_vs_diffusers_ti`` = the learner's concepts/GPU-minute over the anchor's;
  ``samples_per_s_vs_diffusers_ti`` = its UNet samples/s over the anchor's.
- **Memory modes**: ``plain`` (one UNet batch), ``checkpointing`` (gradient checkpointing + TI micro-batches
  of --micro) and ``budget`` (the micro-batch and checkpointing that `factory.memory.auto_ti_micro_batch`
  plans for --budget-gib of device memory, e.g. 40 for an A100-40GB); each row has its measured peak and
  the plan's ``peak_gib_planned`` beside it.
- **Encoding stage** (images/s): uint8 images to the device, resized and normalised there, through only
  the image tower and the VAE, in batches of at most --encode-batch (``encode_images_per_s``); the
  factory's `encode_images` (CPU preprocessing) beside it (``encode_images_per_s_factory``).
- **Speed levers** (`factory.gpu_tuning.tune_unet`, one flag each so each is measured on its own):
  --compile, --channels-last, --attention {default,flash,efficient,cudnn,math}.

    python benchmarks/gpu_onboard.py                   # on a GPU machine, unattended, under --max-minutes
    python benchmarks/gpu_onboard.py --tiny            # CPU smoke test with tiny models (CI runs it)
    python benchmarks/gpu_onboard.py --meta-memory     # no device: peak memory of learn_tokens (calibration
                                                       # pass and a step), computed on the meta device

JSON (--out, default build/gpu_onboard.json): ``runs`` (one row per C × precision × mode), ``anchor_diffusers_ti``,
``speedup_vs_diffusers_ti`` and ``samples_per_s_vs_diffusers_ti`` (of the run with the most concepts/GPU-minute),
``encode_images_per_s``, ``encode_images_per_s_factory``, ``device``, ``config``; with --meta-memory,
``memory_computed``. `benchmarks/gpu_check.sh` (``make gpu-check``) runs it on a GPU machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factory.backbones import PRECISIONS, BackboneConfig, create_backbone  # noqa: E402
from factory.concepts import negative_banks  # noqa: E402
from factory.gpu_tuning import ATTENTION_BACKENDS, tune_unet  # noqa: E402
from factory.learner import ConceptData, LearnerConfig, learn_tokens  # noqa: E402
from factory.memory import (  # noqa: E402
    GiB,
    PeakBytes,
    auto_ti_micro_batch,
    fused_attention,
    measure_ti_memory,
    planned_peak_bytes,  # noqa: E402
)

H200_BF16_TFLOPS = 790.0  # dense bf16 tensor-core peak of an H200 SXM (NVIDIA's datasheet: 1,979 with sparsity / 2.5)
ANCHOR_STEPS = 3000  # the diffusers textual-inversion README's max_train_steps (optimizer steps)
ANCHOR_ACCUMULATION = 4  # ... at train_batch_size 1 and gradient_accumulation_steps 4
MODES = ("plain", "checkpointing", "budget")

# OpenAI CLIP ViT-L/14 (HF CLIPConfig) and Stable Diffusion 1.5's UNet / VAE (their config.json values).
VIT_L14 = {
    "projection_dim": 768,
    "text_config": {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    },
    "vision_config": {
        "image_size": 224,
        "patch_size": 14,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
    },
}
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 512,
}
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
TINY = {
    "clip": {
        "projection_dim": 32,
        "text_config": {
            **VIT_L14["text_config"],
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        "vision_config": {
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
    },
    "unet": {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": [16, 32],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
    },
    "vae": {
        **SD15_VAE,
        "block_out_channels": [8, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "norm_num_groups": 4,
        "layers_per_block": 1,
        "sample_size": 16,
    },
    "image": 32,
}


def backbone_config(tiny: bool) -> BackboneConfig:
    clip, unet, vae = (TINY["clip"], TINY["unet"], TINY["vae"]) if tiny else (VIT_L14, SD15_UNET, SD15_VAE)
    return BackboneConfig.from_dict(
        {
            "name": "tiny-vit+sd" if tiny else "vit-l14+sd15-shapes",
            "family": "hf-clip",
            "clip": clip,
            "tokenizer": {"context_length": 77, "pad": "eot"},
            "image": {"size": TINY["image"] if tiny else 224},
            "generator": {"unet": unet, "vae": vae, "scheduler": SD_SCHEDULE, "latent_scale": 0.18215},
        }
    )


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def build(tiny: bool, precision: str, device: str = "cpu"):
    """The random-init backbone at ``precision``, every part on ``device`` (initialised there: random init of
    ViT-L/14 + SD 1.5 on the CPU alone takes longer than a GPU run). Its fingerprint is named, not hashed."""
    with torch.device(device):
        backbone = create_backbone(backbone_config(tiny))
    backbone._fingerprint = "random-init-" + backbone.name
    return backbone.freeze().to(PRECISIONS[precision])


def train_placement(backbone, device: str):
    """A Ray Train worker's placement: text tower + UNet on ``device``, the image tower and VAE on the CPU
    (image features and latents are computed before learning)."""
    backbone.to_training_device(device)
    for m in backbone.image_tower():
        m.to("cpu")
    if backbone.generator.vae is not None:
        backbone.generator.vae.to("cpu")
    if device == "cuda":
        torch.cuda.empty_cache()
    return backbone


def resident_bytes(backbone) -> int:
    """Bytes of the weights a Train worker keeps on its device (text tower + UNet)."""
    away = {id(p) for m in [*backbone.image_tower(), backbone.generator.vae] if m is not None for p in m.parameters()}
    return sum(t.numel() * t.element_size() for t in [*backbone.parameters(), *backbone.buffers()] if id(t) not in away)


def concepts(backbone, c: int, shots: int = 4) -> list[ConceptData]:
    g = torch.Generator().manual_seed(0)
    dim = backbone.clip.config.projection_dim
    s, ch = backbone.generator.unet.config.sample_size, backbone.generator.latent_channels
    return [
        ConceptData(f"c{i}", "dress", torch.randn(shots, dim, generator=g), torch.randn(shots, ch, s, s, generator=g))
        for i in range(c)
    ]


def learner(args, steps: int, checkpointing: bool, micro: int) -> LearnerConfig:
    return LearnerConfig(
        steps=steps, ti_samples=args.ti_samples, log_every=0, gradient_checkpointing=checkpointing, ti_micro_batch=micro
    )


def _flop_context():
    """FLOPs are counted eagerly: a compiled UNet's graph hides its ops from the counter."""
    try:
        return torch.compiler.set_stance("force_eager")
    except AttributeError:
        return contextlib.nullcontext()


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with _flop_context(), counter:
        fn()
    return counter.get_total_flops()


def plan_mode(backbone, c: int, mode: str, args, device: str) -> tuple[int, bool]:
    if mode == "plain":
        return 0, False
    if mode == "checkpointing":
        return args.micro, True
    free = int(args.budget_gib * GiB) - resident_bytes(backbone)  # the budget less the resident weights
    return auto_ti_micro_batch(backbone, learner(args, 1, False, 0), c, free)


_FLOPS: dict[tuple, int] = {}


def measure(backbone, c: int, args, mode: str, device: str) -> dict:
    """One learner row: 1-step and N-step runs timed, their difference a step; FLOPs of a step; peak memory."""
    data = concepts(backbone, c)
    banks = negative_banks(data)  # the other concepts as negatives: the CE term and λ_TI calibration are real
    micro, ckpt = plan_mode(backbone, c, mode, args, device)
    n = max(2, args.measure_steps)

    def run(steps: int, cfg_micro=micro, cfg_ckpt=ckpt) -> float:
        _sync(device)
        t0 = time.perf_counter()
        learn_tokens(backbone, data, banks, learner(args, steps, cfg_ckpt, cfg_micro))
        _sync(device)
        return time.perf_counter() - t0

    if not args.tiny:
        run(1)  # warm-up: kernels, cuDNN autotuning, compilation, the allocator's pools
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t1, tn = run(1), run(n)
    per_step, one_off, timing = _split(t1, tn, n)
    peak = torch.cuda.max_memory_allocated() / GiB if device == "cuda" else None
    # Model FLOPs: without checkpointing's recompute (micro-batch 1 then, which fits wherever checkpointing
    # does), counted once per C and dtype: they depend on neither the micro-batch nor the levers.
    key = (c, str(backbone.generator.unet.dtype))
    if key not in _FLOPS:
        f_micro, f_ckpt = (1, False) if ckpt else (micro, False)
        _FLOPS[key] = count_flops(lambda: run(2, f_micro, f_ckpt)) - count_flops(lambda: run(1, f_micro, f_ckpt))
    flops = _FLOPS[key]
    cost = measure_ti_memory(backbone)
    planned = (
        resident_bytes(backbone) + planned_peak_bytes(backbone, learner(args, 1, ckpt, micro), c, micro, ckpt, cost)
    ) / GiB
    samples = c * args.ti_samples
    return {
        "c": c,
        "mode": mode,
        "checkpointing": ckpt,
        "ti_micro_batch": micro,
        "ti_samples": args.ti_samples,
        "s_per_step": per_step,
        "one_off_s": one_off,
        "measure_steps": n,
        "timing": timing,
        "concepts_per_gpu_minute": 60.0 * c / (one_off + args.steps * per_step),
        "unet_samples_per_s": samples / per_step,
        "flops_per_step": flops,
        "mfu": flops / per_step / (args.peak_tflops * 1e12),
        "peak_gpu_gib": peak,
        "peak_gib_planned": planned,
        "resident_gib": resident_bytes(backbone) / GiB,
        **(
            {"budget_gib": args.budget_gib, "fits_budget": peak is None or peak <= args.budget_gib}
            if mode == "budget"
            else {}
        ),
    }


def _split(t1: float, tn: float, n: int) -> tuple[float, float, str]:
    """(s per step, one-off s, how) from a 1-step and an n-step run: their difference is n - 1 steps. On a
    loaded CPU (the --tiny smoke test) the n-step run can come out no slower than the 1-step one; then the
    whole n-step run counts as steps (an upper bound on a step, no one-off), and the row says so."""
    if tn > t1:
        per_step = (tn - t1) / (n - 1)
        return per_step, max(t1 - per_step, 0.0), "difference of a 1-step and an N-step run"
    return tn / n, 0.0, "noisy: the N-step run was not slower than the 1-step run; N-step run / N (upper bound)"


# ---- the anchor: diffusers' textual-inversion recipe step ------------------------------------------------


def anchor_diffusers_ti(tiny: bool, args, device: str) -> dict:
    """Seconds per optimizer step of diffusers' ``examples/textual_inversion`` at its README recipe, on the
    same shapes, with components of its own (random init on the device; nothing shared with the learner's
    tuned UNet). The data loader is left out (one image stays on the device): a cost the recipe has and
    this measurement does not, so the anchor is if anything flattered."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    clip, unet_cfg, vae_cfg = (TINY["clip"], TINY["unet"], TINY["vae"]) if tiny else (VIT_L14, SD15_UNET, SD15_VAE)
    bf16 = torch.bfloat16
    with torch.device(device):
        text = CLIPTextModel(CLIPTextConfig(**clip["text_config"]))  # fp32: it is what the recipe trains
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
    torch.nn.Module.to(unet, bf16)  # weight_dtype = bf16 for the frozen models (mixed_precision="bf16")
    torch.nn.Module.to(vae, bf16)
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    text.requires_grad_(False)
    emb = text.get_input_embeddings()
    emb.weight.requires_grad_(True)  # the recipe trains the whole embedding table ...
    orig = emb.weight.detach().clone()
    placeholder = clip["text_config"]["vocab_size"] - 1
    keep = torch.ones(emb.weight.shape[0], dtype=torch.bool, device=device)
    keep[placeholder] = False  # ... and restores every row but the placeholder's after each step
    opt = torch.optim.AdamW([emb.weight], lr=5e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    sched = DDPMScheduler(**SD_SCHEDULE)
    size = vae_cfg["sample_size"]
    g = torch.Generator(device=device).manual_seed(0)
    pixels = torch.rand(1, 3, size, size, generator=g, device=device) * 2 - 1
    ids = torch.randint(0, placeholder, (1, 77), generator=g, device=device)
    ids[0, 5] = placeholder
    text.train()

    def step():  # one optimizer step = ANCHOR_ACCUMULATION micro-steps of batch 1
        for _ in range(ANCHOR_ACCUMULATION):
            latents = vae.encode(pixels.to(bf16)).latent_dist.sample().detach() * 0.18215
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (1,), device=device)
            noisy = sched.add_noise(latents, noise, t)
            with torch.autocast(device_type=device, dtype=bf16):
                cond = text(ids)[0].to(bf16)
                pred = unet(noisy, t, cond).sample
            loss = F.mse_loss(pred.float(), noise.float()) / ANCHOR_ACCUMULATION
            loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            emb.weight[keep] = orig[keep]

    def timed(k: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(k):
            step()
        _sync(device)
        return time.perf_counter() - t0

    timed(1)  # warm-up
    n = max(2, args.anchor_steps)
    t1, tn = timed(1), timed(n)
    per_step, _, timing = _split(t1, tn, n)
    flops = count_flops(step)
    out = {
        "s_per_optimizer_step": per_step,
        "timing": timing,
        "optimizer_steps": ANCHOR_STEPS,
        "batch": 1,
        "gradient_accumulation": ANCHOR_ACCUMULATION,
        "precision": "bf16 mixed",
        "concepts_per_gpu_minute": 60.0 / (ANCHOR_STEPS * per_step),
        "unet_samples_per_s": ANCHOR_ACCUMULATION / per_step,
        "flops_per_step": flops,
        "mfu": flops / per_step / (args.peak_tflops * 1e12),
    }
    return out  # its models are freed here; the caller empties the CUDA cache


# ---- the encoding stage ------------------------------------------------------------------------------------


@torch.no_grad()
def encode_on_device(backbone, images: torch.Tensor, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, H, W, 3] (pinned on a GPU machine) -> (CLIP features, latents), preprocessing on the
    device: a quarter of fp32's bytes cross the bus, and the resizes run there instead of on one CPU thread.
    Batches of at most ``batch`` bound the VAE's activations at 512 px."""
    tower = next(backbone.image_tower()[0].parameters())
    size, gen_size = backbone.config.image.size, backbone.generator.image_size
    mean = torch.tensor(backbone.config.image.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.config.image.std, device=device).view(1, 3, 1, 1)
    feats, lats = [], []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        px = (
            x
            if x.shape[-1] == size
            else F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
        )
        feats.append(backbone.image_features(((px - mean) / std).to(tower.dtype)).float())
        gx = (
            x
            if x.shape[-1] == gen_size
            else F.interpolate(
                x, size=(gen_size, gen_size), mode="bicubic", antialias=True, align_corners=False
            ).clamp_(0, 1)
        )
        lats.append(backbone.generator.encode(gx * 2 - 1).float())
    return torch.cat(feats).cpu(), torch.cat(lats).cpu()


def encode_rates(backbone, args, device: str) -> tuple[float, float]:
    """(device-side images/s, the factory's `encode_images` images/s) with every part on ``device``."""
    from factory.concepts import encode_images

    size = backbone.generator.image_size
    images = torch.randint(0, 255, (args.encode_images, size, size, 3), dtype=torch.uint8)
    if device == "cuda":
        images = images.pin_memory()
    encode_on_device(backbone, images[:2], args.encode_batch, device)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    encode_on_device(backbone, images, args.encode_batch, device)
    _sync(device)
    ours = args.encode_images / (time.perf_counter() - t0)
    arr = images.numpy()
    encode_images(backbone, arr[:2], batch_size=args.encode_batch)
    _sync(device)
    t0 = time.perf_counter()
    encode_images(backbone, arr, batch_size=args.encode_batch)
    _sync(device)
    return ours, args.encode_images / (time.perf_counter() - t0)


# ---- memory computed on the meta device ----------------------------------------------------------------------


def meta_memory(args) -> list[dict]:
    """Peak memory of `learn_tokens` at production size, computed on the meta device (shapes only).

    Modelled as the learner runs: the λ_TI calibration pass (`factory.objective.ti_weights`, the learner's
    own call) and then a step (`factory.objective.objective_terms` and the backward pass, TI micro-batches
    cut at the text states as in the learner), under gradient checkpointing for the whole of it where the
    mode asks for it. Memory = the weights a Train worker keeps on its device (text tower + UNet,
    `Backbone.to_training_device`) + the peak of everything allocated; attention counted as a fused SDPA
    kernel holds it. The allocator's rounding and cuDNN/cuBLAS workspaces come on top (the plan's margin).
    """
    from factory.objective import objective_terms, ti_weights
    from factory.tokens import TokenParameters, marker

    prev = torch.get_default_dtype()
    torch.set_default_dtype(PRECISIONS[args.meta_precision])
    try:
        with torch.device("meta"):
            backbone = create_backbone(backbone_config(args.tiny))
    finally:
        torch.set_default_dtype(prev)
    backbone._fingerprint = "random-init-" + backbone.name
    backbone.freeze()
    away = {id(p) for m in [*backbone.image_tower(), backbone.generator.vae] for p in m.parameters()}
    on_gpu = [p for p in backbone.parameters() if id(p) not in away] + list(backbone.buffers())
    resident = sum(t.numel() * t.element_size() for t in on_gpu)
    cost = measure_ti_memory(backbone)
    scale, rows = 100.0, []  # CLIP's logit scale (a value: the meta device holds none)
    unet = backbone.generator.unet
    for c in args.concepts:
        for mode, checkpointing, micro in (
            ("plain", False, 0),
            ("checkpointing", True, 0),
            ("micro", False, args.micro),
            ("checkpointing", True, args.micro),
        ):
            cfg = learner(args, 1, checkpointing, micro)
            scheduler = backbone.generator.noise_scheduler()
            with torch.device("meta"):
                data = concepts(backbone, c)
                pos = F.normalize(torch.stack([d.image_features for d in data]), dim=-1)
                mask = torch.ones(pos.shape[:2], dtype=torch.bool)
                init = torch.zeros(c, backbone.token_dim)
                params = TokenParameters(init)  # free tokens: the projected mode's [C, k] differs by kilobytes
            # The learner's group (`factory.learner._Group`), by the fields the objective reads: every other
            # concept is a negative, as with `negative_banks` of one parent.
            group = SimpleNamespace(
                concepts=data,
                pos=pos,
                pos_mask=mask,
                neg=pos.repeat(1, c, 1),
                neg_mask=mask.repeat(1, c),
                init=init,
                gens=[torch.Generator().manual_seed(i) for i in range(c)],
                template_gens=[torch.Generator().manual_seed(-1 - i) for i in range(c)],
            )
            batch = backbone.tokenize(
                [t.format(concept=marker(d.concept_id), parent="dress") for d in data for t in cfg.templates]
            )
            if checkpointing:
                unet.enable_gradient_checkpointing()
            try:
                with fused_attention(), PeakBytes(on_gpu + list(params.parameters()) + list(params.buffers())) as peak:
                    ti_weight, _ = ti_weights(backbone, cfg, group, batch, params, scale, scheduler)
                    calibration = peak.peak
                    peak.peak = peak.current
                    vectors = params()
                    enc = backbone.encode_text(batch, vectors)
                    text = F.normalize(enc.features.float(), dim=-1).view(c, len(cfg.templates), -1)
                    cut = enc.hidden.detach().requires_grad_() if micro else enc.hidden
                    terms = objective_terms(backbone, cfg, group, text, cut, scale, scheduler, vectors, ti_weight)
                    if micro:
                        rest = sum(v for k, v in terms.items() if k != "ti")
                        (rest.sum() + (enc.hidden * cut.grad).sum()).backward()
                    else:
                        sum(terms.values()).sum().backward()
                    step = peak.peak
            finally:
                unet.disable_gradient_checkpointing()
            planned = resident + planned_peak_bytes(backbone, cfg, c, micro, checkpointing, cost)
            row = {
                "c": c,
                "precision": args.meta_precision,
                "checkpointing": checkpointing,
                "ti_micro_batch": micro,
                "ti_samples": args.ti_samples,
                "peak_gib_computed": (resident + max(calibration, step)) / GiB,
                "calibration_gib_computed": (resident + calibration) / GiB,
                "step_gib_computed": (resident + step) / GiB,
                "peak_gib_planned": planned / GiB,
                "weights_gib": resident / GiB,
                "placement": "train worker (text tower + UNet)",
                "method": "computed: meta device + dispatch-mode byte count of learn_tokens' calibration and step",
            }
            rows.append(row)
    return rows


# ---- main ----------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU: a smoke test of this script")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="auto: cuda where present, except with --tiny (the CPU smoke test)",
    )
    p.add_argument(
        "--meta-memory",
        action="store_true",
        help="no device needed: compute the peak memory of learn_tokens on the meta device",
    )
    p.add_argument(
        "--meta-precision",
        choices=list(PRECISIONS),
        default="bf16",
        help="precision of the --meta-memory computation (default: bf16)",
    )
    p.add_argument("--concepts", type=int, nargs="+", default=[8, 16, 32], help="C values (default: 8 16 32)")
    p.add_argument(
        "--precisions",
        nargs="+",
        default=None,
        choices=["bf16", "fp32"],
        help="precisions of the frozen models (default: bf16; fp32 with --tiny, bf16 being slow on CPUs)",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        default=["plain"],
        choices=MODES,
        help="memory modes: plain, checkpointing (+ --micro), budget (planned for --budget-gib)",
    )
    p.add_argument("--budget-gib", type=float, default=40.0, help="device memory of the budget mode (default: 40)")
    p.add_argument(
        "--budget-concepts",
        type=int,
        nargs="+",
        default=None,
        help="C values of the budget mode (default: the largest of --concepts)",
    )
    p.add_argument("--ti-samples", type=int, default=2, help="TI samples per concept per step (default: 2)")
    p.add_argument("--micro", type=int, default=8, help="TI micro-batch of the checkpointing mode (default: 8)")
    p.add_argument("--steps", type=int, default=150, help="steps per token for concepts/GPU-minute (default: 150)")
    p.add_argument("--measure-steps", type=int, default=10, help="N of the N-step timed run (default: 10)")
    p.add_argument("--anchor-steps", type=int, default=4, help="timed anchor optimizer steps (default: 4)")
    p.add_argument("--no-anchor", action="store_true", help="skip the diffusers textual-inversion anchor")
    p.add_argument("--no-encode", action="store_true", help="skip the encoding stage")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=H200_BF16_TFLOPS,
        help=f"the device's peak for MFU, TFLOP/s (default: {H200_BF16_TFLOPS}, H200 dense bf16)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the learner's UNet")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default: inductor)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format for the UNet")
    p.add_argument("--attention", choices=ATTENTION_BACKENDS, default="default", help="SDPA backend of the UNet")
    p.add_argument("--encode-images", type=int, default=256, help="images timed in the encoding stage (default: 256)")
    p.add_argument("--encode-batch", type=int, default=32, help="encoder batch cap (default: 32)")
    p.add_argument("--max-minutes", type=float, default=8.0, help="stop starting new runs after this (default: 8)")
    p.add_argument("--out", default="build/gpu_onboard.json", help="JSON output (default: build/gpu_onboard.json)")
    args = p.parse_args(argv)
    if args.tiny:
        args.concepts = [c for c in args.concepts if c <= 4] or [1]
        args.measure_steps, args.anchor_steps = 3, 2
        args.encode_images, args.encode_batch = 4, 2
        args.compile_backend = "eager" if args.compile_backend == "inductor" else args.compile_backend
    if args.precisions is None:
        args.precisions = ["fp32"] if args.tiny else ["bf16"]
    if args.budget_concepts is None:
        args.budget_concepts = [max(args.concepts)]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    print("config: " + json.dumps(vars(args), sort_keys=True), flush=True)
    result: dict = {"config": vars(args), "runs": [], "encode_images_per_s": {}, "encode_images_per_s_factory": {}}
    if args.meta_memory:
        result["memory_computed"] = meta_memory(args)
        _meta_table(result["memory_computed"])
        return _write(result, args.out)
    if args.device == "auto":
        device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    else:
        from factory.device import pick_device

        device = pick_device(args.device == "cuda").type  # a clear DeviceError where no GPU is
    result["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    result["levers"] = {"compile": args.compile, "channels_last": args.channels_last, "attention": args.attention}
    if device == "cuda":
        from factory.device import configure_cuda_math

        configure_cuda_math()  # TF32 for the fp32 that remains, cuDNN autotuning
    deadline = time.monotonic() + 60 * args.max_minutes
    if not args.no_anchor:
        result["anchor_diffusers_ti"] = anchor_diffusers_ti(args.tiny, args, device)
        if device == "cuda":
            torch.cuda.empty_cache()  # the anchor's own models are gone
        print("anchor: " + json.dumps(result["anchor_diffusers_ti"]), flush=True)
    for precision in args.precisions:
        backbone = build(args.tiny, precision, device)
        if not args.no_encode:
            ours, factory_rate = encode_rates(backbone, args, device)
            result["encode_images_per_s"][precision] = ours
            result["encode_images_per_s_factory"][precision] = factory_rate
        train_placement(backbone, device)
        tune_unet(
            backbone.generator.unet,
            compile=args.compile,
            channels_last=args.channels_last,
            attention=args.attention,
            compile_backend=args.compile_backend,
        )
        for c in args.concepts:
            for mode in args.modes:
                if mode == "budget" and c not in args.budget_concepts:
                    continue
                if time.monotonic() > deadline:
                    print(f"--max-minutes reached: skipping C={c} {precision} {mode}", flush=True)
                    continue
                try:
                    row = {"precision": precision, **measure(backbone, c, args, mode, device)}
                except torch.OutOfMemoryError:
                    row = {"precision": precision, "c": c, "mode": mode, "error": "out of memory"}
                    torch.cuda.empty_cache()
                except Exception as e:  # noqa: BLE001 - an unattended run records the failure and goes on
                    row = {"precision": precision, "c": c, "mode": mode, "error": f"{type(e).__name__}: {e}"}
                anchor = result.get("anchor_diffusers_ti")
                if anchor and "error" not in row:
                    row["speedup_vs_diffusers_ti"] = row["concepts_per_gpu_minute"] / anchor["concepts_per_gpu_minute"]
                    row["samples_per_s_vs_diffusers_ti"] = row["unet_samples_per_s"] / anchor["unet_samples_per_s"]
                result["runs"].append(row)
                print(json.dumps(row), flush=True)
        del backbone
        if device == "cuda":
            torch.cuda.empty_cache()
    ok = [r for r in result["runs"] if "speedup_vs_diffusers_ti" in r]
    if ok:
        best = max(ok, key=lambda r: r["concepts_per_gpu_minute"])
        result["best_run"] = {k: best[k] for k in ("c", "precision", "mode")}
        result["speedup_vs_diffusers_ti"] = best["speedup_vs_diffusers_ti"]
        result["samples_per_s_vs_diffusers_ti"] = best["samples_per_s_vs_diffusers_ti"]
    _table(result)
    return _write(result, args.out)


def _gib(v) -> str:
    return f"{v:.2f}" if v is not None else "-"


def _table(result: dict) -> None:
    print(f"\nmeasured on {result['device']} (levers: {json.dumps(result['levers'])})")
    print(
        f"{'prec':>5} {'C':>3} {'mode':>13} {'ckpt':>5} {'micro':>5} {'s/step':>8} {'one-off s':>9} "
        f"{'concepts/GPU-min':>16} {'MFU':>6} {'x diffusers':>11} {'peak GiB':>8} {'planned':>7}"
    )
    for r in result["runs"]:
        if "error" in r:
            print(f"{r['precision']:>5} {r['c']:>3} {r['mode']:>13}  {r['error']}")
            continue
        print(
            f"{r['precision']:>5} {r['c']:>3} {r['mode']:>13} {r['checkpointing']!s:>5} {r['ti_micro_batch']:>5} "
            f"{r['s_per_step']:>8.4f} {r['one_off_s']:>9.2f} {r['concepts_per_gpu_minute']:>16.2f} "
            f"{r['mfu']:>6.1%} {r.get('speedup_vs_diffusers_ti', float('nan')):>11.1f} "
            f"{_gib(r['peak_gpu_gib']):>8} {_gib(r['peak_gib_planned']):>7}"
        )
    a = result.get("anchor_diffusers_ti")
    if a:
        print(
            f"anchor (diffusers textual inversion, batch 1 x accumulation 4, {a['optimizer_steps']} steps): "
            f"{a['s_per_optimizer_step']:.3f} s/step, {a['unet_samples_per_s']:.1f} UNet samples/s, "
            f"{a['concepts_per_gpu_minute']:.4f} concepts/GPU-min, MFU {a['mfu']:.1%}"
        )
    for k, v in result["encode_images_per_s"].items():
        print(
            f"encoding ({k}): {v:.1f} images/s on the device "
            f"(factory encode_images: {result['encode_images_per_s_factory'][k]:.1f})"
        )


def _meta_table(rows: list[dict]) -> None:
    print("\npeak memory of learn_tokens, COMPUTED on the meta device (not measured), Train-worker placement")
    print(f"{'C':>3} {'ckpt':>5} {'micro':>5} {'calibration':>11} {'step':>7} {'peak GiB':>8} {'planned':>7}")
    for r in rows:
        print(
            f"{r['c']:>3} {r['checkpointing']!s:>5} {r['ti_micro_batch']:>5} {r['calibration_gib_computed']:>11.3f} "
            f"{r['step_gib_computed']:>7.3f} {r['peak_gib_computed']:>8.3f} {r['peak_gib_planned']:>7.3f}"
        )


def _write(result: dict, out: str) -> int:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    bad = [k for k, v in _numbers(result) if not math.isfinite(v)]
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}", flush=True)
    if bad:
        print(f"non-finite numbers in the result: {bad}", flush=True)
        return 1
    return 0


def _numbers(obj, path=""):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield path, float(obj)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")


if __name__ == "__main__":
    sys.exit(main())
