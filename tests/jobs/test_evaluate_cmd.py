"""`tokenfactory evaluate` end to end on a 4-concept catalog: world -> onboard (Ray) -> index (Ray) -> evaluate."""
import json

import pytest

from factory.evaluation.methods import CLASSIFICATION_METHODS, RETRIEVAL_METHODS
from factory.evaluation.report import FILES
from factory.world import write_catalog
from cli.main import main


@pytest.mark.ray
def test_evaluate_a_four_concept_catalog(ray_cluster, tmp_path, monkeypatch):
    import torch

    import factory.evaluation.harness as harness

    threads, before = {}, torch.get_num_threads()  # torch threads of this process in a stage beside the tasks
    for stage in ("retrieval_and_generation", "classification"):  # and one after them
        original = getattr(harness, stage)
        monkeypatch.setattr(harness, stage, lambda *a, _f=original, _s=stage, **k: threads.update(
            {_s: torch.get_num_threads()}) or _f(*a, **k))
    catalog, registry, index, out = (str(tmp_path / d) for d in ("catalog", "registry", "index", "eval"))
    write_catalog(catalog, seed=2, products=4, shots=2, heldout=2, contexts=2, distractors=4)
    assert main(["onboard", "--catalog", catalog, "--registry", registry, "--backbone", "tiny-hf-clip",
                 "--steps", "2", "--concepts-per-step", "2", "--workers", "1"]) == 0
    assert main(["index", "--gallery", catalog, "--out", index, "--backbone", "tiny-hf-clip"]) == 0
    assert main(["evaluate", "--catalog", catalog, "--registry", registry, "--index", index, "--out", out,
                 "--previews", "1", "--sample-steps", "2", "--alphas", "0,1", "--ray-ablations"]) == 0

    # GAIR ran on one thread while the Ray tasks held the cores, the stages after them on the usual count
    assert threads == {"retrieval_and_generation": 1, "classification": before} and torch.get_num_threads() == before
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert all((tmp_path / "eval" / f).stat().st_size > 0 for f in FILES)
    assert set(m["classification"]) == set(CLASSIFICATION_METHODS)
    assert all(0.0 <= v["accuracy"] <= 1.0 and v["n_images"] == 8 for v in m["classification"].values())
    assert set(m["retrieval"]) == set(RETRIEVAL_METHODS) - {"gair_previews"}  # previews of the chosen α only
    for v in m["retrieval"].values():
        assert v["n_queries"] == 8 and 0.0 < v["mrr"] <= 1.0 and v["r1"] <= v["r5"] <= v["r10"] <= 1.0
    assert m["generation"]["ti"]["token_norm"] > 0 and m["generation"]["ti_ce_proj"]["token_norm"] > 0
    assert {"token_intent", "gair_auto"} <= set(m["generation"])
    for method in ("ti", "ce", "ti_ce_free", "ti_ce_proj", "caption"):  # composition prompts, fresh noise
        g = m["generation"][method]
        assert all(0.0 <= g[k] <= 1.0 for k in ("colour_accuracy", "category_accuracy", "intent_accuracy"))
        assert -1.0 <= g["fidelity"] <= 1.0 and g["n_images"] == 8
    example = m["generation"]["ti_ce_proj"]["prompt_example"]  # the token beside the parent and the context words
    assert example.startswith("a photo of a <concept:") and len(example.split("> ", 1)[1].split()) >= 2
    assert "<concept:" not in m["generation"]["caption"]["prompt_example"]
    assert m["learner"]["steps"] == 2 and m["learner"]["concepts_per_step"] == 2  # the run's own settings
    assert m["registry"]["version"] == 1
    stages = m["stage_seconds"]  # the ablations ran as Ray tasks, each timed in its task
    assert stages["learn_ablations"] > 0 and all(stages[f"learn_{a}"] > 0 for a in ("ti", "ti_proj", "ce", "ce_free", "ti_ce_free"))
    # started before GAIR's stage and waited for after it: from start to ready spans that stage and the wait
    assert stages["learn_ablations"] >= stages["retrieval_generation"] + stages["ablations_wait"]
    assert set(m["targets"]) == {"ti_ce_proj_beats_caption_ti_parent", "gair_mrr_gain", "gair_intent_beats_token_intent",
                                 "classification_ti_ce_proj_vs_ce_and_caption", "generation_composition"}
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| ti_ce_proj |" in report and "| gair_auto |" in report


def test_a_run_s_recorded_learner_settings_are_read_back_as_they_were():
    from jobs.evaluate import run_learner_config

    recorded = {"learner": {"steps": 7, "lr": 0.02, "seed": 3, "parametrization": "free", "log_every": 0,
                            "weights": {"ti": 1.0, "ce": 1.0, "image_ce": 0.0, "reg": 0.0, "ti_balance": 0.3}},
                "concepts_per_step": 3, "steps": 999}  # a flag value that disagrees: the learner dict wins
    learner, per_step = run_learner_config(recorded)
    assert (learner.steps, learner.lr, learner.parametrization, learner.weights.ti_balance, per_step) == (7, 0.02, "free", 0.3, 3)
    assert run_learner_config(recorded, steps=2)[0].steps == 2


def test_versions_without_recorded_learner_settings_fall_back_to_their_flags():
    from jobs.evaluate import run_learner_config

    learner, per_step = run_learner_config({"steps": 11, "lambda_ti": 2.5, "concepts_per_step": 5})
    assert (learner.steps, learner.weights.ti, per_step) == (11, 2.5, 5)
    # onboard's other defaults of the time; TI calibration did not exist then
    assert (learner.weights.image_ce, learner.weights.ti_balance, learner.lr) == (1.0, 0.0, 0.01)
