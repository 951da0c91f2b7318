"""`tokenfactory onboard`: learn a token for every concept of a catalog, on Ray, into a token registry.

(The command line's side: flags -> `jobs.onboard.OnboardConfig` -> `jobs.onboard.onboard`.)

    catalog (S3 or local) -> Ray Data: one row per concept; read, validate, encode each image once (actor pool)
      -> streamed into Ray Train: N workers learn C concepts at a time, staging tokens as they go
      -> registry: one new version, committed only when every concept is learned or reported skipped

Streaming: the driver holds the catalog's ids and URIs only and each worker one chunk, so memory stays
flat as the catalog grows; negatives come from a bounded per-parent bank (--bank-size).

Resumable: rerun with the same ``--run-id`` and concepts already staged are not learned again; rerunning
a run id that was committed does nothing. The same entry point works under ``ray job submit -- tokenfactory
onboard …`` on a cluster (it joins the cluster at RAY_ADDRESS, else starts a local one).
"""

from __future__ import annotations

# Learner flags -> their `LearnerConfig` / `LossWeights` field (--ti-micro-batch is apart: its default is the
# device's, `jobs.onboard.onboard_micro_batch`).
LEARNER_FLAGS = {
    "steps": "steps",
    "lr": "lr",
    "seed": "seed",
    "parametrization": "parametrization",
    "ti_samples": "ti_samples",
    "templates_per_step": "templates_per_step",
    "patience": "patience",
    "min_delta": "min_delta",
    "calibration_samples": "calibration_samples",
    "max_norm_ratio": "max_norm_ratio",
    "gradient_checkpointing": "gradient_checkpointing",
}
WEIGHT_FLAGS = {
    "lambda_ti": "ti",
    "lambda_ce": "ce",
    "lambda_image_ce": "image_ce",
    "lambda_reg": "reg",
    "ti_balance": "ti_balance",
}


