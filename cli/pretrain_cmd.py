"""`tokenfactory pretrain`: pretrain a backbone (the embedded `fashion-mini`) on the fashion world, on Ray Train.

Stage ``clip`` trains the CLIP pair, stage ``unet`` the generator on the frozen text encoder; ``all``
runs both. Every ``--checkpoint-every`` steps the trainer state (weights, optimiser, EMA, RNGs) is
reported to Ray Train (so a failed worker restarts from it) and written to ``OUT/checkpoints/STAGE.pt``;
a later run with the same ``--out`` resumes from there, so a long run can span several sittings
(``--time-limit-min`` ends a sitting cleanly). The final weights go to ``OUT/model.safetensors`` and a
metrics log to ``OUT/pretrain-STAGE.jsonl``. (Flags -> `jobs.pretrain.PretrainConfig` -> `jobs.pretrain.pretrain`.)
"""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a backbone on the fashion world (Ray Train, resumable)",
                       description=__doc__)
    p.add_argument("--backbone", default="fashion-mini", help="registered backbone config to train (default: fashion-mini)")
    p.add_argument("--stage", choices=["clip", "unet", "all"], default="all",
                   help="what to train: the CLIP pair, the UNet on the frozen text encoder, or both in order")
    p.add_argument("--out", required=True, help="URI of the output folder: model.safetensors, checkpoints/, logs")
    p.add_argument("--init", default=None,
                   help="weights URI to start from (default: OUT/model.safetensors if it exists, else random init)")
    p.add_argument("--clip-steps", type=int, default=3000, help="optimiser steps of the clip stage (default: 3000)")
    p.add_argument("--unet-steps", type=int, default=3000, help="optimiser steps of the unet stage (default: 3000)")
    p.add_argument("--batch-size", type=int, default=256, help="images per step per worker (default: 256)")
    p.add_argument("--clip-lr", type=float, default=7e-4, help="peak AdamW learning rate of the clip stage")
    p.add_argument("--unet-lr", type=float, default=1e-3, help="peak AdamW learning rate of the unet stage")
    p.add_argument("--clip-towers", choices=["both", "image"], default="both",
                   help="clip stage: train both towers, or only the image tower against the frozen text tower "
                        "(keeps an already trained UNet's conditioning valid; use with --init)")
    p.add_argument("--group-size", type=int, default=4,
                   help="clip stage: renders per hard-negative group, which share all attributes but one "
                        "(1: independent renders; default: 4)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default: 100)")
    p.add_argument("--time-limit-min", type=float, default=0.0,
                   help="end this sitting after about this many minutes, checkpointed (0: run to the end)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (data parallel; default: 1)")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs per worker (default: all CPUs of the machine divided by --workers)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--image-size", type=int, default=32, help="render size of world images (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of data and noise (default: 0)")
    p.set_defaults(func=run)


def run(args) -> int:
    import dataclasses

    from jobs.pretrain import PretrainConfig, pretrain

    if args.group_size < 1:
        raise SystemExit(f"--group-size must be at least 1, got {args.group_size}")
    pretrain(PretrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)}))
    return 0
