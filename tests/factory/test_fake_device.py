"""The factory on a fake GPU (`tests.fakecuda`): every learner mode runs device-clean, with real numbers.

The first GPU run crashed at its first step on a CPU tensor mixed with a GPU one; these tests would have
caught it on a CPU (shown on the old `parametrization.py` in the commit that added them).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from factory.backbones import load_backbone
from factory.learner import ConceptData, LearnerConfig, NegativeBank, learn_tokens, to_record
from factory.losses import LossWeights
from tests.fakecuda import FakeCudaTensor, assert_device_clean, fake_cuda

BOTH = LossWeights(ti=1.0, ce=1.0)


def _concepts(backbone, n=3, shots=4, parent="dress", seed=0):
    g = torch.Generator().manual_seed(seed)
    dim = backbone.encode_prompts(["a"]).features.shape[-1]
    s = backbone.generator.unet.config.sample_size
    concepts = [
        ConceptData(
            f"c{i}",
            parent,
            torch.randn(shots, dim, generator=g),
            torch.randn(shots, backbone.generator.latent_channels, s, s, generator=g),
        )
        for i in range(n)
    ]
    bank = NegativeBank(
        torch.cat([c.image_features for c in concepts]), [c.concept_id for c in concepts for _ in range(shots)]
    )
    return concepts, {parent: bank}


_BACKBONES: dict[str, object] = {}


def _backbone(name: str, precision=None):
    """A fresh copy of a tiny backbone (built once per name: moving to the fake GPU changes the copy only)."""
    if name not in _BACKBONES:
        _BACKBONES[name] = load_backbone(name)
        _BACKBONES[name].fingerprint()  # of the fp32 weights, as `load_backbone` does before a cast
    backbone = copy.deepcopy(_BACKBONES[name])
    return backbone.cast_precision(precision) if precision is not None else backbone


def _on_fake_gpu(name: str, cfg: LearnerConfig, n=3, precision=None, seed=0):
    """(tokens learned on the fake GPU, the recorder, syncs per step, tokens learned on the CPU)."""
    concepts, banks = _concepts(_backbone(name), n, seed=seed)
    cpu = learn_tokens(_backbone(name), concepts, banks, cfg)
    backbone = _backbone(name, precision)
    per_step = []
    with fake_cuda() as rec:
        backbone.to("cuda")
        assert isinstance(backbone.token_embedding.weight, FakeCudaTensor) and backbone.device.type == "cuda"
        tokens = learn_tokens(backbone, concepts, banks, cfg, on_step=lambda *_: per_step.append(len(rec.syncs)))
        records = [to_record(t, backbone, "run") for t in tokens]
    steps = [b - a for a, b in zip(per_step, per_step[1:])]
    assert len(records) == n
    return tokens, rec, steps, cpu


BOTH_CAL = dict(weights=BOTH, calibration_samples=2)  # a smaller calibration: every op runs through Python here
MODES = {
    "projected": LearnerConfig(steps=4, **BOTH_CAL),
    "free": LearnerConfig(steps=4, **BOTH_CAL, parametrization="free"),
    "ti_only": LearnerConfig(steps=4, weights=LossWeights(ti=1.0, ce=0.0)),
    # Concepts that stop at different steps on the concepts of seed 2 (3, 10 and 9 of 10): the path where
    # some are active and the stopped ones stay in the image-side CE as fixed prototypes.
    "image_ce_early_stopping": LearnerConfig(
        steps=10,
        lr=0.3,
        patience=2,
        min_delta=0.2,
        calibration_samples=2,
        weights=LossWeights(ti=1.0, ce=1.0, image_ce=1.0, ti_balance=0.0),
    ),
    "sampled_templates": LearnerConfig(steps=4, **BOTH_CAL, templates_per_step=2),
    "micro_batches": LearnerConfig(steps=4, **BOTH_CAL, ti_micro_batch=2),
    "checkpointing": LearnerConfig(steps=4, **BOTH_CAL, gradient_checkpointing=True, ti_micro_batch=4),
    "norm_bound": LearnerConfig(steps=4, **BOTH_CAL, max_norm_ratio=1.0),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", ["tiny-hf-clip", "tiny-open-clip"])
def test_every_learner_mode_is_device_clean_and_learns_the_cpu_tokens(name, mode):
    cfg = MODES[mode]
    tokens, rec, _, cpu = _on_fake_gpu(name, cfg, seed=2 if mode == "image_ce_early_stopping" else 0)
    assert_device_clean(rec)
    for t, c in zip(tokens, cpu):  # real numbers: the fake GPU computes what the CPU computes
        torch.testing.assert_close(t.vector, c.vector, atol=1e-5, rtol=1e-4)
        assert t.metrics["steps"] == c.metrics["steps"]
    if mode == "image_ce_early_stopping" and name == "tiny-hf-clip":  # the partial-stopping path really ran
        assert len({t.metrics["steps"] for t in tokens}) > 1 and min(t.metrics["steps"] for t in tokens) < cfg.steps


def test_bf16_backbone_is_device_clean_with_an_fp32_text_tower():
    tokens, rec, _, _ = _on_fake_gpu("tiny-hf-clip", MODES["projected"], precision=torch.bfloat16)
    assert_device_clean(rec)
    backbone = _backbone("tiny-hf-clip", torch.bfloat16)
    assert backbone.token_embedding.weight.dtype == torch.float32  # the text tower stays fp32
    assert next(backbone.generator.unet.parameters()).dtype == torch.bfloat16
    assert all(torch.isfinite(t.vector).all() for t in tokens)


@pytest.mark.parametrize("mode", ["projected", "sampled_templates", "micro_batches", "ti_only"])
def test_a_steady_learner_step_makes_at_most_two_host_syncs(mode):
    cfg = dataclasses.replace(MODES[mode], steps=5, patience=0, log_every=0)
    _, rec, steps, _ = _on_fake_gpu("tiny-hf-clip", cfg)
    assert len(steps) == 4
    assert max(steps) <= 2, [str(r) for r in rec.syncs[-max(steps) :]]


def test_auto_micro_batch_resolves_on_the_gpu_only(monkeypatch):
    import factory.memory

    asked = []

    def plan(backbone, config, n_concepts, free_bytes):
        asked.append((n_concepts, free_bytes))
        return 2, False

    monkeypatch.setattr(factory.memory, "auto_ti_micro_batch", plan)
    cfg = LearnerConfig(steps=2, ti_micro_batch="auto", **BOTH_CAL)
    tokens, rec, _, cpu = _on_fake_gpu("tiny-hf-clip", cfg)
    assert_device_clean(rec)
    assert asked == [(3, rec.free_bytes)]  # the CPU run resolved "auto" to one batch without asking
    for t, c in zip(tokens, cpu):
        torch.testing.assert_close(t.vector, c.vector, atol=1e-5, rtol=1e-4)


# ---- the harness itself: each record kind, so a clean report means something -------------------------


def test_the_harness_records_what_a_gpu_would_reject():
    import numpy as np

    with fake_cuda() as rec:
        gpu = torch.ones(3, device="cuda")
        assert gpu.device.type == "cuda" and isinstance(gpu, FakeCudaTensor)
        _ = gpu + torch.ones(3)  # a CPU tensor of one dimension: CUDA raises
        assert [r.kind for r in rec.violations] == ["mixed_device"]
        _ = gpu + torch.tensor(2.0)  # a 0-dim CPU scalar: allowed
        _ = torch.randn(3, device="cuda", generator=torch.Generator())
        assert rec.violations[-1].kind == "cpu_generator"
        assert isinstance(gpu.numpy(), np.ndarray) and rec.violations[-1].kind == "numpy"
        n = len(rec.syncs)
        float(gpu.sum()), gpu.tolist(), torch.nonzero(gpu), gpu[gpu > 0], gpu.cpu()
        assert [r.kind for r in rec.syncs[n:]] == ["item", "tolist", "nonzero", "bool_mask_index", "d2h"]
        n = len(rec.syncs)
        torch.ones(3).pin_memory().to("cuda", non_blocking=True)  # pinned + non-blocking: no sync
        torch.ones(3).to("cuda")
        assert [r.kind for r in rec.syncs[n:]] == ["h2d_blocking"]
    assert len(rec.violations) == 3


def test_the_harness_catches_a_cpu_basis_beside_a_gpu_init():
    """The crash of the first GPU run, as the old `TokenParameters` wrote it."""
    with fake_cuda() as rec:
        init = torch.randn(2, 8, device="cuda")
        bases = torch.zeros(2, 8, 3)  # on the CPU
        torch.einsum("cdk,cd->ck", bases, init)
    assert [r.kind for r in rec.violations] == ["mixed_device"]


def test_gradients_flow_back_through_a_move_to_the_fake_gpu():
    x = torch.randn(4, requires_grad=True)
    with fake_cuda() as rec:
        (x.to("cuda") * 3).sum().backward()
    assert_device_clean(rec)
    torch.testing.assert_close(x.grad, torch.full((4,), 3.0))


# ---- the jobs' device code: a Train worker's body and the Data stage's encoders -----------------------


def test_the_train_worker_body_is_device_clean():
    """What `jobs.onboard_train.learn_stream` runs per chunk, on a worker's GPU: its backbone in bf16 with
    only the text tower and UNet moved, concepts as Ray Data hands them over (NumPy), records out."""
    import numpy as np

    from jobs.onboard_data import EncodedConcept
    from jobs.onboard_train import learn_chunk, worker_backbone

    concepts, banks = _concepts(_backbone("tiny-hf-clip"), n=2)
    encoded = [EncodedConcept(c.concept_id, c.parent, c.image_features.numpy(), c.latents.numpy()) for c in concepts]
    with fake_cuda() as rec:
        backbone = worker_backbone("tiny-hf-clip", None, "bf16", torch.device("cuda", 0))
        assert backbone.device.type == "cuda"
        assert next(backbone.image_tower()[0].parameters()).device.type == "cpu"  # not moved
        records = learn_chunk(backbone, encoded, banks, LearnerConfig(steps=3, **BOTH_CAL), "run")
    assert_device_clean(rec)
    assert [r.concept_id for r in records] == ["c0", "c1"]
    assert all(np.isfinite(r.vector).all() for r in records)


@pytest.mark.parametrize("name", ["tiny-hf-clip", "tiny-open-clip"])
def test_the_encoders_are_device_clean_and_encode_what_the_cpu_encodes(name):
    import numpy as np

    from factory.concepts import encode_images, to_encoding_device

    images = np.random.default_rng(0).integers(0, 256, (5, 40, 40, 3), dtype=np.uint8)
    cpu_feats, cpu_lats = encode_images(_backbone(name), images)
    backbone = _backbone(name)
    with fake_cuda() as rec:
        to_encoding_device(backbone, "cuda")
        feats, lats = encode_images(backbone, images, max_batch=2)
    assert_device_clean(rec)
    assert feats.device.type == "cpu" and not isinstance(feats, FakeCudaTensor)
    torch.testing.assert_close(feats, cpu_feats, atol=1e-4, rtol=1e-4)
    if cpu_lats is not None:
        torch.testing.assert_close(lats, cpu_lats, atol=1e-4, rtol=1e-4)
