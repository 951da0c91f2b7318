"""`tokenfactory evaluate` end to end on a 4-concept catalog: world -> onboard (Ray) -> index (Ray) -> evaluate."""

import json

import pytest

from cli.main import main
from factory.evaluation.methods import CLASSIFICATION_METHODS, RETRIEVAL_METHODS
from factory.evaluation.report import FILES
from factory.world import write_catalog


@pytest.mark.ray
def test_evaluate_a_four_concept_catalog(ray_cluster, tmp_path, monkeypatch):
    import torch

    import factory.evaluation.harness as harness

    threads, before = {}, torch.get_num_threads()  # torch threads of this process in a stage beside the tasks
    for stage in ("retrieval_and_generation", "classification"):  # and one after them
        original = getattr(harness, stage)
        monkeypatch.setattr(
            harness,
            stage,
            lambda *a, _f=original, _s=stage, **k: threads.update({_s: torch.get_num_threads()}) or _f(*a, **k),
        )
    catalog, registry, index, out = (str(tmp_path / d) for d in ("catalog", "registry", "index", "eval"))
    write_catalog(catalog, seed=2, products=4, shots=2, heldout=2, contexts=2, distractors=4)
    assert (
        main(
            [
                "onboard",
                "--catalog",
                catalog,
                "--registry",
                registry,
                "--backbone",
                "tiny-hf-clip",
                "--steps",
                "2",
                "--concepts-per-step",
                "2",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert main(["index", "--gallery", catalog, "--out", index, "--backbone", "tiny-hf-clip"]) == 0
    assert (
        main(
            [
                "evaluate",
                "--catalog",
                catalog,
                "--registry",
                registry,
                "--index",
                index,
                "--out",
                out,
                "--previews",
                "1",
                "--sample-steps",
                "2",
                "--alphas",
                "0,1",
                "--ray-ablations",
            ]
        )
        == 0
    )

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
    assert stages["learn_ablations"] > 0 and all(
        stages[f"learn_{a}"] > 0 for a in ("ti", "ti_proj", "ce", "ce_free", "ti_ce_free")
    )
    # started before GAIR's stage and waited for after it: from start to ready spans that stage and the wait
    assert stages["learn_ablations"] >= stages["retrieval_generation"] + stages["ablations_wait"]
    assert set(m["targets"]) == {
        "ti_ce_proj_beats_caption_ti_parent",
        "gair_mrr_gain",
        "gair_intent_beats_token_intent",
        "classification_ti_ce_proj_vs_ce_and_caption",
        "generation_composition",
    }
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| ti_ce_proj |" in report and "| gair_auto |" in report


def test_a_run_s_recorded_learner_settings_are_read_back_as_they_were():
    from jobs.evaluate import run_learner_config

    recorded = {
        "learner": {
            "steps": 7,
            "lr": 0.02,
            "seed": 3,
            "parametrization": "free",
            "log_every": 0,
            "weights": {"ti": 1.0, "ce": 1.0, "image_ce": 0.0, "reg": 0.0, "ti_balance": 0.3},
        },
        "concepts_per_step": 3,
        "steps": 999,
    }  # a flag value that disagrees: the learner dict wins
    learner, per_step = run_learner_config(recorded)
    assert (learner.steps, learner.lr, learner.parametrization, learner.weights.ti_balance, per_step) == (
        7,
        0.02,
        "free",
        0.3,
        3,
    )
    assert run_learner_config(recorded, steps=2)[0].steps == 2


def test_versions_without_recorded_learner_settings_fall_back_to_their_flags():
    from jobs.evaluate import run_learner_config

    learner, per_step = run_learner_config({"steps": 11, "lambda_ti": 2.5, "concepts_per_step": 5})
    assert (learner.steps, learner.weights.ti, per_step) == (11, 2.5, 5)
    # onboard's other defaults of the time; TI calibration did not exist then
    assert (learner.weights.image_ce, learner.weights.ti_balance, learner.lr) == (1.0, 0.0, 0.01)


# --use-gpu: the device and precision of the evaluation's backbone (its GAIR previews, composition sampling
# and ablation learning). No GPU is faked: the device is a stand-in handed to a recording loader.


def _evaluate_args(tmp_path, *extra):
    from cli.evaluate_cmd import config_from_args
    from cli.main import build_parser

    paths = [str(tmp_path / d) for d in ("catalog", "registry", "index", "eval")]
    argv = ["evaluate", "--catalog", paths[0], "--registry", paths[1], "--index", paths[2], "--out", paths[3], *extra]
    return config_from_args(build_parser().parse_args(argv))


def test_use_gpu_flags_parse_to_the_config(tmp_path):
    from factory.errors import ConfigError
    from jobs.evaluate import EvaluateConfig

    cpu = _evaluate_args(tmp_path)
    assert (cpu.use_gpu, cpu.precision) == (False, "fp32")
    gpu = _evaluate_args(tmp_path, "--use-gpu")
    assert (gpu.use_gpu, gpu.precision, gpu.ablation_gpus) == (True, "bf16", 0.25)  # bf16 by default on a GPU
    assert (
        _evaluate_args(tmp_path, "--use-gpu", "--precision", "fp32", "--ablation-gpus", "0.5").record()["precision"]
        == "fp32"
    )
    with pytest.raises(SystemExit):  # the ablations learn: no fp16
        _evaluate_args(tmp_path, "--precision", "fp16")
    with pytest.raises(ConfigError, match="fp16"):
        EvaluateConfig("c", "r", "i", "o", use_gpu=True, precision="fp16")
    with pytest.raises(ConfigError, match="ablation_gpus"):
        EvaluateConfig("c", "r", "i", "o", ablation_gpus=0)


def test_use_gpu_without_a_gpu_fails_at_once(tmp_path, monkeypatch, capsys):
    import torch

    from factory.errors import DeviceError
    from jobs.evaluate import evaluate_registry

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU, wherever this runs
    # Nothing exists at these paths: the device error comes before anything is read.
    with pytest.raises(DeviceError, match="GPU"):
        evaluate_registry(_evaluate_args(tmp_path, "--use-gpu"))
    assert (
        main(
            [
                "evaluate",
                "--catalog",
                str(tmp_path / "c"),
                "--registry",
                str(tmp_path / "r"),
                "--index",
                str(tmp_path / "i"),
                "--out",
                str(tmp_path / "o"),
                "--use-gpu",
            ]
        )
        == 2
    )
    assert "--use-gpu" in capsys.readouterr().err


class _Reached(Exception):
    pass


def test_the_device_and_precision_reach_the_backbone_loader(tmp_path, monkeypatch):
    import types

    import torch

    import factory.backbones
    import factory.device
    import factory.registry
    from jobs.evaluate import evaluate_registry

    asked, loaded = [], {}
    stand_in = torch.device("meta")  # what pick_device would return on a GPU machine
    # jobs.evaluate imports it when it runs (its flags' defaults are read without torch).
    monkeypatch.setattr(factory.device, "pick_device", lambda use_gpu: asked.append(use_gpu) or stand_in)
    manifest = types.SimpleNamespace(config={}, backbone="tiny-hf-clip")
    monkeypatch.setattr(
        factory.registry,
        "TokenRegistry",
        lambda *a: types.SimpleNamespace(open=lambda v: types.SimpleNamespace(manifest=manifest)),
    )

    def load_backbone(spec, **kw):
        loaded.update(kw, spec=spec)
        raise _Reached

    monkeypatch.setattr(factory.backbones, "load_backbone", load_backbone)
    with pytest.raises(_Reached):
        evaluate_registry(_evaluate_args(tmp_path, "--use-gpu"))
    assert asked == [True]
    assert (loaded["spec"], loaded["device"], loaded["dtype"]) == ("tiny-hf-clip", stand_in, torch.bfloat16)


def test_ray_ablation_tasks_take_a_gpu_share_and_learn_on_it(monkeypatch):
    import types

    import torch

    import factory.backbones
    import factory.concepts
    import jobs.evaluate_ablations as ea
    from factory.errors import DeviceError
    from factory.learner import LearnerConfig

    # The tasks' options and arguments, recorded by a stand-in for the remote function (no cluster needed).
    submitted = []
    task = types.SimpleNamespace(
        options=lambda **o: types.SimpleNamespace(remote=lambda *a: submitted.append((o, a)) or ({}, 1.0))
    )
    monkeypatch.setattr(ea, "_learn_chunk", task)
    monkeypatch.setattr(ea.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ea.ray, "put", lambda x: x)
    monkeypatch.setattr(ea.ray, "get", lambda refs: refs)
    monkeypatch.setattr(factory.concepts, "negative_banks", lambda data: {})
    chunks = [[types.SimpleNamespace(concept_id="a")]]

    monkeypatch.setattr(ea.ray, "cluster_resources", lambda: {"CPU": 2.0})  # a cluster without GPUs
    with pytest.raises(DeviceError, match="has none"):  # refused, not a task that waits forever
        ea.ray_ablations("tiny-hf-clip", gpus=0.25, precision="bf16")(chunks, LearnerConfig(), ["ce"])
    monkeypatch.setattr(ea.ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 1.0})
    ea.ray_ablations("tiny-hf-clip", gpus=0.25, precision="bf16")(chunks, LearnerConfig(), ["ce"])()
    ((options, args),) = submitted
    assert options["num_gpus"] == 0.25 and args[-2:] == (True, "bf16")
    ea.ray_ablations("tiny-hf-clip")(chunks, LearnerConfig(), ["ce"])()  # without --use-gpu: no GPU asked
    assert submitted[1][0]["num_gpus"] == 0 and submitted[1][1][-2:] == (False, "fp32")

    # ... and a task loads its backbone on the device pick_device gives, in the precision asked.
    stand_in, loaded = torch.device("meta"), []
    monkeypatch.setattr(ea, "pick_device", lambda use_gpu: stand_in if use_gpu else torch.device("cpu"))
    monkeypatch.setattr(factory.backbones, "load_backbone", lambda spec, **kw: loaded.append(kw) or object())
    monkeypatch.setattr(ea, "_MODELS", {})
    ea._model("tiny-hf-clip", None, None, True, "bf16")
    ea._model("tiny-hf-clip", None, None, False, "fp32")  # another device/precision: not the cached model
    assert [(kw["device"], kw["dtype"]) for kw in loaded] == [
        (stand_in, torch.bfloat16),
        (torch.device("cpu"), torch.float32),
    ]
