"""The Ray Train stage of onboarding: N workers learn the concepts Ray Data streams to them, C at a time.

Workers are independent (no gradient all-reduce): each loads the frozen backbone once and shares the
negative banks (a bounded sample per parent, see `jobs.onboard_data.bank_sample`), not parameters.
Each worker iterates its split of the encoded-chunk stream, so no process ever holds the catalog:
a worker holds its backbone, the banks and one chunk. Concepts already staged for this run id are
skipped (a restarted worker or job resumes, and nothing is learned twice); tokens are staged after
every chunk, with a note of that chunk's skipped concepts and rejected images for the run report.
"""

from __future__ import annotations

import resource
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from factory.learner_config import LearnerConfig
from factory.storage import S3Options

# Ray Train's ``train_loop_config`` must be a dict: it holds the one typed `WorkerConfig` under this key.
WORKER_KEY = "worker"


@dataclass(frozen=True)
class WorkerConfig:
    """What an onboarding Train worker needs, typed and picklable: built once by the driver
    (`jobs.onboard._train`) and carried across Ray as ``{"worker": WorkerConfig}``, so a misspelt setting
    fails on the driver, not as a KeyError on a worker halfway through a run."""

    run_id: str
    registry: str  # token registry root URI (absolute: workers run elsewhere)
    backbone: dict[str, Any]  # the resolved backbone config, as plain data
    precision: str  # of the frozen models (tokens stay fp32)
    learner: LearnerConfig
    job_config: dict[str, Any]  # what the version records (`OnboardConfig.record` + run id + backbone)
    min_images: int
    threads: int  # torch threads of the worker
    use_gpu: bool
    banks: Any  # a Ray object ref to the negative banks (parent -> NegativeBank), put once by the driver
    s3: S3Options | None = field(default=None, repr=False)  # may hold keys: never printed

    def train_loop_config(self) -> dict[str, "WorkerConfig"]:
        return {WORKER_KEY: self}

    @classmethod
    def of(cls, train_loop_config: dict) -> "WorkerConfig":
        """The worker config inside Ray Train's ``train_loop_config`` (`train_loop_config`)."""
        worker = train_loop_config.get(WORKER_KEY)
        if not isinstance(worker, cls):
            raise TypeError(
                f"train_loop_config must be {{{WORKER_KEY!r}: WorkerConfig}}, got keys {sorted(train_loop_config)}"
            )
        return worker


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def triage(chunk, min_images: int, done: set[str]) -> tuple[list, dict]:
    """(the concepts of a chunk to learn, its note). Concepts staged by an earlier attempt are dropped;
    those with too few usable images are noted as skipped; every rejected image is noted."""
    from factory.onboarding import skip_reason

    learn, note = [], {"skipped": {}, "rejected": []}
    for concept in chunk:
        if concept.concept_id in done:
            continue
        note["rejected"].extend(concept.rejected)
        reason = skip_reason(len(concept.features), min_images)
        if reason:
            note["skipped"][concept.concept_id] = reason
        else:
            learn.append(concept)
    return learn, note


def worker_device(use_gpu: bool):
    """This Train worker's device: the GPU Ray Train assigned it (``ray.train.torch.get_device()``, said
    explicitly rather than a bare "cuda" that is right only because Ray sets the current device around
    the loop), or the CPU without --use-gpu. See `jobs.onboard_data.actor_device` for a GPU torch cannot see."""
    import torch

    from jobs.onboard_data import actor_device, gpu_stand_in

    if not use_gpu:
        return torch.device("cpu")
    from ray.train.torch import get_device

    # Ray names a cuda device from the GPU ids it gave, whether or not torch can reach it.
    assigned = get_device()
    seen = assigned.type == "cuda" and torch.cuda.is_available()
    return actor_device(True, assigned if seen else None, gpu_stand_in())


def worker_backbone(spec, s3, precision: str, device):
    """A Train worker's frozen backbone: loaded in ``precision`` (the text tower stays fp32), and on a GPU
    only what learning runs through (text tower, UNet): features and latents are precomputed."""
    from factory.backbones import PRECISIONS, load_backbone
    from factory.device import configure_cuda_math

    backbone = load_backbone(spec, s3=s3, dtype=PRECISIONS[precision])
    if device.type == "cuda":
        configure_cuda_math()
        backbone.to_training_device(device)
    return backbone


def learn_chunk(backbone, chunk, banks, learner, run_id: str) -> list:
    """The registry records (`schemas.TokenRecord`) of one chunk of encoded concepts, learned together."""
    from factory.learner import learn_tokens, to_record

    tokens = learn_tokens(backbone, [c.to_concept_data() for c in chunk], banks, learner)
    thumbs = {c.concept_id: c.thumbnails for c in chunk}
    return [to_record(t, backbone, run_id, thumbs.get(t.concept_id)) for t in tokens]


def learn_stream(config: dict) -> None:
    """Ray Train worker body. ``config`` is ``{"worker": WorkerConfig}`` (`WorkerConfig.of`); the concepts
    arrive as the "concepts" dataset shard."""
    import ray
    import ray.train
    import torch

    from factory.registry import TokenRegistry
    from jobs.onboard_data import EncodedConcept

    t_start = time.time()
    cfg = WorkerConfig.of(config)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(max(1, int(cfg.threads)))
    device = worker_device(cfg.use_gpu)
    backbone = worker_backbone(cfg.backbone, cfg.s3, cfg.precision, device)
    writer = TokenRegistry(cfg.registry, cfg.s3).begin(
        cfg.run_id, backbone.name, backbone.fingerprint(), cfg.job_config
    )
    banks = ray.get(cfg.banks)
    learner = cfg.learner
    done = writer.staged_concept_ids()
    attempt = uuid.uuid4().hex[:8]  # note names never collide across restarts
    chunks: list[tuple[float, int]] = []  # (end time, concepts) per chunk: the benchmark's steady rate

    def learn(chunk, note, n: int) -> None:
        # Notes first: a worker that dies between the two writes re-notes on resume (the driver dedups),
        # while a token staged without its note would lose the chunk's rejected images from the report.
        if note["skipped"] or note["rejected"]:
            writer.write_note(f"{attempt}-{n:05d}", note)
        if chunk:
            writer.write_shard(f"c-{chunk[0].concept_id}", learn_chunk(backbone, chunk, banks, learner, cfg.run_id))
            chunks.append((time.time(), len(chunk)))

    # One row is one chunk, formed by the driver (`jobs.onboard_data.chunk_rows`): learned as it is.
    n = 0
    for batch in ray.train.get_dataset_shard("concepts").iter_batches(batch_size=1, batch_format="numpy"):
        for encoded in EncodedConcept.chunks_of(batch):
            learn(*triage(encoded, cfg.min_images, done), n)
            n += 1
    stats = {
        "rank": rank,
        "attempt": attempt,
        "started": t_start,
        "finished": time.time(),
        "peak_rss_mb": peak_rss_mb(),
        "concepts": sum(n for _, n in chunks),
        "chunks": chunks,
        "device": str(device),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
    }
    writer.write_note(f"{attempt}-end", {"skipped": {}, "rejected": [], "worker": stats})
    ray.train.report({"rank": rank, "learned": stats["concepts"], "peak_rss_mb": stats["peak_rss_mb"]})
