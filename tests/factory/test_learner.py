"""The multi-concept learner on tiny random models with synthetic, separable image features."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from factory.errors import EmptyImageSet, NonFiniteLoss
from factory.learner import ConceptData, LearnerConfig, NegativeBank, learn_tokens, to_record
from factory.losses import LossWeights


def _world(backbone, n_concepts=4, shots=6, heldout=6, seed=0, latents=False):
    """Concepts of one parent whose image features cluster around distinct random centres."""
    g = torch.Generator().manual_seed(seed)
    # Centres the text encoder can reach: text features of prompts holding random hidden tokens, so a
    # token that separates the concepts exists (a random tiny encoder cannot reach every direction).
    scale = backbone.vocab_mean_norm / backbone.token_dim**0.5
    hidden = {f"h{i}": scale * torch.randn(backbone.token_dim, generator=g) for i in range(n_concepts)}
    with torch.no_grad():
        centres = F.normalize(
            backbone.encode_prompts([f"a photo of a <concept:h{i}> dress" for i in range(n_concepts)], hidden).features,
            dim=-1,
        )
    dim = centres.shape[-1]
    spread = 0.3 * torch.pdist(centres).min()  # noise well below the distance between concepts
    concepts, held = [], []
    for i in range(n_concepts):
        feats = F.normalize(centres[i] + spread * torch.randn(shots + heldout, dim, generator=g) / dim**0.5, dim=-1)
        lat = None
        if latents:
            gen = backbone.generator
            s = gen.unet.config.sample_size
            lat = torch.randn(shots, gen.latent_channels, s, s, generator=g)
        concepts.append(ConceptData(f"c{i}", "dress", feats[:shots], lat))
        held.append(feats[shots:])
    bank = NegativeBank(
        torch.cat([c.image_features for c in concepts]), [c.concept_id for c in concepts for _ in range(shots)]
    )
    return concepts, held, {"dress": bank}


def _accuracy(backbone, prompts_per_concept, tokens, held):
    with torch.no_grad():
        text = F.normalize(
            torch.stack(
                [
                    F.normalize(backbone.encode_prompts(ps, tokens).features, dim=-1).mean(0)
                    for ps in prompts_per_concept
                ]
            ),
            dim=-1,
        )
    hits = [(F.normalize(h, dim=-1) @ text.T).argmax(1).eq(i).float() for i, h in enumerate(held)]
    return float(torch.cat(hits).mean())


CE_ONLY = LossWeights(ti=0.0, ce=1.0)


@pytest.mark.parametrize("parametrization", ["projected", "free"])
def test_learned_tokens_beat_the_parent_word_on_heldout_features(backbone, parametrization):
    concepts, held, banks = _world(backbone)
    # Text-side CE alone ranks a token's own images above other concepts' images, but does not calibrate
    # tokens against each other: on this random encoder (all text features share one dominant direction)
    # it classifies at chance. The image-side joint CE adds that calibration.
    cfg = LearnerConfig(
        steps=150, lr=0.05, weights=LossWeights(ti=0.0, ce=1.0, image_ce=1.0), parametrization=parametrization
    )
    learned = learn_tokens(backbone, concepts, banks, cfg)
    tokens = {t.concept_id: t.vector for t in learned}
    tpl = cfg.templates
    token_acc = _accuracy(
        backbone,
        [[t.format(concept=f"<concept:{c.concept_id}>", parent="dress") for t in tpl] for c in concepts],
        tokens,
        held,
    )
    parent_acc = _accuracy(backbone, [[t.format(concept="", parent="dress") for t in tpl] for _ in concepts], {}, held)
    assert parent_acc <= 0.25 + 1e-6  # identical prompts: every image goes to the first concept
    assert token_acc >= 0.75, token_acc
    assert all(t.metrics["train_acc"] > 0.5 for t in learned)


def test_projected_tokens_stay_in_their_subspace(hf_backbone):
    from factory.learner import subspaces_for
    from factory.tokens import add_vocabulary

    add_vocabulary({"name": "tiny-dress", "parents": [], "attributes": {"c": ["red", "blue", "green", "striped"]}})
    concepts, _, banks = _world(hf_backbone, n_concepts=2)
    cfg = LearnerConfig(steps=30, lr=0.05, weights=CE_ONLY, vocabulary="tiny-dress")
    learned = learn_tokens(hf_backbone, concepts, banks, cfg)
    space = subspaces_for(hf_backbone, ["dress"], "tiny-dress")["dress"]
    assert space.rank == 5 and learned[0].metrics["rank"] == 5
    for t in learned:
        assert t.metrics["cos_to_init"] < 0.9999  # it moved
        torch.testing.assert_close(space.project(t.vector), t.vector, atol=1e-5, rtol=1e-4)
        assert len(t.coefficients) == 5 and t.basis_id == space.basis_id


def test_only_token_parameters_change(hf_backbone):
    before = {k: v.clone() for k, v in hf_backbone.state_dict().items()}
    concepts, _, banks = _world(hf_backbone, n_concepts=2, latents=True)
    learn_tokens(hf_backbone, concepts, banks, LearnerConfig(steps=3, weights=LossWeights(ti=1.0, ce=1.0, reg=0.1)))
    after = hf_backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in hf_backbone.parameters())


def test_learning_together_equals_learning_one_by_one(backbone):
    concepts, _, banks = _world(backbone, n_concepts=3, latents=True)
    cfg = LearnerConfig(steps=8, lr=0.02, weights=LossWeights(ti=1.0, ce=1.0), ti_samples=2, seed=7)
    together = learn_tokens(backbone, concepts, banks, cfg)
    for i, c in enumerate(concepts):
        alone = learn_tokens(backbone, [c], banks, cfg)[0]
        torch.testing.assert_close(alone.vector, together[i].vector, atol=1e-4, rtol=1e-3)
        assert alone.metrics["loss_ti"] == pytest.approx(together[i].metrics["loss_ti"], rel=1e-3, abs=1e-5)


def test_same_seed_same_tokens(hf_backbone):
    concepts, _, banks = _world(hf_backbone, n_concepts=2, latents=True)
    cfg = LearnerConfig(steps=5, seed=3)
    a = learn_tokens(hf_backbone, concepts, banks, cfg)
    b = learn_tokens(hf_backbone, concepts, banks, cfg)
    assert all(torch.equal(x.vector, y.vector) for x, y in zip(a, b))


def test_disabled_ti_term_never_runs_the_unet(hf_backbone, monkeypatch):
    calls = []
    unet = hf_backbone.generator.unet
    original = unet.forward
    monkeypatch.setattr(unet, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    concepts, _, banks = _world(hf_backbone, n_concepts=2, latents=True)
    learn_tokens(hf_backbone, concepts, banks, LearnerConfig(steps=2, weights=LossWeights(ti=0.0, ce=1.0)))
    assert calls == []
    learn_tokens(hf_backbone, concepts, banks, LearnerConfig(steps=2, weights=LossWeights(ti=1.0, ce=0.0)))
    assert len(calls) == 2


def test_early_stopping_freezes_converged_concepts(hf_backbone):
    concepts, _, banks = _world(hf_backbone, n_concepts=2)
    cfg = LearnerConfig(steps=400, lr=0.05, weights=CE_ONLY, patience=5, min_delta=1e-3)
    learned = learn_tokens(hf_backbone, concepts, banks, cfg)
    assert all(t.metrics["steps"] < 400 for t in learned)


def test_metrics_report_norms_against_the_vocabulary(hf_backbone):
    concepts, _, banks = _world(hf_backbone, n_concepts=2)
    t = learn_tokens(hf_backbone, concepts, banks, LearnerConfig(steps=2, weights=CE_ONLY))[0]
    assert t.metrics["vocab_mean_norm"] == pytest.approx(hf_backbone.vocab_mean_norm)
    assert t.metrics["norm_ratio"] == pytest.approx(t.metrics["token_norm"] / t.metrics["vocab_mean_norm"])
    for key in ("loss", "loss_ce", "train_acc", "cos_to_init", "steps"):
        assert key in t.metrics
    record = to_record(t, hf_backbone, run_id="r1")
    assert record.dim == hf_backbone.token_dim and record.backbone_fingerprint == hf_backbone.fingerprint()


def test_empty_image_set_is_a_named_error(hf_backbone):
    empty = ConceptData("c0", "dress", torch.zeros(0, 32))
    with pytest.raises(EmptyImageSet, match="c0"):
        learn_tokens(hf_backbone, [empty], {}, LearnerConfig(steps=1, weights=CE_ONLY))


def test_nan_loss_is_a_named_error(hf_backbone):
    concepts, _, banks = _world(hf_backbone, n_concepts=2)
    concepts[1].image_features = concepts[1].image_features.clone()
    concepts[1].image_features[0, 0] = float("nan")
    with pytest.raises(NonFiniteLoss, match="c1"):
        learn_tokens(hf_backbone, concepts, banks, LearnerConfig(steps=1, weights=CE_ONLY))


def test_wrong_feature_dimension_is_a_named_error(hf_backbone):
    from factory.errors import DimensionMismatch

    with pytest.raises(DimensionMismatch, match="encode with this backbone"):
        learn_tokens(
            hf_backbone, [ConceptData("c0", "dress", torch.randn(3, 7))], {}, LearnerConfig(steps=1, weights=CE_ONLY)
        )


def _vectors(backbone, concepts, banks, **config):
    config = {"weights": LossWeights(ti=10.0, ce=1.0, image_ce=1.0), **config}
    cfg = LearnerConfig(steps=6, ti_samples=3, log_every=0, **config)
    return torch.stack([t.vector for t in learn_tokens(backbone, concepts, banks, cfg)])


@pytest.mark.parametrize("micro", [1, 4])
def test_ti_micro_batches_learn_the_same_tokens(backbone, micro):
    # The objective is a sum over concepts and samples: accumulating its gradient micro-batch by
    # micro-batch at the text states must give the token that one big UNet batch gives.
    concepts, _, banks = _world(backbone, n_concepts=3, shots=3, heldout=0, latents=True)
    whole = _vectors(backbone, concepts, banks)
    split = _vectors(backbone, concepts, banks, ti_micro_batch=micro)
    assert not torch.equal(whole, _vectors(backbone, concepts, banks, weights=LossWeights(ti=0.0)))  # TI mattered
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-5)


def test_unet_gradient_checkpointing_learns_the_same_tokens(backbone):
    concepts, _, banks = _world(backbone, n_concepts=2, shots=3, heldout=0, latents=True)
    torch.testing.assert_close(
        _vectors(backbone, concepts, banks, gradient_checkpointing=True),
        _vectors(backbone, concepts, banks),
        atol=1e-6,
        rtol=1e-5,
    )
    assert not backbone.generator.unet.is_gradient_checkpointing  # switched back off after learning


def test_bf16_backbone_learns_close_to_fp32(backbone):
    from factory.backbones import load_backbone

    concepts, _, banks = _world(backbone, n_concepts=2, shots=3, heldout=0, latents=True)
    half = load_backbone(backbone.name, dtype=torch.bfloat16)
    assert half.fingerprint() == backbone.fingerprint()  # tokens learned in bf16 serve on the fp32 weights
    got, want = _vectors(half, concepts, banks), _vectors(backbone, concepts, banks)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    start = torch.stack([backbone.word_embedding("dress")] * 2)
    # bf16 rounding moves the token by a small fraction of how far learning moved it.
    assert (got - want).norm() < 0.25 * (want - start).norm()


@pytest.mark.parametrize("parametrization", ["projected", "free"])
def test_token_norm_bound(backbone, parametrization):
    concepts, _, banks = _world(backbone, n_concepts=2, shots=3, heldout=0)
    cfg = LearnerConfig(
        steps=30,
        lr=0.2,
        log_every=0,
        weights=LossWeights(ti=0.0, ce=1.0, image_ce=1.0),
        parametrization=parametrization,
        max_norm_ratio=1.5,
    )
    bound = 1.5 * backbone.vocab_mean_norm
    free = learn_tokens(backbone, concepts, banks, dataclasses.replace(cfg, max_norm_ratio=0.0))
    assert max(t.metrics["token_norm"] for t in free) > bound  # without the bound this lr overshoots it
    tokens = learn_tokens(backbone, concepts, banks, cfg)
    assert all(t.metrics["token_norm"] <= bound * (1 + 1e-5) for t in tokens)


def test_ti_balance_sets_lambda_from_the_measured_gradient_ratio(backbone):
    # λ_TI,c = ti_balance · ‖∇CE_c‖ / ‖∇TI_c‖: after calibration the two terms pull with the ratio asked for.
    concepts, _, banks = _world(backbone, n_concepts=2, shots=3, heldout=0, latents=True)
    weights = LossWeights(ti=1.0, ce=1.0, image_ce=0.0, ti_balance=0.5)
    cfg = LearnerConfig(steps=1, ti_samples=2, log_every=0, weights=weights)
    learned = learn_tokens(backbone, concepts, banks, cfg)
    for t in learned:
        raw = t.metrics["ti_grad_ratio_start"]  # ‖∇TI‖ / ‖∇CE‖ at λ = 1
        assert raw > 0
        assert t.metrics["ti_weight"] * raw == pytest.approx(0.5, rel=1e-4)
    uncalibrated = LossWeights(ti=1.0, ce=1.0, ti_balance=0.0)  # 0: λ_TI as given (the default calibrates)
    fixed = learn_tokens(backbone, concepts, banks, dataclasses.replace(cfg, weights=uncalibrated))
    assert all(t.metrics["ti_weight"] == 1.0 and "ti_grad_ratio_start" not in t.metrics for t in fixed)


def test_ti_balance_is_a_concepts_own_alone_or_beside_others(backbone):
    # Calibration draws per-concept samples and measures per-concept gradients, so learning together
    # still equals learning one by one.
    concepts, _, banks = _world(backbone, n_concepts=2, shots=3, heldout=0, latents=True)
    cfg = LearnerConfig(
        steps=3, ti_samples=2, log_every=0, weights=LossWeights(ti=1.0, ce=1.0, image_ce=0.0, ti_balance=1.0)
    )
    together = learn_tokens(backbone, concepts, banks, cfg)
    alone = [learn_tokens(backbone, [c], banks, cfg)[0] for c in concepts]
    for a, b in zip(together, alone):
        assert a.metrics["ti_weight"] == pytest.approx(b.metrics["ti_weight"], rel=1e-4)
        torch.testing.assert_close(a.vector, b.vector, atol=1e-5, rtol=1e-4)


def test_ti_balance_leaves_ti_only_learning_alone(backbone):
    concepts, _, banks = _world(backbone, n_concepts=2, shots=3, heldout=0, latents=True)
    cfg = LearnerConfig(steps=1, log_every=0, weights=LossWeights(ti=1.0, ce=0.0, image_ce=0.0, ti_balance=1.0))
    assert all(
        t.metrics["ti_weight"] == 1.0 for t in learn_tokens(backbone, concepts, banks, cfg)
    )  # nothing to balance


def _unet_batches(backbone, monkeypatch) -> list[int]:
    sizes, unet = [], backbone.generator.unet
    original = unet.forward
    monkeypatch.setattr(unet, "forward", lambda x, *a, **k: sizes.append(x.shape[0]) or original(x, *a, **k))
    return sizes


def test_a_stopped_concept_leaves_the_unet_batch(hf_backbone, monkeypatch):
    concepts, _, banks = _world(hf_backbone, n_concepts=3, latents=True)
    sizes = _unet_batches(hf_backbone, monkeypatch)
    cfg = LearnerConfig(
        steps=200,
        lr=0.05,
        weights=LossWeights(ti=1.0, ce=1.0, ti_balance=0.0),
        patience=3,
        min_delta=1e-3,
        ti_samples=2,
    )
    learned = learn_tokens(hf_backbone, concepts, banks, cfg)
    steps = sorted(int(t.metrics["steps"]) for t in learned)
    assert steps[0] < steps[-1] <= 200  # they stopped at different steps
    # One UNet call per step, holding ti_samples rows per concept still learning: the batch shrinks.
    expected = [2 * sum(s > i for s in steps) for i in range(steps[-1])]
    assert sizes == expected


def test_early_stopping_is_a_concepts_own_alone_or_beside_others(backbone):
    concepts, _, banks = _world(backbone, n_concepts=3, latents=True)
    cfg = LearnerConfig(
        steps=60, lr=0.05, weights=LossWeights(ti=1.0, ce=1.0, ti_balance=0.0), patience=3, min_delta=1e-3, seed=2
    )
    together = learn_tokens(backbone, concepts, banks, cfg)
    assert len({t.metrics["steps"] for t in together}) > 1
    for i, c in enumerate(concepts):
        alone = learn_tokens(backbone, [c], banks, cfg)[0]
        assert alone.metrics["steps"] == together[i].metrics["steps"]
        torch.testing.assert_close(alone.vector, together[i].vector, atol=1e-4, rtol=1e-3)


def test_sampled_templates_shrink_the_text_batch(hf_backbone, monkeypatch):
    concepts, _, banks = _world(hf_backbone, n_concepts=3)
    rows, original = [], hf_backbone.encode_text
    monkeypatch.setattr(hf_backbone, "encode_text", lambda b, v=None: rows.append(len(b)) or original(b, v))
    learn_tokens(hf_backbone, concepts, banks, LearnerConfig(steps=4, weights=CE_ONLY, templates_per_step=1))
    T = len(LearnerConfig().templates)
    # (the first call is the probe, the last the final metrics on every template)
    assert rows[1:-1] == [3 * 1] * 4 and rows[-1] == 3 * T


def test_sampled_templates_are_a_concepts_own_alone_or_beside_others(backbone):
    concepts, _, banks = _world(backbone, n_concepts=3, latents=True)
    cfg = LearnerConfig(steps=8, lr=0.02, weights=LossWeights(ti=1.0, ce=1.0), templates_per_step=2, seed=5)
    together = learn_tokens(backbone, concepts, banks, cfg)
    full = learn_tokens(backbone, concepts, banks, dataclasses.replace(cfg, templates_per_step=0))
    assert not torch.allclose(together[0].vector, full[0].vector)  # it did sample
    for i, c in enumerate(concepts):
        alone = learn_tokens(backbone, [c], banks, cfg)[0]
        torch.testing.assert_close(alone.vector, together[i].vector, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("k", [-1, 5])
def test_templates_per_step_out_of_range_is_an_error(k):
    with pytest.raises(ValueError, match="templates_per_step"):
        LearnerConfig(templates_per_step=k)


def test_ti_only_encodes_just_the_rows_its_samples_use(hf_backbone, monkeypatch):
    concepts, _, banks = _world(hf_backbone, n_concepts=3, latents=True)
    rows, original = [], hf_backbone.encode_text
    monkeypatch.setattr(hf_backbone, "encode_text", lambda b, v=None: rows.append(len(b)) or original(b, v))
    cfg = LearnerConfig(steps=5, ti_samples=2, log_every=0, weights=LossWeights(ti=1.0, ce=0.0, image_ce=0.0))
    learn_tokens(hf_backbone, concepts, banks, cfg)
    # (the first call is the probe, the last the final metrics on every template): per step at most
    # ti_samples rows per concept, at least one, and fewer than every template on some step.
    steps = rows[1:-1]
    assert len(steps) == 5 and all(3 <= n <= 3 * 2 for n in steps)


def test_ti_only_learns_what_encoding_every_row_learns(backbone):
    # The rows TI-only skips carry no gradient; a CE weight too small to move anything (1e-30) takes the
    # path that encodes every row and must learn the same tokens from the same samples.
    concepts, _, banks = _world(backbone, n_concepts=3, shots=3, heldout=0, latents=True)
    ti_only = _vectors(backbone, concepts, banks, weights=LossWeights(ti=1.0, ce=0.0, image_ce=0.0))
    every_row = _vectors(backbone, concepts, banks, weights=LossWeights(ti=1.0, ce=1e-30, image_ce=0.0, ti_balance=0.0))
    start = torch.stack([backbone.word_embedding(c.parent) for c in concepts])
    assert (ti_only - start).norm() > 0  # it learned
    torch.testing.assert_close(ti_only, every_row, atol=1e-6, rtol=1e-5)
