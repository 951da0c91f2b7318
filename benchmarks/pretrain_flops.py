"""How many pretraining steps of the embedded default fit a GPU time budget: a FLOP estimate made on the CPU.

For each stage of `tokenfactory pretrain` (``clip``, ``unet``) at the recipe's batch size, on the CPU:

- **FLOPs per step**: ``torch.utils.flop_counter.FlopCounterMode`` around a real forward + backward of the
  stage's loss (`factory.pretrain.Pretrainer`, the code the job runs) on a rendered batch. The counter
  counts matmuls, convolutions and attention: the optimizer, norms and element-wise ops are not in it.
- **Ops per step**: the aten ops that forward + backward dispatch (each one a GPU kernel launch, give or
  take fusion), plus a few for the fused optimizer, gradient clipping and the EMA.
- **Renderer**: images/s of the batch source the job uses (`jobs.pretrain.world_batches`, the fashion world
  rendered in NumPy, inline in the training loop, on one core), measured here.

Two bounds on a step's rate, and the recipe takes the smaller:

- ``flop`` (the GPU): --mfu × --peak-tflops (assumed: 25 % of 790 TFLOP/s, the H200's dense bf16 peak) / FLOPs;
- ``host`` (the training loop's one thread, which the GPU runs behind asynchronously): rendering the batch
  (batch / images/s, measured) *plus* dispatching its ops (ops × --us-per-op, assumed 10 µs: Python,
  dispatcher and launch in eager PyTorch; a small model cannot hide it behind its kernels). They add:
  the loop renders inline, on the same thread that launches the kernels.

The stage's steps = its share of (--minutes − --overhead-minutes) × that rate, rounded down to a multiple
of 100. The printed commands are the `pretrain-gpu` recipe of docs/pretrain-gpu.md.

    python benchmarks/pretrain_flops.py                  # fashion-mini, the recipe's batches, 8 minutes
    python benchmarks/pretrain_flops.py --backbone tiny-hf-clip --clip-batch 16 --unet-batch 8   # smoke test

JSON (--out, default build/pretrain_flops.json): ``stages`` (per stage: batch, FLOPs, ops, the three
rates, the binding bound, steps), ``assumptions``, ``render_images_per_s``, ``commands``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

H200_BF16_TFLOPS = 790.0
# Kernels per step outside forward + backward on a GPU: fused AdamW (1-2), foreach clip_grad_norm_ (~4),
# foreach EMA lerp (1), zeroing, the loss read-back: a handful, rounded up.
OPTIMIZER_OPS = 20
# The recipe's stage settings (the job's own: `jobs.pretrain._run_stage`).
STAGE_DATA = {"clip": {"partial_captions": 0.3, "group_size": 4}, "unet": {"partial_captions": 0.0, "group_size": 1}}


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched (views included: they are cheap on a GPU but still cost host time)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def measure_stage(backbone_name: str, stage: str, batch: int, render_seconds: float) -> dict:
    from factory.backbones import create_backbone, get_backbone_config
    from factory.pretrain import PretrainConfig, Pretrainer
    from jobs.pretrain import world_batches

    data = STAGE_DATA[stage]
    batches = world_batches(32, data["partial_captions"], data["group_size"])
    backbone = create_backbone(get_backbone_config(backbone_name))
    trainer = Pretrainer(backbone, PretrainConfig(stage=stage, steps=10, batch_size=batch), batches)
    loss_fn = trainer._clip_loss if stage == "clip" else trainer._unet_loss

    rng = np.random.default_rng(0)
    images, captions = batches(batch, rng)
    images = trainer._images(images)
    t0 = time.perf_counter()
    with FlopCounterMode(display=False) as flops:
        loss_fn(images, captions).backward()
    cpu_step_s = time.perf_counter() - t0
    counter = _OpCounter()
    with counter:
        loss_fn(images, captions).backward()

    batches(batch, rng)  # warm (the Fashion-MNIST arrays are loaded on the first call)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < render_seconds:
        batches(batch, rng)
        n += batch
    render_ips = n / (time.perf_counter() - t0)
    params = sum(p.numel() for p in trainer.params)
    return {
        "stage": stage,
        "batch": batch,
        "trained_params": params,
        "flops_per_step": int(flops.get_total_flops()),
        "ops_per_step": counter.ops + OPTIMIZER_OPS,
        "cpu_fwd_bwd_s": cpu_step_s,
        "render_images_per_s": render_ips,
    }


def plan(
    rows: list[dict],
    minutes: float,
    overhead_minutes: float,
    clip_share: float,
    mfu: float,
    peak_tflops: float,
    us_per_op: float,
) -> None:
    """Adds the three rates, the binding one and the steps to each row (in place)."""
    train_s = max(0.0, (minutes - overhead_minutes) * 60)
    for r in rows:
        share = clip_share if r["stage"] == "clip" else 1 - clip_share
        launch_s = r["ops_per_step"] * us_per_op * 1e-6
        render_s = r["batch"] / r["render_images_per_s"]
        rates = {"flop": mfu * peak_tflops * 1e12 / r["flops_per_step"], "host": 1 / (launch_s + render_s)}
        bound = min(rates, key=rates.get)
        r.update(
            {
                "seconds": train_s * share,
                "steps_per_s": rates,
                "bound": bound,
                "host_s_per_step": {"launch": launch_s, "render": render_s},
                "render_share_of_host": render_s / (launch_s + render_s),
                "steps_at_flop_bound": int(train_s * share * rates["flop"]),
                "steps": int(train_s * share * rates[bound]) // 100 * 100,
                # what the GPU could take if rendering cost the host nothing
                "gpu_demand_images_per_s": min(rates["flop"], 1 / launch_s) * r["batch"],
            }
        )


def _stage_limit(minutes: float, share: float) -> float:
    """A stage's --max-minutes: its share of the whole budget, less 15 s for the final save; a safety net
    (the step counts are sized to finish before it), so the recipe never runs past its budget."""
    return max(0.25, minutes * share - 0.25)


def commands(rows: list[dict], out: str, minutes: float, clip_share: float) -> list[str]:
    by = {r["stage"]: r for r in rows}
    clip, unet = by["clip"], by["unet"]
    common = f"--use-gpu --precision bf16 --out {out}"
    return [
        f"tokenfactory pretrain --stage clip {common} --clip-steps {clip['steps']} --batch-size {clip['batch']} "
        f"--group-size 4 --checkpoint-every {max(100, clip['steps'] // 10 // 100 * 100)} "
        f"--max-minutes {_stage_limit(minutes, clip_share):.2f}",
        f"tokenfactory pretrain --stage unet {common} --unet-steps {unet['steps']} --batch-size {unet['batch']} "
        f"--checkpoint-every {max(100, unet['steps'] // 10 // 100 * 100)} "
        f"--max-minutes {_stage_limit(minutes, 1 - clip_share):.2f}",
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="fashion-mini", help="registered backbone config (default: fashion-mini)")
    p.add_argument("--clip-batch", type=int, default=1024, help="clip stage images per step (default: 1024)")
    p.add_argument("--unet-batch", type=int, default=256, help="unet stage images per step (default: 256)")
    p.add_argument("--minutes", type=float, default=8.0, help="GPU time budget of the whole recipe (default: 8)")
    p.add_argument(
        "--overhead-minutes",
        type=float,
        default=1.0,
        help="of the budget, for Ray start-up, model builds, checkpoints and saves (default: 1)",
    )
    p.add_argument("--clip-share", type=float, default=0.5, help="share of the training time for clip (default: 0.5)")
    p.add_argument("--mfu", type=float, default=0.25, help="assumed model-FLOP utilisation (default: 0.25)")
    p.add_argument(
        "--peak-tflops", type=float, default=H200_BF16_TFLOPS, help="GPU peak, dense bf16 (default: 790, an H200)"
    )
    p.add_argument(
        "--us-per-op",
        type=float,
        default=10.0,
        help="assumed host time per dispatched op in eager PyTorch, µs (default: 10)",
    )
    p.add_argument("--render-seconds", type=float, default=5.0, help="how long to time the renderer per stage")
    p.add_argument("--run-out", default="build/fashion-mini-gpu", help="--out of the printed recipe commands")
    p.add_argument("--out", default="build/pretrain_flops.json", help="JSON output path")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    rows = [
        measure_stage(args.backbone, "clip", args.clip_batch, args.render_seconds),
        measure_stage(args.backbone, "unet", args.unet_batch, args.render_seconds),
    ]
    plan(rows, args.minutes, args.overhead_minutes, args.clip_share, args.mfu, args.peak_tflops, args.us_per_op)
    cmds = commands(rows, args.run_out, args.minutes, args.clip_share)

    print(
        f"{args.backbone}: pretraining steps in {args.minutes:g} min of one GPU at {args.mfu:.0%} of "
        f"{args.peak_tflops:g} TFLOP/s, {args.us_per_op:g} µs/op, {args.overhead_minutes:g} min overhead"
    )
    head = (
        f"{'stage':<6}{'batch':>7}{'GFLOP/step':>12}{'ops/step':>10}{'launch ms':>11}{'render ms':>11}"
        f"{'flop st/s':>11}{'host st/s':>11}{'bound':>7}{'steps':>8}{'steps@flop':>12}"
    )
    print(head)
    for r in rows:
        s, h = r["steps_per_s"], r["host_s_per_step"]
        print(
            f"{r['stage']:<6}{r['batch']:>7}{r['flops_per_step'] / 1e9:>12.1f}{r['ops_per_step']:>10}"
            f"{h['launch'] * 1e3:>11.1f}{h['render'] * 1e3:>11.1f}{s['flop']:>11.0f}{s['host']:>11.1f}"
            f"{r['bound']:>7}{r['steps']:>8}{r['steps_at_flop_bound']:>12}"
        )
    for r in rows:
        starve = r["render_images_per_s"] < r["gpu_demand_images_per_s"]
        print(
            f"renderer ({r['stage']} batches, one core): {r['render_images_per_s']:.0f} images/s, "
            f"{r['render_share_of_host']:.0%} of the host's time per step; without it the GPU could take "
            f"{r['gpu_demand_images_per_s']:.0f} images/s: "
            f"{'it starves the GPU' if starve else 'it keeps up, but its time adds to the launches'}"
        )
    print("recipe:")
    for c in cmds:
        print("  " + c)

    result = {
        "backbone": args.backbone,
        "stages": rows,
        "commands": cmds,
        "render_images_per_s": {r["stage"]: r["render_images_per_s"] for r in rows},
        "assumptions": {
            "mfu": args.mfu,
            "peak_tflops": args.peak_tflops,
            "us_per_op": args.us_per_op,
            "minutes": args.minutes,
            "overhead_minutes": args.overhead_minutes,
            "clip_share": args.clip_share,
            "optimizer_ops": OPTIMIZER_OPS,
        },
        "host": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
