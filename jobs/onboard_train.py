"""The Ray Train stage of onboarding: N workers learn the concepts Ray Data streams to them, C at a time.

Workers are independent (no gradient all-reduce): each loads the frozen backbone once and shares the
negative banks (a bounded sample per parent, see `jobs.onboard_data.bank_sample`), not parameters.
Each worker iterates its split of the encoded-concept stream, so no process ever holds the catalog:
a worker holds its backbone, the banks and one chunk. Concepts already staged for this run id are
skipped (a restarted worker or job resumes, and nothing is learned twice); tokens are staged after
every chunk, with a note of that chunk's skipped concepts and rejected images for the run report.
"""
from __future__ import annotations

import resource
import sys
import time
import uuid


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


class ChunkBuffer:
    """Collects streamed concepts into chunks of C, setting aside those with too few usable images."""

    def __init__(self, size: int, min_images: int, done: set[str]):
        self.size, self.min_images, self.done = size, min_images, done
        self.pending, self.skipped, self.rejected = [], {}, []

    def add(self, concept) -> None:
        from factory.onboarding import skip_reason

        if concept.concept_id in self.done:
            return
        self.rejected.extend(concept.rejected)
        reason = skip_reason(len(concept.features), self.min_images)
        if reason:
            self.skipped[concept.concept_id] = reason
        else:
            self.pending.append(concept)

    def take(self, final: bool = False) -> list:
        """The next full chunk (or, with ``final``, whatever is left); [] when there is none."""
        if len(self.pending) < self.size and not (final and self.pending):
            return []
        chunk, self.pending = self.pending[: self.size], self.pending[self.size:]
        return chunk

    def notes(self) -> dict:
        """Skipped concepts and rejected images since the last call (then forgotten)."""
        out = {"skipped": self.skipped, "rejected": self.rejected}
        self.skipped, self.rejected = {}, []
        return out


def learn_stream(config: dict) -> None:
    """Ray Train worker body. ``config`` holds plain settings plus an object ref to the banks; the
    concepts arrive as the "concepts" dataset shard."""
    import ray
    import ray.train
    import torch

    from factory.backbones import PRECISIONS, load_backbone
    from factory.learner import LearnerConfig, learn_tokens, to_record
    from factory.registry import TokenRegistry
    from jobs.onboard_data import EncodedConcept

    t_start = time.time()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.set_num_threads(max(1, int(config["threads"])))
    s3 = config["s3"]
    backbone = load_backbone(config["backbone"], s3=s3, dtype=PRECISIONS[config["precision"]])
    if config["use_gpu"]:
        backbone.to_training_device("cuda")  # features and latents are precomputed: no image tower, no VAE
    writer = TokenRegistry(config["registry"], s3).begin(config["run_id"], backbone.name, backbone.fingerprint(),
                                                         config["job_config"])
    banks = ray.get(config["banks"])
    learner = LearnerConfig(**config["learner"])
    buffer = ChunkBuffer(config["concepts_per_step"], config["min_images"], writer.staged_concept_ids())
    attempt = uuid.uuid4().hex[:8]  # note names never collide across restarts
    chunks: list[tuple[float, int]] = []  # (end time, concepts) per chunk: the benchmark's steady rate

    def learn(chunk) -> None:
        tokens = learn_tokens(backbone, [c.to_concept_data() for c in chunk], banks, learner)
        thumbs = {c.concept_id: c.thumbnails for c in chunk}
        # Notes first: a worker that dies between the two writes re-notes on resume (the driver dedups),
        # while a token staged without its note would lose the chunk's rejected images from the report.
        writer.write_note(f"{attempt}-{len(chunks):05d}", buffer.notes())
        writer.write_shard(f"c-{chunk[0].concept_id}",
                           [to_record(t, backbone, config["run_id"], thumbs.get(t.concept_id)) for t in tokens])
        chunks.append((time.time(), len(chunk)))

    shard = ray.train.get_dataset_shard("concepts")
    for batch in shard.iter_batches(batch_size=config["concepts_per_step"], batch_format="numpy"):
        for concept in EncodedConcept.rows_of(batch):
            buffer.add(concept)
        while chunk := buffer.take():
            learn(chunk)
    while chunk := buffer.take(final=True):
        learn(chunk)
    notes = buffer.notes()
    stats = {"rank": rank, "attempt": attempt, "started": t_start, "finished": time.time(),
             "peak_rss_mb": peak_rss_mb(), "concepts": sum(n for _, n in chunks), "chunks": chunks}
    writer.write_note(f"{attempt}-end", {**notes, "worker": stats})
    ray.train.report({"rank": rank, "learned": stats["concepts"], "peak_rss_mb": stats["peak_rss_mb"]})
