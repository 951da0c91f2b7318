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
    done = writer.staged_concept_ids()
    attempt = uuid.uuid4().hex[:8]  # note names never collide across restarts
    chunks: list[tuple[float, int]] = []  # (end time, concepts) per chunk: the benchmark's steady rate

    def learn(chunk, note, n: int) -> None:
        # Notes first: a worker that dies between the two writes re-notes on resume (the driver dedups),
        # while a token staged without its note would lose the chunk's rejected images from the report.
        if note["skipped"] or note["rejected"]:
            writer.write_note(f"{attempt}-{n:05d}", note)
        if chunk:
            tokens = learn_tokens(backbone, [c.to_concept_data() for c in chunk], banks, learner)
            thumbs = {c.concept_id: c.thumbnails for c in chunk}
            writer.write_shard(f"c-{chunk[0].concept_id}",
                               [to_record(t, backbone, config["run_id"], thumbs.get(t.concept_id)) for t in tokens])
            chunks.append((time.time(), len(chunk)))

    # One row is one chunk, formed by the driver (`jobs.onboard_data.chunk_rows`): learned as it is.
    n = 0
    for batch in ray.train.get_dataset_shard("concepts").iter_batches(batch_size=1, batch_format="numpy"):
        for encoded in EncodedConcept.chunks_of(batch):
            learn(*triage(encoded, config["min_images"], done), n)
            n += 1
    stats = {"rank": rank, "attempt": attempt, "started": t_start, "finished": time.time(),
             "peak_rss_mb": peak_rss_mb(), "concepts": sum(n for _, n in chunks), "chunks": chunks}
    writer.write_note(f"{attempt}-end", {"skipped": {}, "rejected": [], "worker": stats})
    ray.train.report({"rank": rank, "learned": stats["concepts"], "peak_rss_mb": stats["peak_rss_mb"]})
