"""The onboarding job as a typed function: `OnboardConfig` in, a committed registry version out.

    catalog (S3 or local) -> Ray Data: read, validate, encode each image once (actor pool)
      -> Ray Train: N workers learn their shards C concepts at a time, staging tokens as they go
      -> registry: one new version, committed only when every concept is learned or reported skipped

`tokenfactory onboard` (`jobs/onboard_cmd.py`) turns its flags into an `OnboardConfig`; the demo and the
benchmarks build one directly. The config, with the run id and the resolved backbone, is printed at the
start and stored in the version's manifest, so `evaluate` reads back exactly what a run learned with.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from factory.learner import LearnerConfig
from factory.losses import LossWeights
from factory.storage import S3Options
from factory.storage import absolute_uri
from schemas import RunReport

log = logging.getLogger(__name__)


@dataclass
class OnboardConfig:
    catalog: str  # a folder/manifest.json written by `world`, a CatalogRow Parquet/JSONL, or a PerVL layout
    registry: str  # token registry root URI
    learner: LearnerConfig = field(default_factory=lambda: onboard_learner())
    backbone: str | dict[str, Any] = "fashion-mini"  # a registered name, a config file/URI or a resolved dict
    weights: str | None = None
    precision: str = "fp32"  # of the frozen models in encoding and learning; tokens stay fp32
    run_id: str | None = None  # reuse one to resume an interrupted run (None: a new id)
    workers: int = 2  # Ray Train workers
    cpus_per_worker: float = 0.5  # fractional: leaves Ray Data room to run beside the workers
    threads_per_worker: int = 1
    use_gpu: bool = False
    concepts_per_step: int = 8
    min_images: int = 2
    batch_size: int = 64  # Ray Data batches of decoding and encoding
    decode_tasks: int = 2
    encoders: int = 1
    max_failures: int = 3  # Ray Train worker-group restarts
    report: str | None = None  # also write the run report (JSON) here
    allow_outside_catalog: bool = False
    s3: S3Options | None = field(default=None, repr=False)  # never recorded: it may hold keys

    def __post_init__(self):
        if isinstance(self.learner, dict):
            self.learner = LearnerConfig(**self.learner)
        # Ray workers run elsewhere: local paths become absolute once, here.
        for name in ("catalog", "registry", "weights", "report"):
            setattr(self, name, absolute_uri(getattr(self, name)))

    def record(self) -> dict[str, Any]:
        """The config as JSON-able data (printed, stored with the version), without the S3 options."""
        return {f.name: dataclasses.asdict(self)[f.name] for f in dataclasses.fields(self) if f.name != "s3"}


def onboard_learner(**changes: Any) -> LearnerConfig:
    """The learner settings `tokenfactory onboard` uses by default (both CE terms on; 150 steps)."""
    return dataclasses.replace(LearnerConfig(steps=150, log_every=0, weights=LossWeights(image_ce=1.0)), **changes)


def onboard(cfg: OnboardConfig) -> tuple[int, RunReport | None]:
    """Learn every concept of ``cfg.catalog`` into a new version of ``cfg.registry``: (version, report).

    A run id that is already committed is not run again: (its version, None)."""
    import ray

    from factory.backbones import resolve_backbone_config
    from factory.catalogs import read_concepts
    from factory.registry import TokenRegistry

    # Resolved here, before Ray starts: a bad name, path or checkpoint pairing fails in seconds. The resolved
    # config is what Data actors and Train workers get (and what the version records), as plain data.
    backbone = resolve_backbone_config(cfg.backbone, cfg.weights, cfg.s3)
    run_id = cfg.run_id or f"onboard-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
    job_config = {**cfg.record(), "run_id": run_id, "backbone_config": backbone.to_dict()}
    print("[onboard] config: " + json.dumps(job_config, sort_keys=True), flush=True)
    registry = TokenRegistry(cfg.registry, cfg.s3)
    done = registry.committed_version_for_run(run_id)
    if done is not None:
        print(f"[onboard] run {run_id} is already committed as version {done}: nothing to do", flush=True)
        return done, None

    started, stages = datetime.now(timezone.utc), {}
    t0 = time.perf_counter()
    specs = read_concepts(cfg.catalog, cfg.s3, allow_outside=cfg.allow_outside_catalog)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level="WARNING", include_dashboard=True,
                 dashboard_host="127.0.0.1")
    from factory.onboarding import image_size_for, too_few_images
    from jobs.onboard_data import encode_catalog

    encoded = encode_catalog(specs, backbone.to_dict(), image_size_for(backbone), cfg.s3, cfg.batch_size,
                             cfg.decode_tasks, cfg.encoders, use_gpu=cfg.use_gpu, precision=cfg.precision)
    stages["read_encode"] = time.perf_counter() - t0
    skipped = too_few_images(specs, {r.concept_id: len(r.features) for r in encoded.records}, cfg.min_images)
    records = [r for r in encoded.records if r.concept_id not in skipped]
    print(f"[onboard] {len(specs)} concepts, {encoded.images_read} images read, {len(encoded.rejected)} rejected, "
          f"{len(skipped)} concepts skipped, {len(records)} to learn", flush=True)

    t0 = time.perf_counter()
    if records:
        _train(cfg, run_id, job_config, records, registry, backbone)
    stages["train"] = time.perf_counter() - t0

    version, report = _commit(registry, run_id, job_config, specs, records, skipped, encoded, started, stages)
    _print_summary(report, version)
    if cfg.report:
        from factory import storage

        storage.write_json(cfg.report, report, cfg.s3)
    return version, report


def _banks(records):
    from factory.concepts import negative_banks

    return negative_banks([r.to_concept_data() for r in records])


def _train(cfg: OnboardConfig, run_id, job_config, records, registry, backbone) -> None:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from jobs.onboard_train import learn_shard

    config = {"backbone": backbone.to_dict(), "precision": cfg.precision, "s3": cfg.s3, "registry": cfg.registry,
              "run_id": run_id, "job_config": job_config, "learner": dataclasses.asdict(cfg.learner),
              "concepts_per_step": cfg.concepts_per_step, "threads": cfg.threads_per_worker,
              "use_gpu": cfg.use_gpu, "concepts": ray.put(records), "banks": ray.put(_banks(records))}
    workers = max(1, min(cfg.workers, len(records)))
    trainer = TorchTrainer(
        learn_shard, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=f"onboard-{run_id}", storage_path=os.path.abspath("build/ray_results"),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=_fit(trainer)), daemon=True)
    thread.start()
    _watch(thread, registry.staged(run_id), len(records))
    if isinstance(outcome.get("result"), BaseException):
        raise outcome["result"]


def _fit(trainer):
    try:
        return trainer.fit()
    except BaseException as e:  # surfaced by the driver thread
        return e


def _watch(thread, staged, total) -> None:
    """Print staged/total, rate and ETA while the trainer runs (read from the registry's staging area)."""
    t0, last = time.perf_counter(), -1
    while thread.is_alive():
        thread.join(timeout=5.0)
        try:
            n = len(staged.concept_ids())
        except Exception as e:  # a flaky store must not kill the driver; the workers retry on their own
            log.warning("progress check failed: %s", e)
            continue
        if n != last:
            dt = time.perf_counter() - t0
            rate = n / dt if dt > 0 else 0.0
            eta = (total - n) / rate if rate > 0 else float("nan")
            print(f"[onboard] learned {n}/{total} concepts  {rate * 60:.1f}/min  eta {eta:.0f}s", flush=True)
            last = n


def _commit(registry, run_id, job_config, specs, records, skipped, encoded, started, stages):
    from schemas import RejectedImage, SkippedConcept

    t0 = time.perf_counter()
    staged = registry.staged(run_id)
    learned = staged.records()
    missing = {r.concept_id for r in records} - {r.concept_id for r in learned}
    if missing:
        raise RuntimeError(f"{len(missing)} concepts were neither learned nor skipped (e.g. {sorted(missing)[:5]}); "
                           f"rerun with --run-id {run_id} to resume")
    if not learned:
        raise RuntimeError(f"no concept could be learned: {len(skipped)} skipped; see the report")
    # The report is complete before the commit, so the copy stored in the manifest is the whole report.
    report = RunReport(
        run_id=run_id, started_at=started, concepts_requested=len(specs),
        skipped=[SkippedConcept(concept_id=c, reason=r) for c, r in sorted(skipped.items())],
        images_read=encoded.images_read,
        images_rejected=[RejectedImage(uri=u, reason=r) for u, r in encoded.rejected],
        stage_seconds={**stages, "commit": time.perf_counter() - t0}, config=job_config,
        concepts_learned=len(learned), concept_metrics={r.concept_id: r.metrics for r in learned},
        finished_at=datetime.now(timezone.utc),
    )
    first = learned[0]  # the writer's backbone fields are what the workers staged
    version = registry.begin(run_id, first.backbone, first.backbone_fingerprint, job_config).commit(
        report=report.model_dump(mode="json"))
    return version, report


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


__all__ = ["OnboardConfig", "onboard", "onboard_learner"]