def register(sub) -> None:
    from cli.arguments import add_s3_arguments, field_defaults
    from factory.learner_config import LearnerConfig, LossWeights
    from jobs.onboard import ONBOARD_LEARNER, ONBOARD_WEIGHTS, OnboardConfig
    from jobs.onboard_data import ENCODER_GPU_SHARE

    # Every default is read off a field (one source per default): the job's from `OnboardConfig`, the
    # learner's from `LearnerConfig` / `LossWeights` with onboarding's own laid over (`jobs.onboard`), which is
    # what `OnboardConfig(...)` built in Python learns with too.
    job = field_defaults(OnboardConfig)
    learner = {**field_defaults(LearnerConfig), **ONBOARD_LEARNER}
    weights = {**field_defaults(LossWeights), **ONBOARD_WEIGHTS}
    p = sub.add_parser(
        "onboard",
        help="learn tokens for a whole catalog on Ray (S3 -> Ray Data -> Ray Train -> registry)",
        description=__doc__,
    )
    p.add_argument(
        "--catalog",
        required=True,
        help="catalog URI: a folder/manifest.json written by `world`, or a CatalogRow Parquet/JSONL",
    )
    p.add_argument("--registry", required=True, help="token registry root URI (s3://bucket/prefix or a local folder)")
    p.add_argument(
        "--backbone",
        default=job["backbone"],
        help="backbone: a registered name (`tokenfactory backbones`) or a config file/URI (default: %(default)s)",
    )
    p.add_argument(
        "--weights",
        default=job["weights"],
        help="backbone weights URI; for clip-vit-l14+sd15 / openclip-vit-h14+sd21 a ROOT (folder or s3:// "
        "prefix) holding clip/ and diffusion/ (default: the backbone config's own)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default=job["precision"],
        help="precision of the frozen models in encoding and learning; tokens stay fp32. fp16 is refused "
        "here: without loss scaling its range loses the TI gradients (use bf16). Default: bf16 with "
        "--use-gpu, fp32 without",
    )
    p.add_argument(
        "--ti-micro-batch",
        type=micro_batch,
        default=None,
        help="UNet samples per TI forward/backward: an integer (0: all concepts x samples at once) or "
        "'auto' (the largest micro-batch that fits the GPU's free memory; 0 on a CPU). Default: "
        "auto with --use-gpu, 0 without",
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        default=learner["gradient_checkpointing"],
        help="recompute UNet activations in the backward pass (less GPU memory, ~30%% more time)",
    )
    p.add_argument(
        "--ti-samples",
        type=int,
        default=learner["ti_samples"],
        help="TI (latent, noise, t) samples per concept per step (default: %(default)s)",
    )
    p.add_argument(
        "--templates-per-step",
        type=int,
        default=learner["templates_per_step"],
        help="prompt templates encoded per concept per step, sampled; 0: all (default: %(default)s)",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=learner["patience"],
        help="early stopping: a concept stops after this many steps without its loss EMA improving by "
        "--min-delta, and leaves the step's batches; 0: off (default: %(default)s)",
    )
    p.add_argument(
        "--min-delta",
        type=float,
        default=learner["min_delta"],
        help="improvement early stopping counts (default: %(default)s)",
    )
    p.add_argument(
        "--calibration-samples",
        type=int,
        default=learner["calibration_samples"],
        help="TI samples per concept that measure the gradient ratio λ_TI is calibrated by, once at the "
        "start (default: %(default)s)",
    )
    p.add_argument(
        "--max-norm-ratio",
        type=float,
        default=learner["max_norm_ratio"],
        help="bound each token's norm to this multiple of the mean word-embedding norm; 0: unbounded "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--run-id", default=job["run_id"], help="run id; reuse it to resume an interrupted run (default: a new id)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=job["workers"],
        help="Ray Train workers; with --use-gpu capped at the GPUs Ray sees (default: %(default)s)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=job["cpus_per_worker"],
        help="CPUs reserved per Train worker; fractional leaves room for Ray Data (default: %(default)s)",
    )
    p.add_argument(
        "--threads-per-worker",
        type=int,
        default=job["threads_per_worker"],
        help="torch threads per Train worker (default: %(default)s)",
    )
    p.add_argument(
        "--use-gpu",
        action="store_true",
        default=job["use_gpu"],
        help=f"learn and encode on GPUs: each Train worker takes {1 - ENCODER_GPU_SHARE:g} of a GPU and "
        f"each image-encoder actor {ENCODER_GPU_SHARE:g} (one encoder fits beside each worker); a "
        "request the cluster's GPUs cannot hold fails at once",
    )
    p.add_argument(
        "--concepts-per-step",
        type=int,
        default=job["concepts_per_step"],
        help="concepts learned together per optimisation (default: %(default)s)",
    )
    p.add_argument(
        "--min-images",
        type=int,
        default=job["min_images"],
        help="fewest usable images a concept needs (default: %(default)s)",
    )
    p.add_argument("--steps", type=int, default=learner["steps"], help="learner steps per chunk (default: %(default)s)")
    p.add_argument("--lr", type=float, default=learner["lr"], help="learner Adam learning rate (default: %(default)s)")
    p.add_argument(
        "--lambda-ti", type=float, default=weights["ti"], help="textual-inversion loss weight (default: %(default)s)"
    )
    p.add_argument(
        "--lambda-ce", type=float, default=weights["ce"], help="text-side CE loss weight (default: %(default)s)"
    )
    p.add_argument(
        "--lambda-image-ce",
        type=float,
        default=weights["image_ce"],
        help="image-side CE weight among a chunk (default: %(default)s)",
    )
    p.add_argument(
        "--lambda-reg", type=float, default=weights["reg"], help="weight of ||v - e_parent||^2 (default: %(default)s)"
    )
    p.add_argument(
        "--ti-balance",
        type=float,
        default=weights["ti_balance"],
        help="calibrate λ_TI per concept so the TI term's gradient is this fraction of the CE terms' at "
        "the start (0: λ_TI as given). Default: %(default)s (factory.losses.LossWeights.ti_balance, "
        "chosen by benchmarks/objective_sweep.py on world seed 0)",
    )
    p.add_argument(
        "--parametrization",
        choices=["projected", "free"],
        default=learner["parametrization"],
        help="token parametrisation (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=learner["seed"], help="learner seed (default: %(default)s)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=job["batch_size"],
        help="concepts per Ray Data batch of decoding and encoding, rounded to whole chunks of "
        "--concepts-per-step (default: %(default)s)",
    )
    p.add_argument(
        "--bank-size",
        type=int,
        default=job["bank_size"],
        help="negative-bank images per parent, a fixed sample; 0: every image of the parent. Bounds memory "
        "and the text-side CE's cost per step at catalog scale (default: %(default)s)",
    )
    p.add_argument(
        "--decode-tasks", type=int, default=job["decode_tasks"], help="concurrent decode tasks (default: %(default)s)"
    )
    p.add_argument("--encoders", type=int, default=job["encoders"], help="image-encoder actors (default: %(default)s)")
    p.add_argument(
        "--max-failures",
        type=int,
        default=job["max_failures"],
        help="Ray Train worker-group restarts allowed (default: %(default)s)",
    )
    p.add_argument("--report", default=job["report"], help="also write the run report (JSON) to this URI")
    p.add_argument(
        "--allow-outside-catalog",
        action="store_true",
        default=job["allow_outside_catalog"],
        help="accept image URIs outside the catalog's bucket/folder (default: refused, see factory.catalogs)",
    )
    add_s3_arguments(p)
    p.set_defaults(func=run)


def micro_batch(text: str) -> int | str:
    """``--ti-micro-batch``: a count of UNet samples (>= 0) or ``auto``."""
    import argparse

    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 or 'auto', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 or 'auto', got {value}")
    return value


def learner_config(args):
    """The `LearnerConfig` of an onboarding run's flags: onboarding's defaults (`jobs.onboard.onboard_learner`,
    which the flags' defaults are read from) with the flags laid over."""
    from factory.learner_config import LossWeights
    from jobs.onboard import onboard_learner

    changes = {field: getattr(args, dest) for dest, field in LEARNER_FLAGS.items()}
    if args.ti_micro_batch is not None:  # else the device's ("auto" is resolved on the worker's device)
        changes["ti_micro_batch"] = args.ti_micro_batch
    weights = LossWeights(**{field: getattr(args, dest) for dest, field in WEIGHT_FLAGS.items()})
    return onboard_learner(args.use_gpu, weights=weights, **changes)


def config_from_args(args):
    """The typed job config of these flags (every `OnboardConfig` field but the learner and S3 is a flag)."""
    import dataclasses

    from cli.arguments import s3_options
    from jobs.onboard import OnboardConfig

    fields = [f.name for f in dataclasses.fields(OnboardConfig) if f.name not in ("learner", "s3")]
    return OnboardConfig(**{f: getattr(args, f) for f in fields}, learner=learner_config(args), s3=s3_options(args))


def run(args) -> int:
    from jobs.onboard import onboard

    onboard(config_from_args(args))
    return 0
