"""Onboarding at production size on one GPU: concepts per GPU-minute, peak memory, bf16 vs fp32, encoding.

Models are random-init at the real shapes (OpenAI CLIP ViT-L/14 + the SD 1.5 UNet and VAE, 512 px;
nothing is downloaded), built from the configs below through the same `create_backbone` the factory uses.
For every C in --concepts and every precision it learns C tokens for --measure-steps steps (after one
warm-up step) and records seconds per step, concepts per GPU-minute at --steps steps per token, and peak
GPU memory; then it times the Data stage's encoder (CLIP features + VAE latents) in images/s.

    python benchmarks/gpu_onboard.py                   # on a GPU machine, unattended, under --max-minutes
    python benchmarks/gpu_onboard.py --tiny            # CPU smoke test with tiny models (CI runs it)
    python benchmarks/gpu_onboard.py --meta-memory     # no device: peak training memory of one step,
                                                       # computed on the meta device (shapes only)

Prints a table and writes JSON (--out, default build/gpu_onboard.json) with keys ``runs`` (one row per
C × precision × memory mode: c, precision, checkpointing, ti_micro_batch, s_per_step,
concepts_per_gpu_minute, peak_gpu_gib), ``encode_images_per_s`` and ``config``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factory.backbones import PRECISIONS, BackboneConfig, create_backbone  # noqa: E402
from factory.learner import ConceptData, LearnerConfig, learn_tokens  # noqa: E402

# OpenAI CLIP ViT-L/14 (HF CLIPConfig) and Stable Diffusion 1.5's UNet / VAE (their config.json values).
VIT_L14 = {"projection_dim": 768,
           "text_config": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                           "num_attention_heads": 12, "max_position_embeddings": 77, "bos_token_id": 49406,
                           "eos_token_id": 49407, "pad_token_id": 49407},
           "vision_config": {"image_size": 224, "patch_size": 14, "hidden_size": 1024, "intermediate_size": 4096,
                             "num_hidden_layers": 24, "num_attention_heads": 16}}
SD15_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
             "block_out_channels": [320, 640, 1280, 1280],
             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
             "cross_attention_dim": 768, "attention_head_dim": 8}
SD15_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
            "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 512}
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
TINY = {"clip": {"projection_dim": 32,
                 "text_config": {**VIT_L14["text_config"], "hidden_size": 32, "intermediate_size": 64,
                                 "num_hidden_layers": 2, "num_attention_heads": 4},
                 "vision_config": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                                   "num_hidden_layers": 2, "num_attention_heads": 4}},
        "unet": {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
                 "block_out_channels": [16, 32], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32,
                 "attention_head_dim": 4, "norm_num_groups": 8},
        "vae": {**SD15_VAE, "block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
                "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 4, "layers_per_block": 1, "sample_size": 16},
        "image": 32}


def backbone_config(tiny: bool) -> BackboneConfig:
    clip, unet, vae = (TINY["clip"], TINY["unet"], TINY["vae"]) if tiny else (VIT_L14, SD15_UNET, SD15_VAE)
    return BackboneConfig.from_dict({
        "name": "tiny-vit+sd" if tiny else "vit-l14+sd15-shapes", "family": "hf-clip", "clip": clip,
        "tokenizer": {"context_length": 77, "pad": "eot"}, "image": {"size": TINY["image"] if tiny else 224},
        "generator": {"unet": unet, "vae": vae, "scheduler": SD_SCHEDULE, "latent_scale": 0.18215}})


def build(tiny: bool, precision: str, device: str = "cpu"):
    """The random-init backbone at ``precision`` (its fingerprint named, not hashed: the weights are noise)."""
    backbone = create_backbone(backbone_config(tiny))
    backbone._fingerprint = "random-init-" + backbone.name
    return backbone.freeze().to(PRECISIONS[precision]).to(device)


def concepts(backbone, c: int, shots: int = 4) -> list[ConceptData]:
    g = torch.Generator().manual_seed(0)
    dim = backbone.clip.config.projection_dim
    s, ch = backbone.generator.unet.config.sample_size, backbone.generator.latent_channels
    return [ConceptData(f"c{i}", "dress", torch.randn(shots, dim, generator=g), torch.randn(shots, ch, s, s, generator=g))
            for i in range(c)]


def learner(args, steps: int, checkpointing: bool, micro: int) -> LearnerConfig:
    return LearnerConfig(steps=steps, ti_samples=args.ti_samples, log_every=0, gradient_checkpointing=checkpointing,
                         ti_micro_batch=micro)


def measure(backbone, c: int, args, checkpointing: bool, micro: int, device: str) -> dict:
    data = concepts(backbone, c)
    learn_tokens(backbone, data, {}, learner(args, 1, checkpointing, micro))  # warm-up (kernels, allocator)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    learn_tokens(backbone, data, {}, learner(args, args.measure_steps, checkpointing, micro))
    if device == "cuda":
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - t0) / args.measure_steps
    return {"c": c, "checkpointing": checkpointing, "ti_micro_batch": micro, "s_per_step": per_step,
            "concepts_per_gpu_minute": 60.0 * c / (per_step * args.steps),
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}


def encode_rate(backbone, args, device: str) -> float:
    from factory.concepts import encode_images

    size = backbone.generator.image_size
    images = torch.randint(0, 255, (args.encode_images, size, size, 3), dtype=torch.uint8).numpy()
    encode_images(backbone, images[:2], batch_size=args.encode_batch)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    encode_images(backbone, images, batch_size=args.encode_batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return args.encode_images / (time.perf_counter() - t0)


class PeakBytes:
    """Peak bytes of the tensors created inside it, beyond ``resident`` ones (the weights), from a torch
    dispatch mode: on the meta device every op runs on shapes alone, so this is the activation and
    temporary memory of a step computed without any device or data. Storages are tracked weakly, so a
    tensor counts from its creation until it is freed (saved-for-backward tensors until backward frees them)."""

    def __init__(self, resident):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves
        from torch.utils.weak import WeakIdKeyDictionary

        live, skip = WeakIdKeyDictionary(), WeakIdKeyDictionary({t.untyped_storage(): 0 for t in resident})
        self.live, self.peak = live, 0
        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        st = t.untyped_storage()
                        if st not in live and st not in skip:
                            live[st] = st.nbytes()
                tracker.peak = max(tracker.peak, sum(live.values()))
                return out

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


class _FusedAttention(torch.autograd.Function):
    """Shape-only stand-in for a fused SDPA kernel (flash / memory-efficient attention, what a GPU runs):
    it saves q, k, v, the output and the log-sum-exp for backward, never the [L, L] attention matrix.
    On the meta device torch would otherwise take the math path and count that matrix for every layer."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(q, k, v, *args, **kwargs):
    return _FusedAttention.apply(q, k, v)


