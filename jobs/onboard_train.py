"""The Ray Train stage of onboarding: N workers, each learning its shard of concepts C at a time.

Workers are independent (no gradient all-reduce): they share the frozen backbone (loaded once per
worker) and the negative banks, not parameters. Each worker takes its slice of the concepts (see
`shard_of`), skips those already staged in the registry for this run id (a restarted worker or a
restarted job resumes, and nothing is learned twice), and stages its tokens after every chunk.
"""
from __future__ import annotations


def shard_of(records: list, rank: int, world: int) -> list:
    """A worker's contiguous slice of the concepts sorted by (parent, id): concepts of one parent stay on
    one worker where possible, so the image-side CE can compare them. Deterministic, so a restarted
    worker gets the same shard back."""
    ordered = sorted(records, key=lambda r: (r.parent, r.concept_id))
    n = len(ordered)
    return ordered[rank * n // world: (rank + 1) * n // world]


def learn_shard(config: dict) -> None:
    """Ray Train worker body. ``config`` holds plain settings plus object refs to concepts and banks."""
    import ray
    import ray.train
    import torch

    from factory.backbones import PRECISIONS, load_backbone
    from factory.learner import LearnerConfig, to_record
    from factory.onboarding import learn_in_chunks
    from factory.registry import TokenRegistry

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads"])))
    s3 = config["s3"]
    backbone = load_backbone(config["backbone"], s3=s3, dtype=PRECISIONS[config["precision"]])
    if config["use_gpu"]:
        backbone.to_training_device("cuda")  # features and latents are precomputed: no image tower, no VAE
    writer = TokenRegistry(config["registry"], s3).begin(config["run_id"], backbone.name, backbone.fingerprint(),
                                                         config["job_config"])
    done = writer.staged_concept_ids()
    records = shard_of(ray.get(config["concepts"]), rank, world)
    todo = [r.to_concept_data() for r in records if r.concept_id not in done]
    banks = ray.get(config["banks"])
    learner = LearnerConfig(**config["learner"])
    thumbs = {r.concept_id: r.thumbnails for r in records}

    def stage(tokens):
        # Shard names are unique per chunk (concept ids are), so a retried chunk overwrites itself.
        writer.write_shard(f"c-{tokens[0].concept_id}",
                           [to_record(t, backbone, config["run_id"], thumbs.get(t.concept_id)) for t in tokens])

    learn_in_chunks(backbone, todo, banks, learner, config["concepts_per_step"], on_chunk=stage)
    ray.train.report({"rank": rank, "learned": len(todo), "skipped_already_staged": len(records) - len(todo)})

