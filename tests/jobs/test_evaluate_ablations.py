"""The evaluation's ablations as parallel Ray tasks learn the tokens the in-process learner learns."""

import pytest
import torch

from factory.backbones import load_backbone
from factory.evaluation.harness import learn_ablations_here
from factory.learner import ConceptData, LearnerConfig
from factory.losses import LossWeights
from factory.onboarding import chunks_by_parent


def _concepts(backbone, n=3, shots=2):
    g = torch.Generator().manual_seed(0)
    dim = backbone.encode_prompts(["a"]).features.shape[-1]
    s = backbone.generator.unet.config.sample_size
    return [
        ConceptData(
            f"c{i}",
            "dress",
            torch.randn(shots, dim, generator=g),
            torch.randn(shots, backbone.generator.latent_channels, s, s, generator=g),
        )
        for i in range(n)
    ]


@pytest.mark.ray
def test_ray_tasks_learn_the_in_process_tokens(ray_cluster):
    from jobs.evaluate_ablations import ray_ablations

    backbone = load_backbone("tiny-hf-clip")
    data = _concepts(backbone)
    base = LearnerConfig(steps=3, weights=LossWeights(ti=1.0, ce=1.0), log_every=0)
    methods = ["ti", "ce_free"]
    chunks = chunks_by_parent(data, 2)
    pending = ray_ablations("tiny-hf-clip")(chunks, base, methods)  # submitted: the caller goes on meanwhile
    here = learn_ablations_here(backbone)(chunks, base, methods)()
    on_ray = pending()
    assert set(on_ray) == set(methods)
    for m in methods:
        tokens, seconds = on_ray[m]
        assert seconds > 0 and set(tokens) == {"c0", "c1", "c2"}
        for cid, v in tokens.items():
            torch.testing.assert_close(v, here[m][0][cid], atol=1e-4, rtol=1e-3)
