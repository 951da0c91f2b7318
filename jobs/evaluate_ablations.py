"""The evaluation's ablation tokens learned in parallel: one Ray task per ablation.

`factory.evaluation.harness.evaluate` learns five ablations (TI only, CE only, free tokens…) with the
registry run's settings; one after another they were most of an evaluation's time. Each is independent of
the others, so each becomes a Ray task that loads the backbone itself (a model travels as its config, not
as pickled weights) and learns on ``threads`` torch threads: on a 2-core node two run at once.
"""
from __future__ import annotations

import os
import time
from typing import Any, Sequence

import ray
import torch

from factory.evaluation.harness import AblationLearner
from factory.learner import ConceptData, LearnerConfig
from factory.storage import S3Options


@ray.remote(max_retries=1)
def _learn_one(backbone: str | dict[str, Any], weights: str | None, s3: S3Options | None,
               data: list[ConceptData], base: LearnerConfig, method: str, concepts_per_step: int,
               threads: int) -> tuple[dict[str, torch.Tensor], float]:
    from factory.backbones import load_backbone
    from factory.evaluation.methods import learn_ablation

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = load_backbone(backbone, weights=weights, s3=s3)
    return learn_ablation(model, data, base, method, concepts_per_step), time.perf_counter() - t0


def ray_ablations(backbone: str | dict[str, Any], weights: str | None = None, s3: S3Options | None = None,
                  threads: int = 1) -> AblationLearner:
    """An `AblationLearner` that runs each ablation as a Ray task of ``threads`` CPUs (and torch threads).

    ``backbone`` is what `factory.backbones.load_backbone` takes (a name or a resolved config dict). Joins
    the cluster at RAY_ADDRESS, else starts a local one. The tokens are those of the in-process learner:
    each concept's samples come from its own seed, whatever process learns it.
    """
    def learn(data: Sequence[ConceptData], base: LearnerConfig, methods: Sequence[str], concepts_per_step: int):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level="WARNING")
        shared = ray.put(list(data))  # once in the object store, read by every task
        refs = {m: _learn_one.options(num_cpus=threads, name=f"ablation-{m}").remote(
            backbone, weights, s3, shared, base, m, concepts_per_step, threads) for m in methods}
        return dict(zip(refs, ray.get(list(refs.values()))))
    return learn


__all__ = ["ray_ablations"]
