"""`tokenfactory pretrain`: pretrain a backbone (the embedded `fashion-mini`) on the fashion world, on Ray Train.

Stage ``clip`` trains the CLIP pair, stage ``unet`` the generator on the frozen text encoder; ``all``
runs both. Every ``--checkpoint-every`` steps the trainer state (weights, optimiser, EMA, RNGs) is
reported to Ray Train (so a failed worker restarts from it) and written to ``OUT/checkpoints/STAGE.pt``;
a later run with the same ``--out`` resumes from there, so a long run can span several sittings
(``--max-minutes`` ends a sitting cleanly, checkpointed). The final weights go to ``OUT/model.safetensors``
and a metrics log to ``OUT/pretrain-STAGE.jsonl``. With ``--use-gpu`` the forward passes run under bf16
autocast (``--precision``); the recipe sized for one H200 is in docs/pretrain-gpu.md.
(Flags -> `jobs.pretrain.PretrainJobConfig` -> `jobs.pretrain.pretrain`.)
"""

from __future__ import annotations


def register(sub) -> None:
    from cli.arguments import field_defaults
    from jobs.pretrain import PretrainJobConfig

    d = field_defaults(PretrainJobConfig)  # every flag's default is its field's (one source per default)
    p = sub.add_parser(
        "pretrain", help="pretrain a backbone on the fashion world (Ray Train, resumable)", description=__doc__
    )
    p.add_argument(
        "--backbone", default=d["backbone"], help="registered backbone config to train (default: %(default)s)"
    )
    p.add_argument(
        "--stage",
        choices=["clip", "unet", "all"],
        default=d["stage"],
        help="what to train: the CLIP pair, the UNet on the frozen text encoder, or both in order "
        "(default: %(default)s)",
    )
    p.add_argument("--out", required=True, help="URI of the output folder: model.safetensors, checkpoints/, logs")
    p.add_argument(
        "--init",
        default=d["init"],
        help="weights URI to start from (default: OUT/model.safetensors if it exists, else random init)",
    )
    p.add_argument(
        "--clip-steps",
        type=int,
        default=d["clip_steps"],
        help="optimiser steps of the clip stage (default: %(default)s)",
    )
    p.add_argument(
        "--unet-steps",
        type=int,
        default=d["unet_steps"],
        help="optimiser steps of the unet stage (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size", type=int, default=d["batch_size"], help="images per step per worker (default: %(default)s)"
    )
    p.add_argument(
        "--clip-lr",
        type=float,
        default=d["clip_lr"],
        help="peak AdamW learning rate of the clip stage (default: %(default)s)",
    )
    p.add_argument(
        "--unet-lr",
        type=float,
        default=d["unet_lr"],
        help="peak AdamW learning rate of the unet stage (default: %(default)s)",
    )
    p.add_argument(
        "--clip-towers",
        choices=["both", "image"],
        default=d["clip_towers"],
        help="clip stage: train both towers, or only the image tower against the frozen text tower "
        "(keeps an already trained UNet's conditioning valid; use with --init)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=d["group_size"],
        help="clip stage: renders per hard-negative group, which share all attributes but one "
        "(1: independent renders; default: %(default)s)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=d["checkpoint_every"],
        help="steps between checkpoints (default: %(default)s)",
    )
    # --time-limit-min is the flag's former name, kept so existing scripts keep working.
    p.add_argument(
        "--max-minutes",
        "--time-limit-min",
        dest="max_minutes",
        type=float,
        default=d["max_minutes"],
        help="end this sitting after about this many minutes, checkpointed; a later run with the same "
        "--out resumes it (0: run to the end; --time-limit-min is the old name)",
    )
    p.add_argument(
        "--workers", type=int, default=d["workers"], help="Ray Train workers (data parallel; default: %(default)s)"
    )
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=d["cpus_per_worker"],
        help="CPUs per worker (default: all CPUs of the machine divided by --workers)",
    )
    p.add_argument("--use-gpu", action="store_true", default=d["use_gpu"], help="one GPU per worker")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default=d["precision"],
        help="bf16: forward passes under bf16 autocast, weights and optimiser state fp32; fp16 is refused "
        "(it would need loss scaling). Default: bf16 with --use-gpu, fp32 without",
    )
    p.add_argument(
        "--image-size", type=int, default=d["image_size"], help="render size of world images (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=d["seed"], help="seed of data and noise (default: %(default)s)")
    p.set_defaults(func=run)


def run(args) -> int:
    import dataclasses

    from jobs.pretrain import PretrainJobConfig, pretrain

    # Values the config rejects (e.g. --group-size 0) are its ConfigError: one line, exit 2 (`cli.main`).
    pretrain(PretrainJobConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainJobConfig)}))
    return 0
