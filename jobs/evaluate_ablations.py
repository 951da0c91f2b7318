"""The evaluation's ablation tokens learned in parallel: one Ray task per (ablation, chunk of concepts).

`factory.evaluation.harness.evaluate` learns five ablations (TI only, CE only, free tokens…) with the
registry run's settings; one after another they were most of an evaluation's time. Each ablation is a
loop over chunks of C concepts (one learner call each, `factory.evaluation.methods.learn_ablation_chunk`),
and no chunk depends on another, so the unit of work is a chunk: 30 concepts at C = 6 are 5 tasks per
ablation, not one. With one task per ablation, 30 products took 926 s of wall time for 1,406 s of task
time on 2 cores: three TI ablations of ~410 s each cannot be split evenly over two slots; chunks can.

The tasks are submitted at once, longest first (the caller orders the ablations: TI before CE), and
waited for later, so the evaluation's GAIR stage runs while they learn. A task loads the backbone from its
config (a model travels as its config, not as pickled weights) once per worker process, and learns on
``threads`` torch threads: on a 2-core node two run at once.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any, Sequence

import ray
import torch

from factory.backbones import Backbone
from factory.device import PRECISIONS, pick_device
from factory.errors import DeviceError
from factory.evaluation.harness import AblationLearner
from factory.learner import ConceptData, LearnerConfig, NegativeBank
from factory.storage import S3Options
from jobs._ray import connect

_MODELS: dict[str, Backbone] = {}  # per worker process: every task it runs shares one loaded backbone


def _model(
    backbone: str | dict[str, Any],
    weights: str | None,
    s3: S3Options | None,
    use_gpu: bool = False,
    precision: str = "fp32",
) -> Backbone:
    """The worker's backbone: on the GPU Ray gave the task (it sets CUDA_VISIBLE_DEVICES, so the
    current device is that one) when ``use_gpu``, in ``precision``."""
    from factory.backbones import load_backbone

    key = json.dumps([backbone, weights, use_gpu, precision], sort_keys=True, default=str)
    if key not in _MODELS:
        _MODELS[key] = load_backbone(
            backbone, weights=weights, s3=s3, device=pick_device(use_gpu), dtype=PRECISIONS[precision]
        )
    return _MODELS[key]


@ray.remote(max_retries=1)
def _learn_chunk(
    backbone: str | dict[str, Any],
    weights: str | None,
    s3: S3Options | None,
    shared: tuple[list[ConceptData], dict[str, NegativeBank]],
    chunk_ids: list[str],
    base: LearnerConfig,
    method: str,
    threads: int,
    use_gpu: bool = False,
    precision: str = "fp32",
) -> tuple[dict[str, torch.Tensor], float]:
    from factory.evaluation.methods import learn_ablation_chunk

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = _model(backbone, weights, s3, use_gpu, precision)
    data, banks = shared
    by_id = {d.concept_id: d for d in data}
    chunk = [by_id[c] for c in chunk_ids]
    return learn_ablation_chunk(model, chunk, banks, base, method), time.perf_counter() - t0


def ray_ablations(
    backbone: str | dict[str, Any],
    weights: str | None = None,
    s3: S3Options | None = None,
    threads: int = 1,
    gpus: float = 0.0,
    precision: str = "fp32",
) -> AblationLearner:
    """An `AblationLearner` that runs each (ablation, chunk) as a Ray task of ``threads`` CPUs (and torch
    threads) and, with ``gpus`` > 0, that share of a GPU, on which it learns; an ablation's seconds are
    the sum of its chunks' task times. ``precision``: of the tasks' frozen models.

    A GPU share, not a whole GPU: a chunk's learner leaves most of an H200 idle, and the evaluating process
    computes GAIR's previews on a GPU beside the tasks (outside Ray's accounting), so on a one-GPU node
    whole-GPU tasks would run one at a time. A cluster without GPUs is refused at once, since Ray would
    otherwise wait for them forever.

    ``backbone`` is what `factory.backbones.load_backbone` takes (a name or a resolved config dict). Joins
    the cluster at RAY_ADDRESS, else starts a local one. The tokens are those of the in-process learner:
    the same chunks against the same negative banks, and each concept's samples come from its own seed,
    whatever process learns it.
    """

    def start(chunks: Sequence[Sequence[ConceptData]], base: LearnerConfig, methods: Sequence[str]):
        connect()
        if gpus > 0 and not ray.cluster_resources().get("GPU"):
            raise DeviceError(
                "the ablation tasks were asked to learn on GPUs (--use-gpu --ray-ablations) but the "
                "Ray cluster has none: join a cluster with GPU nodes (RAY_ADDRESS), or drop "
                "--ray-ablations to learn them on this process's GPU"
            )
        from factory.concepts import negative_banks

        data = [c for chunk in chunks for c in chunk]
        # The concepts and their negative banks, formed once and put in the object store once, read by every task.
        shared = ray.put((data, negative_banks(data)))
        ids_per_chunk = [[c.concept_id for c in chunk] for chunk in chunks]
        # Submitted now, in the caller's order (the scheduler starts them in that order as CPUs free up);
        # the caller goes on with other work and waits later.
        refs = [
            (
                m,
                _learn_chunk.options(num_cpus=threads, num_gpus=gpus, name=f"ablation-{m}-{i}").remote(
                    backbone, weights, s3, shared, ids, base, m, threads, gpus > 0, precision
                ),
            )
            for m in methods
            for i, ids in enumerate(ids_per_chunk)
        ]

        def wait() -> dict[str, tuple[dict[str, torch.Tensor], float]]:
            tokens: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
            seconds: dict[str, float] = defaultdict(float)
            for (m, _), (learned, secs) in zip(refs, ray.get([r for _, r in refs])):
                tokens[m].update(learned)
                seconds[m] += secs
            return {m: (tokens[m], seconds[m]) for m in methods}

        return wait

    return start


__all__ = ["ray_ablations"]