def meta_memory(args) -> list[dict]:
    """Peak training memory of one learner step at production size, computed on the meta device.

    The step is the learner's: one text-encoder pass over C × T prompts, the text-side CE, the TI term
    (`factory.objective.ti_term`, whole or in micro-batches) and the backward pass, without the learner's
    data-dependent bookkeeping (meta tensors hold no values). Memory = the weights a Train worker keeps on
    its GPU (text tower + UNet, `Backbone.to_training_device`) + the peak of everything the step allocates.
    Attention is counted as a fused SDPA kernel holds it (`_FusedAttention`). The CUDA caching allocator's
    rounding and fragmentation and cuDNN/cuBLAS workspaces come on top.
    """
    import torch.nn.functional as F

    from factory.objective import ti_term
    from factory.losses import text_side_ce
    from factory.tokens import marker

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
    scheduler, rows = backbone.generator.noise_scheduler(), []
    for c in args.concepts:
        for checkpointing, micro in ((False, 0), (True, 0), (False, args.micro), (True, args.micro)):
            cfg = learner(args, 1, checkpointing, micro)
            with torch.device("meta"):
                data = concepts(backbone, c)
                vectors = torch.zeros(c, backbone.token_dim, requires_grad=True)
            batch = backbone.tokenize([t.format(concept=marker(d.concept_id), parent="dress")
                                       for d in data for t in cfg.templates])
            unet = backbone.generator.unet
            if checkpointing:
                unet.enable_gradient_checkpointing()
            real_sdpa = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = _fused_sdpa
            with PeakBytes(on_gpu + [vectors]) as peak:
                enc = backbone.encode_text(batch, vectors)
                text = F.normalize(enc.features.float(), dim=-1).view(c, len(cfg.templates), -1)
                pos = F.normalize(torch.stack([d.image_features for d in data]), dim=-1)
                mask = torch.ones(pos.shape[:2], dtype=torch.bool, device="meta")
                ce = text_side_ce(text, pos, mask, pos, mask, 100.0)[0]
                cut = enc.hidden.detach().requires_grad_() if micro else enc.hidden
                gens = [torch.Generator().manual_seed(i) for i in range(c)]
                ti = ti_term(backbone, cfg, data, cut, scheduler, gens, torch.ones(c, device="meta"))
                loss = (ce.sum() + (enc.hidden * cut.grad).sum()) if micro else (ce + ti).sum()
                loss.backward()
            F.scaled_dot_product_attention = real_sdpa
            unet.disable_gradient_checkpointing()
            total = resident + peak.peak
            rows.append({"c": c, "precision": args.meta_precision, "checkpointing": checkpointing,
                         "ti_micro_batch": micro, "ti_samples": args.ti_samples, "peak_gib_computed": total / 2**30,
                         "weights_gib": resident / 2**30, "method": "meta device + dispatch-mode byte count"})
            print(f"C={c:3d} checkpointing={checkpointing!s:5} micro={micro:3d}  peak {total / 2**30:7.2f} GiB "
                  f"(weights {resident / 2**30:.2f})", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU: a smoke test of this script")
    p.add_argument("--meta-memory", action="store_true",
                   help="no device needed: compute peak training memory of one step on the meta device")
    p.add_argument("--meta-precision", choices=list(PRECISIONS), default="bf16",
                   help="precision of the --meta-memory computation (default: bf16)")
    p.add_argument("--concepts", type=int, nargs="+", default=[1, 4, 8, 16, 32], help="C values (default: 1 4 8 16 32)")
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=list(PRECISIONS), help="default: bf16 fp32")
    p.add_argument("--ti-samples", type=int, default=2, help="TI samples per concept per step (default: 2)")
    p.add_argument("--micro", type=int, default=8, help="TI micro-batch of the memory-saving mode (default: 8)")
    p.add_argument("--steps", type=int, default=150, help="steps per token for concepts/GPU-minute (default: 150)")
    p.add_argument("--measure-steps", type=int, default=3, help="timed steps per run (default: 3)")
    p.add_argument("--encode-images", type=int, default=64, help="images timed in the encoding stage (default: 64)")
    p.add_argument("--encode-batch", type=int, default=16, help="encoder batch size (default: 16)")
    p.add_argument("--max-minutes", type=float, default=8.0, help="stop starting new runs after this (default: 8)")
    p.add_argument("--out", default="build/gpu_onboard.json", help="JSON output (default: build/gpu_onboard.json)")
    args = p.parse_args()
    if args.tiny:
        args.concepts, args.measure_steps, args.encode_images = [c for c in args.concepts if c <= 4] or [1], 1, 4
    print("config: " + json.dumps(vars(args), sort_keys=True), flush=True)
    result: dict = {"config": vars(args), "runs": [], "encode_images_per_s": {}}
    if args.meta_memory:
        result["memory_computed"] = meta_memory(args)
        return _write(result, args.out)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    result["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    deadline = time.monotonic() + 60 * args.max_minutes
    for precision in args.precisions:
        backbone = build(args.tiny, precision, device)
        result["encode_images_per_s"][precision] = encode_rate(backbone, args, device)
        for c in args.concepts:
            for checkpointing, micro in ((False, 0), (True, args.micro)):
                if time.monotonic() > deadline:
                    print(f"--max-minutes reached: skipping C={c} {precision}", flush=True)
                    continue
                try:
                    row = {"precision": precision, **measure(backbone, c, args, checkpointing, micro, device)}
                except torch.OutOfMemoryError:
                    row = {"precision": precision, "c": c, "checkpointing": checkpointing, "ti_micro_batch": micro,
                           "error": "out of memory"}
                    torch.cuda.empty_cache()
                result["runs"].append(row)
                print(json.dumps(row), flush=True)
        del backbone
        if device == "cuda":
            torch.cuda.empty_cache()
    _table(result)
    return _write(result, args.out)


def _table(result: dict) -> None:
    print(f"\n{'precision':>9} {'C':>3} {'ckpt':>5} {'micro':>5} {'s/step':>8} {'concepts/GPU-min':>17} {'peak GiB':>9}")
    for r in result["runs"]:
        if "error" in r:
            print(f"{r['precision']:>9} {r['c']:>3} {r['checkpointing']!s:>5} {r['ti_micro_batch']:>5}  {r['error']}")
            continue
        peak = f"{r['peak_gpu_gib']:.2f}" if r["peak_gpu_gib"] is not None else "-"
        print(f"{r['precision']:>9} {r['c']:>3} {r['checkpointing']!s:>5} {r['ti_micro_batch']:>5} "
              f"{r['s_per_step']:>8.3f} {r['concepts_per_gpu_minute']:>17.1f} {peak:>9}")
    for k, v in result["encode_images_per_s"].items():
        print(f"encoding ({k}): {v:.1f} images/s")


def _write(result: dict, out: str) -> int:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
