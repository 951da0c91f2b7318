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



def register(sub) -> None:
    from cli.arguments import add_s3_arguments

    p = sub.add_parser("onboard", help="learn tokens for a whole catalog on Ray (S3 -> Ray Data -> Ray Train -> registry)",
                       description=__doc__)
    p.add_argument("--catalog", required=True, help="catalog URI: a folder/manifest.json written by `world`, or a CatalogRow Parquet/JSONL")
    p.add_argument("--registry", required=True, help="token registry root URI (s3://bucket/prefix or a local folder)")
    p.add_argument("--backbone", default="fashion-mini",
                   help="backbone: a registered name (`tokenfactory backbones`) or a config file/URI (default: fashion-mini)")
    p.add_argument("--weights", default=None,
                   help="backbone weights URI; for clip-vit-l14+sd15 / openclip-vit-h14+sd21 a ROOT (folder or s3:// "
                        "prefix) holding clip/ and diffusion/ (default: the backbone config's own)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="precision of the frozen models in encoding and learning; tokens stay fp32 (default: fp32, "
                        "the CPU choice; bf16 on GPUs)")
    p.add_argument("--ti-micro-batch", type=int, default=0,
                   help="UNet samples per TI forward/backward; 0: all concepts x samples at once (default: 0)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute UNet activations in the backward pass (less GPU memory, ~30%% more time)")
    p.add_argument("--ti-samples", type=int, default=2, help="TI (latent, noise, t) samples per concept per step (default: 2)")
    p.add_argument("--templates-per-step", type=int, default=0,
                   help="prompt templates encoded per concept per step, sampled; 0: all (default: 0)")
    p.add_argument("--patience", type=int, default=0,
                   help="early stopping: a concept stops after this many steps without its loss EMA improving by "
                        "--min-delta, and leaves the step's batches; 0: off (default: 0)")
    p.add_argument("--min-delta", type=float, default=1e-3, help="improvement early stopping counts (default: 0.001)")
    p.add_argument("--calibration-samples", type=int, default=8,
                   help="TI samples per concept that measure the gradient ratio λ_TI is calibrated by, once at the "
                        "start (default: 8)")
    p.add_argument("--max-norm-ratio", type=float, default=0.0,
                   help="bound each token's norm to this multiple of the mean word-embedding norm; 0: unbounded (default: 0)")
    p.add_argument("--run-id", default=None, help="run id; reuse it to resume an interrupted run (default: a new id)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: 2)")
    p.add_argument("--cpus-per-worker", type=float, default=0.5,
                   help="CPUs reserved per Train worker; fractional leaves room for Ray Data (default: 0.5)")
    p.add_argument("--threads-per-worker", type=int, default=1, help="torch threads per Train worker (default: 1)")
    p.add_argument("--use-gpu", action="store_true",
                   help="one GPU per Train worker and per image-encoder actor of the Data stage")
    p.add_argument("--concepts-per-step", type=int, default=8, help="concepts learned together per optimisation (default: 8)")
    p.add_argument("--min-images", type=int, default=2, help="fewest usable images a concept needs (default: 2)")
    p.add_argument("--steps", type=int, default=150, help="learner steps per chunk (default: 150)")
    p.add_argument("--lr", type=float, default=0.01, help="learner Adam learning rate (default: 0.01)")
    p.add_argument("--lambda-ti", type=float, default=1.0, help="textual-inversion loss weight (default: 1)")
    p.add_argument("--lambda-ce", type=float, default=1.0, help="text-side CE loss weight (default: 1)")
    p.add_argument("--lambda-image-ce", type=float, default=1.0, help="image-side CE weight among a chunk (default: 1)")
    p.add_argument("--lambda-reg", type=float, default=0.0, help="weight of ||v - e_parent||^2 (default: 0)")
    p.add_argument("--ti-balance", type=float, default=None,
                   help="calibrate λ_TI per concept so the TI term's gradient is this fraction of the CE terms' at "
                        "the start (0: λ_TI as given). Default: factory.losses.LossWeights.ti_balance, chosen by "
                        "benchmarks/objective_sweep.py on world seed 0")
    p.add_argument("--parametrization", choices=["projected", "free"], default="projected", help="token parametrisation")
    p.add_argument("--seed", type=int, default=0, help="learner seed (default: 0)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="concepts per Ray Data batch of decoding and encoding, rounded to whole chunks of "
                        "--concepts-per-step (default: 8)")
    p.add_argument("--bank-size", type=int, default=1024,
                   help="negative-bank images per parent, a fixed sample; 0: every image of the parent. Bounds memory "
                        "and the text-side CE's cost per step at catalog scale (default: 1024)")
    p.add_argument("--decode-tasks", type=int, default=2, help="concurrent decode tasks (default: 2)")
    p.add_argument("--encoders", type=int, default=1, help="image-encoder actors (default: 1)")
    p.add_argument("--max-failures", type=int, default=3, help="Ray Train worker-group restarts allowed (default: 3)")
    p.add_argument("--report", default=None, help="also write the run report (JSON) to this URI")
    p.add_argument("--allow-outside-catalog", action="store_true",
                   help="accept image URIs outside the catalog's bucket/folder (default: refused, see factory.catalog)")
    add_s3_arguments(p)
    p.set_defaults(func=run)


def learner_config(args) -> dict:
    """The `LearnerConfig` fields of an onboarding run, from its flags (also read for versions written before
    the learner settings were stored with them)."""
    from factory.losses import LossWeights

    if args.ti_balance is None:
        args.ti_balance = LossWeights().ti_balance
    return {"steps": args.steps, "lr": args.lr, "seed": args.seed, "parametrization": args.parametrization,
            "weights": {"ti": args.lambda_ti, "ce": args.lambda_ce, "image_ce": args.lambda_image_ce,
                        "reg": args.lambda_reg, "ti_balance": args.ti_balance}, "log_every": 0, "ti_samples": args.ti_samples,
            "ti_micro_batch": args.ti_micro_batch, "gradient_checkpointing": args.gradient_checkpointing,
            "max_norm_ratio": args.max_norm_ratio, "templates_per_step": getattr(args, "templates_per_step", 0),
            "patience": getattr(args, "patience", 0), "min_delta": getattr(args, "min_delta", 1e-3),
            "calibration_samples": getattr(args, "calibration_samples", 8)}


def config_from_args(args):
    """The typed job config of these flags."""
    from cli.arguments import s3_options
    from jobs.onboard import OnboardConfig

    fields = ("catalog", "registry", "backbone", "weights", "precision", "run_id", "workers", "cpus_per_worker",
              "threads_per_worker", "use_gpu", "concepts_per_step", "min_images", "batch_size", "bank_size",
              "decode_tasks", "encoders", "max_failures", "report", "allow_outside_catalog")
    return OnboardConfig(**{f: getattr(args, f) for f in fields}, learner=learner_config(args), s3=s3_options(args))


def run(args) -> int:
    from jobs.onboard import onboard

    onboard(config_from_args(args))
    return 0
