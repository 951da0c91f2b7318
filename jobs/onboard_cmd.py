"""`tokenfactory onboard`: learn a token for every concept of a catalog, on Ray, into a token registry.

    catalog (S3 or local) -> Ray Data: read, validate, encode each image once (actor pool)
      -> Ray Train: N workers learn their shards C concepts at a time, staging tokens as they go
      -> registry: one new version, committed only when every concept is learned or reported skipped

Resumable: rerun with the same ``--run-id`` and concepts already staged are not learned again; rerunning
a run id that was committed does nothing. The same entry point works under ``ray job submit -- tokenfactory
onboard …`` on a cluster (it joins the cluster at RAY_ADDRESS, else starts a local one).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from datetime import datetime, timezone

log = logging.getLogger(__name__)


def register(sub) -> None:
    from jobs.arguments import add_s3_arguments

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
    p.add_argument("--batch-size", type=int, default=64, help="Ray Data batch size for decoding and encoding (default: 64)")
    p.add_argument("--decode-tasks", type=int, default=2, help="concurrent decode tasks (default: 2)")
    p.add_argument("--encoders", type=int, default=1, help="image-encoder actors (default: 1)")
    p.add_argument("--max-failures", type=int, default=3, help="Ray Train worker-group restarts allowed (default: 3)")
    p.add_argument("--report", default=None, help="also write the run report (JSON) to this URI")
    p.add_argument("--allow-outside-catalog", action="store_true",
                   help="accept image URIs outside the catalog's bucket/folder (default: refused, see factory.catalog)")
    add_s3_arguments(p)
    p.set_defaults(func=run)


def learner_config(args) -> dict:
    """The `LearnerConfig` fields of an onboarding run, from its flags (also read back by `evaluate`)."""
    from factory.losses import LossWeights

    if args.ti_balance is None:
        args.ti_balance = LossWeights().ti_balance  # resolved here, so the run's printed config records it
    return {"steps": args.steps, "lr": args.lr, "seed": args.seed, "parametrization": args.parametrization,
            "weights": {"ti": args.lambda_ti, "ce": args.lambda_ce, "image_ce": args.lambda_image_ce,
                        "reg": args.lambda_reg, "ti_balance": args.ti_balance}, "log_every": 0, "ti_samples": args.ti_samples,
            "ti_micro_batch": args.ti_micro_batch, "gradient_checkpointing": args.gradient_checkpointing,
            "max_norm_ratio": args.max_norm_ratio}


def run(args) -> int:
    import ray

    from factory.backbones import resolve_backbone_config
    from factory.catalogs import read_concepts
    from factory.registry import TokenRegistry
    from jobs.arguments import absolute_uri, effective_config, s3_options

    for name in ("catalog", "registry", "weights", "report"):
        setattr(args, name, absolute_uri(getattr(args, name)))
    s3 = s3_options(args)
    # Resolved here, before Ray starts: a bad name, path or checkpoint pairing fails in seconds. The resolved
    # config is what Data actors and Train workers get (and what the version records), as plain data.
    backbone = resolve_backbone_config(args.backbone, args.weights, s3)
    run_id = args.run_id or f"onboard-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    # The run's resolved learner settings travel with it (printed, and stored in the version's manifest), so
    # `evaluate` reads back exactly what was learned instead of re-deriving it from today's flags.
    learner = learner_config(args)
    job_config = {**effective_config(args), "run_id": run_id, "backbone_config": backbone.to_dict(),
                  "learner": learner}
    print("[onboard] config: " + json.dumps(job_config, sort_keys=True), flush=True)
    registry = TokenRegistry(args.registry, s3)
    done = registry.committed_version_for_run(run_id)
    if done is not None:
        print(f"[onboard] run {run_id} is already committed as version {done}: nothing to do", flush=True)
        return 0

    started, stages = datetime.now(timezone.utc), {}
    t0 = time.perf_counter()
    specs = read_concepts(args.catalog, s3, allow_outside=args.allow_outside_catalog)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level="WARNING", include_dashboard=True,
                 dashboard_host="127.0.0.1")
    from factory.onboarding import image_size_for, too_few_images
    from jobs.onboard_data import encode_catalog

    encoded = encode_catalog(specs, backbone.to_dict(), image_size_for(backbone), s3, args.batch_size,
                             args.decode_tasks, args.encoders, use_gpu=args.use_gpu, precision=args.precision)
    stages["read_encode"] = time.perf_counter() - t0
    skipped = too_few_images(specs, {r["concept_id"]: len(r["features"]) for r in encoded.records}, args.min_images)
    records = [r for r in encoded.records if r["concept_id"] not in skipped]
    print(f"[onboard] {len(specs)} concepts, {encoded.images_read} images read, {len(encoded.rejected)} rejected, "
          f"{len(skipped)} concepts skipped, {len(records)} to learn", flush=True)

    t0 = time.perf_counter()
    if records:
        _train(args, s3, run_id, job_config, records, registry, backbone)
    stages["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    version, report = _commit(registry, run_id, job_config, specs, records, skipped, encoded, started, stages,
                              backbone.name)
    report.stage_seconds["commit"] = time.perf_counter() - t0
    _print_summary(report, version)
    if args.report:
        from factory import storage

        storage.write_json(args.report, report, s3)
    return 0


def _banks(records):
    import torch

    from factory.concepts import negative_banks
    from factory.learner import ConceptData

    return negative_banks([ConceptData(r["concept_id"], r["parent"], torch.from_numpy(r["features"])) for r in records])


def _train(args, s3, run_id, job_config, records, registry, backbone) -> None:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.onboard_train import learn_shard

    config = {"backbone": backbone.to_dict(), "precision": args.precision, "s3": s3, "registry": args.registry,
              "run_id": run_id, "job_config": job_config, "learner": job_config["learner"],
              "concepts_per_step": args.concepts_per_step, "threads": args.threads_per_worker,
              "use_gpu": args.use_gpu, "concepts": ray.put(records), "banks": ray.put(_banks(records))}
    workers = max(1, min(args.workers, len(records)))
    trainer = TorchTrainer(
        learn_shard, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=args.use_gpu,
                                     resources_per_worker={"CPU": args.cpus_per_worker}),
        run_config=RunConfig(name=f"onboard-{run_id}", storage_path=os.path.abspath("build/ray_results"),
                             failure_config=FailureConfig(max_failures=args.max_failures)),
    )
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=_fit(trainer)), daemon=True)
    thread.start()
    _watch(thread, registry, run_id, backbone.name, len(records))
    if isinstance(outcome.get("result"), BaseException):
        raise outcome["result"]


def _fit(trainer):
    try:
        return trainer.fit()
    except BaseException as e:  # surfaced by the driver thread
        return e


def _watch(thread, registry, run_id, backbone, total) -> None:
    """Print staged/total, rate and ETA while the trainer runs (read from the registry's staging area)."""
    writer = registry.begin(run_id, backbone, "-")
    t0, last = time.perf_counter(), -1
    while thread.is_alive():
        thread.join(timeout=5.0)
        try:
            n = len(writer.staged_concept_ids())
        except Exception as e:  # a flaky store must not kill the driver; the workers retry on their own
            log.warning("progress check failed: %s", e)
            continue
        if n != last:
            dt = time.perf_counter() - t0
            rate = n / dt if dt > 0 else 0.0
            eta = (total - n) / rate if rate > 0 else float("nan")
            print(f"[onboard] learned {n}/{total} concepts  {rate * 60:.1f}/min  eta {eta:.0f}s", flush=True)
            last = n


def _commit(registry, run_id, job_config, specs, records, skipped, encoded, started, stages, backbone_name):
    from schemas import RejectedImage, RunReport, SkippedConcept

    report = RunReport(
        run_id=run_id, started_at=started, concepts_requested=len(specs),
        skipped=[SkippedConcept(concept_id=c, reason=r) for c, r in sorted(skipped.items())],
        images_read=encoded.images_read,
        images_rejected=[RejectedImage(uri=u, reason=r) for u, r in encoded.rejected],
        stage_seconds=dict(stages), config=job_config,
    )
    writer = registry.begin(run_id, backbone_name, "-")
    staged = writer.staged_concept_ids()
    missing = {r["concept_id"] for r in records} - staged
    if missing:
        raise RuntimeError(f"{len(missing)} concepts were neither learned nor skipped (e.g. {sorted(missing)[:5]}); "
                           f"rerun with --run-id {run_id} to resume")
    if not staged:
        raise RuntimeError(f"no concept could be learned: {len(skipped)} skipped; see the report")
    version_writer = _writer_from_staged(registry, run_id, job_config)
    report.concepts_learned = len(staged)
    report.finished_at = datetime.now(timezone.utc)
    version = version_writer.commit(report=report.model_dump(mode="json"))
    opened = registry.open(version)
    report.concept_metrics = {r.concept_id: r.metrics for r in opened.records()}
    return version, report


def _writer_from_staged(registry, run_id, job_config):
    """A writer whose backbone fields match what the workers staged (read back from a staged shard)."""
    from factory import storage
    from schemas import TokenRecord, from_arrow

    probe = registry.begin(run_id, "-", "-")
    first = from_arrow(storage.read_parquet(probe.staged_shards()[0], registry.s3), TokenRecord)[0]
    return registry.begin(run_id, first.backbone, first.backbone_fingerprint, job_config)


def _print_summary(report, version) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"onboarding run {report.run_id} -> registry version {version}")
    table.add_column("what")
    table.add_column("count", justify="right")
    for k, v in [("concepts requested", report.concepts_requested), ("concepts learned", report.concepts_learned),
                 ("concepts skipped", len(report.skipped)), ("images read", report.images_read),
                 ("images rejected", len(report.images_rejected))]:
        table.add_row(k, str(v))
    for k, v in report.stage_seconds.items():
        table.add_row(f"{k} seconds", f"{v:.1f}")
    Console().print(table)
    for s in report.skipped:
        print(f"  skipped {s.concept_id}: {s.reason}")
    for r in report.images_rejected:
        print(f"  rejected {r.uri}: {r.reason}")
