"""The onboarding job as a typed function: `OnboardConfig` in, a committed registry version out.

    catalog (S3 or local) -> Ray Data: one row per chunk of C concepts; read, validate, encode each image once
      -> streamed into Ray Train: N workers learn a chunk at a time, staging tokens as they go
      -> registry: one new version, committed only when every concept is learned or reported skipped

Streaming all the way: the driver holds the catalog's metadata (ids and URIs), never its images or
features, and each worker holds one chunk, so memory stays flat as the catalog grows. The negative banks
are the one thing every worker needs up front: a bounded sample per parent (``bank_size`` images),
encoded first and kept in Ray's object store, from where its chunks also stream to the workers
(`jobs.onboard_data.concept_stream`); every image is encoded once. Chunks are formed by the driver from
the catalog alone (by parent, then id), so the same catalog and config learn the same tokens whatever
the worker count, and the evaluation's ablations learn exactly the registry's chunks.

`tokenfactory onboard` (`cli/onboard_cmd.py`) turns its flags into an `OnboardConfig`; the demo and the
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

from factory.learner_config import LearnerConfig, LossWeights
from factory.storage import S3Options, absolute_uri
from jobs._ray import connect
from jobs.onboard_train import WorkerConfig
from schemas import RunReport

log = logging.getLogger(__name__)


# The one source of onboarding's learner defaults: the `LearnerConfig` fields onboarding sets otherwise than
# the library does. They are what `tokenfactory onboard` has always run with (and the README's numbers):
# 150 steps, both CE terms (the image-side CE couples a chunk's concepts), early stopping's improvement
# 1e-3, no per-step log. `LearnerConfig`'s own defaults (200 steps, image_ce 0, min_delta 1e-4) stay as
# they are, since the in-process learner, the evaluation and the tests are measured with them. Every
# other setting is LearnerConfig's / LossWeights' field default. The CLI's flags read their defaults
# from here and from those fields (`cli/onboard_cmd.py`), and `OnboardConfig.learner` is built here.
ONBOARD_LEARNER: dict[str, Any] = {"steps": 150, "min_delta": 1e-3, "log_every": 0}
ONBOARD_WEIGHTS: dict[str, Any] = {"image_ce": 1.0}


def onboard_micro_batch(use_gpu: bool) -> int | str:
    """Onboarding's TI micro-batch: "auto" on GPUs (the largest that fits the worker GPU's free memory,
    resolved on its device), 0 (one batch) on CPUs."""
    return "auto" if use_gpu else 0


def onboard_learner(use_gpu: bool = False, **changes: Any) -> LearnerConfig:
    """The learner settings onboarding uses by default (`ONBOARD_LEARNER`), with ``changes`` laid over."""
    base = LearnerConfig(
        **ONBOARD_LEARNER, weights=LossWeights(**ONBOARD_WEIGHTS), ti_micro_batch=onboard_micro_batch(use_gpu)
    )
    return dataclasses.replace(base, **changes)


@dataclass
class OnboardConfig:
    catalog: str  # a folder/manifest.json written by `world`, a CatalogRow Parquet/JSONL, or a PerVL layout
    registry: str  # token registry root URI
    learner: LearnerConfig | None = None  # None: `onboard_learner(use_gpu)`, onboarding's defaults
    backbone: str | dict[str, Any] = "fashion-mini"  # a registered name, a config file/URI or a resolved dict
    weights: str | None = None
    precision: str | None = None  # of the frozen models in encoding and learning (None: bf16 on GPUs, else
    # fp32; fp16 is refused, see `factory.device.check_learning_precision`); tokens stay fp32
    run_id: str | None = None  # reuse one to resume an interrupted run (None: a new id)
    workers: int = 2  # Ray Train workers (with use_gpu: capped at the cluster's GPUs)
    cpus_per_worker: float = 0.5  # fractional: leaves Ray Data room to run beside the workers
    threads_per_worker: int = 1
    use_gpu: bool = False
    concepts_per_step: int = 8
    min_images: int = 2
    batch_size: int = 8  # concepts per Ray Data batch of decoding and encoding (whole chunks: at least one)
    bank_size: int = 1024  # negative-bank images per parent (0: all); bounds memory and per-step cost
    decode_tasks: int = 2
    encoders: int = 1
    max_failures: int = 3  # Ray Train worker-group restarts
    report: str | None = None  # also write the run report (JSON) here
    allow_outside_catalog: bool = False
    s3: S3Options | None = field(default=None, repr=False)  # never recorded: it may hold keys

    def __post_init__(self):
        from factory.device import check_learning_precision, default_precision

        if self.learner is None:
            self.learner = onboard_learner(self.use_gpu)
        elif isinstance(self.learner, dict):
            self.learner = LearnerConfig(**self.learner)
        if self.precision is None:
            self.precision = default_precision(self.use_gpu)
        check_learning_precision(self.precision)  # a ConfigError before anything runs
        # Ray workers run elsewhere: local paths become absolute once, here.
        for name in ("catalog", "registry", "weights", "report"):
            setattr(self, name, absolute_uri(getattr(self, name)))

    def record(self) -> dict[str, Any]:
        """The config as JSON-able data (printed, stored with the version), without the S3 options."""
        return {f.name: dataclasses.asdict(self)[f.name] for f in dataclasses.fields(self) if f.name != "s3"}


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
    connect(dashboard=True)
    from factory.onboarding import image_size_for
    from jobs.onboard_data import STREAM_ENCODER_CPUS, EncodeSettings, concept_stream, plan_placement

    # Before any data moves: a GPU request this cluster cannot hold fails here, in seconds, not as a wait.
    placement = plan_placement(
        ray.cluster_resources().get("GPU", 0),
        cfg.workers,
        cfg.use_gpu,
        cfg.encoders,
        cfg.cpus_per_worker,
        STREAM_ENCODER_CPUS,
    )
    if placement.capped_from is not None:
        print(
            f"[onboard] --workers {placement.capped_from} capped at {placement.workers}: the GPUs Ray sees", flush=True
        )
    chunks_per_batch = max(1, round(cfg.batch_size / cfg.concepts_per_step))  # Ray Data batches whole chunks
    encode = EncodeSettings(
        backbone=backbone.to_dict(),
        image_size=image_size_for(backbone),
        s3=cfg.s3,
        batch_size=chunks_per_batch,
        decode_tasks=cfg.decode_tasks,
        encoders=cfg.encoders,
        use_gpu=cfg.use_gpu,
        precision=cfg.precision,
    )
    # Concepts a previous attempt of this run id staged or skipped are not learned again.
    done = _staged_or_noted(registry.staged(run_id))
    todo = {s.concept_id for s in specs} - done
    banks, stream, n_chunks = concept_stream(specs, todo, cfg.bank_size, cfg.min_images, cfg.concepts_per_step, encode)
    stages["banks"] = time.perf_counter() - t0
    print(
        f"[onboard] {len(specs)} concepts ({len(specs) - len(todo)} done by an earlier attempt), "
        f"banks of {sum(len(b.owners) for b in banks.values())} images over {len(banks)} parents",
        flush=True,
    )

    t0 = time.perf_counter()
    if todo:
        worker = WorkerConfig(
            run_id=run_id,
            registry=cfg.registry,
            backbone=encode.backbone,
            precision=cfg.precision,
            learner=cfg.learner,
            job_config=job_config,
            min_images=cfg.min_images,
            threads=cfg.threads_per_worker,
            use_gpu=cfg.use_gpu,
            banks=ray.put(banks),
            s3=cfg.s3,
        )
        _train(cfg, placement, worker, stream, len(todo), n_chunks, registry)
    stages["encode_train"] = time.perf_counter() - t0

    version, report = _commit(registry, run_id, job_config, specs, started, stages)
    _print_summary(report, version)
    if cfg.report:
        from factory import storage

        storage.write_json(cfg.report, report, cfg.s3)
    return version, report


def _staged_or_noted(staged) -> set[str]:
    """Concept ids a run id has already dealt with: tokens staged, or noted as skipped."""
    return staged.concept_ids() | {cid for note in staged.notes() for cid in note.get("skipped", {})}


def _train(cfg: OnboardConfig, placement, worker: WorkerConfig, stream, n_concepts, n_chunks, registry) -> None:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.onboard_train import learn_stream

    workers = max(1, min(placement.workers, n_chunks))
    trainer = TorchTrainer(
        # Ray Train wants a dict here: it holds the one typed, picklable worker config (`WorkerConfig.of`).
        learn_stream,
        train_loop_config=worker.train_loop_config(),
        # gloo whatever the device: the workers are independent and never run a collective, so NCCL (Ray's
        # choice for GPU workers) would only build communicators on every GPU, and cannot start without CUDA.
        torch_config=TorchConfig(backend="gloo"),
        datasets={"concepts": stream},
        dataset_config=every_row_data_config(),
        # With use_gpu, a fraction of a GPU per worker: the rest is an encoder actor's (`plan_placement`).
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=cfg.use_gpu, resources_per_worker=placement.worker_resources
        ),
        run_config=RunConfig(
            name=f"onboard-{worker.run_id}",
            storage_path=os.path.abspath("build/ray_results"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=_fit(trainer)), daemon=True)
    thread.start()
    _watch(thread, registry.staged(worker.run_id), n_concepts)
    if isinstance(outcome.get("result"), BaseException):
        raise outcome["result"]


def every_row_data_config():
    """Ray Train's `DataConfig`, splitting the concept stream with ``equal=False``. The stock config
    splits with ``equal=True``, which balances epochs of training data by *dropping* the rows that do
    not divide evenly (measured: 3 concepts on 2 workers learned 2). Here every row is a chunk of concepts
    a customer asked for, so no row may be dropped; shards of unequal length are fine."""
    from ray.train import DataConfig

    class _EveryRow(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out = [{} for _ in range(world_size)]
            hints = worker_node_ids if self._enable_shard_locality else None
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    out[i][name] = split
            return out

    return _EveryRow()


def _fit(trainer):
    try:
        return trainer.fit()
    except BaseException as e:  # surfaced by the driver thread
        return e


def _watch(thread, staged, total) -> None:
    """Print staged/total, rate and ETA while the trainer runs (read from the registry's staging area;
    each shard is read once, so a check costs the new shards only, not the whole run so far)."""
    from factory import storage

    t0, last, counts = time.perf_counter(), -1, {}
    while thread.is_alive():
        thread.join(timeout=5.0)
        try:
            for uri in staged.shards():
                if uri not in counts:
                    counts[uri] = storage.read_parquet(uri, staged.registry.s3).num_rows
        except Exception as e:  # a flaky store must not kill the driver; the workers retry on their own
            log.warning("progress check failed: %s", e)
            continue
        n = sum(counts.values())
        if n != last:
            dt = time.perf_counter() - t0
            rate = n / dt if dt > 0 else 0.0
            eta = (total - n) / rate if rate > 0 else float("nan")
            print(f"[onboard] learned {n}/{total} concepts  {rate * 60:.1f}/min  eta {eta:.0f}s", flush=True)
            last = n


def _notes(staged) -> tuple[dict[str, str], list[tuple[str, str]], list[dict]]:
    """(skipped id -> reason, rejected (uri, reason), worker stats) from the workers' notes, deduplicated
    (a resumed chunk notes its concepts again)."""
    skipped, rejected, workers = {}, {}, []
    for note in staged.notes():
        skipped.update(note.get("skipped", {}))
        rejected.update({uri: why for uri, why in note.get("rejected", [])})
        if "worker" in note:
            workers.append(note["worker"])
    return skipped, sorted(rejected.items()), sorted(workers, key=lambda w: (w["started"], w["rank"]))


def _commit(registry, run_id, job_config, specs, started, stages):
    from schemas import RejectedImage, SkippedConcept

    t0 = time.perf_counter()
    staged = registry.staged(run_id)
    learned = staged.records()
    skipped, rejected, workers = _notes(staged)
    missing = {s.concept_id for s in specs} - {r.concept_id for r in learned} - set(skipped)
    if missing:
        raise RuntimeError(
            f"{len(missing)} concepts were neither learned nor skipped (e.g. {sorted(missing)[:5]}); "
            f"rerun with --run-id {run_id} to resume"
        )
    if not learned:
        raise RuntimeError(f"no concept could be learned: {len(skipped)} skipped; see the report")
    # The report is complete before the commit, so the copy stored in the manifest is the whole report.
    report = RunReport(
        run_id=run_id,
        started_at=started,
        concepts_requested=len(specs),
        skipped=[SkippedConcept(concept_id=c, reason=r) for c, r in sorted(skipped.items())],
        images_read=sum(len(s.image_uris) for s in specs),
        images_rejected=[RejectedImage(uri=u, reason=r) for u, r in rejected],
        stage_seconds={**stages, "commit": time.perf_counter() - t0},
        config=job_config,
        concepts_learned=len(learned),
        concept_metrics={r.concept_id: r.metrics for r in learned},
        workers=workers,
        finished_at=datetime.now(timezone.utc),
    )
    first = learned[0]  # the writer's backbone fields are what the workers staged
    version = registry.begin(run_id, first.backbone, first.backbone_fingerprint, job_config).commit(
        report=report.model_dump(mode="json")
    )
    return version, report


def steady_rate(workers: list[dict]) -> tuple[float, float]:
    """(concepts/min after start-up, start-up seconds) of a run from its report's ``workers``: concepts
    whose chunk ended after the first chunk ended (all workers pooled), over the time from that first
    chunk end to the last; start-up is from the earliest worker start to that first chunk end. NaN when
    fewer than two chunks ran."""
    chunks = sorted((end, n) for w in workers for end, n in w["chunks"])
    if len(chunks) < 2:
        return float("nan"), float("nan")
    first = chunks[0][0]
    startup = first - min(w["started"] for w in workers)
    return sum(n for _, n in chunks[1:]) / max(chunks[-1][0] - first, 1e-9) * 60, startup


def _print_summary(report, version) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"onboarding run {report.run_id} -> registry version {version}")
    table.add_column("what")
    table.add_column("count", justify="right")
    for k, v in [
        ("concepts requested", report.concepts_requested),
        ("concepts learned", report.concepts_learned),
        ("concepts skipped", len(report.skipped)),
        ("images read", report.images_read),
        ("images rejected", len(report.images_rejected)),
    ]:
        table.add_row(k, str(v))
    for k, v in report.stage_seconds.items():
        table.add_row(f"{k} seconds", f"{v:.1f}")
    rate, _ = steady_rate(report.workers)
    if rate == rate:
        table.add_row("steady concepts/min", f"{rate:.1f}")
    Console().print(table)
    for s in report.skipped:
        print(f"  skipped {s.concept_id}: {s.reason}")
    for r in report.images_rejected:
        print(f"  rejected {r.uri}: {r.reason}")


__all__ = [
    "ONBOARD_LEARNER",
    "ONBOARD_WEIGHTS",
    "OnboardConfig",
    "onboard",
    "onboard_learner",
    "onboard_micro_batch",
    "steady_rate",
]
