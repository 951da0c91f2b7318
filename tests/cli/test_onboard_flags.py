"""`tokenfactory onboard`'s learner flags reach the learner (they are recorded with the version as given)."""

import pytest

from cli.main import build_parser
from cli.onboard_cmd import config_from_args, learner_config
from factory.errors import ConfigError
from factory.learner import LearnerConfig


def _learner(*flags):
    args = build_parser().parse_args(["onboard", "--catalog", "c", "--registry", "r", *flags])
    learner = config_from_args(args).learner
    assert isinstance(learner, LearnerConfig)
    return learner


def test_less_work_flags_become_learner_settings():
    cfg = _learner(
        "--templates-per-step",
        "1",
        "--ti-samples",
        "1",
        "--patience",
        "5",
        "--min-delta",
        "0.01",
        "--calibration-samples",
        "4",
    )
    assert (cfg.templates_per_step, cfg.ti_samples, cfg.patience, cfg.min_delta, cfg.calibration_samples) == (
        1,
        1,
        5,
        0.01,
        4,
    )


def test_without_the_flags_every_template_and_step_run():
    cfg = _learner()
    assert (cfg.templates_per_step, cfg.patience, cfg.calibration_samples) == (0, 0, 8)


# ---- GPU flags (issue 26): precision, micro-batch ---------------------------------------------------------


def _config(*flags, command="onboard"):
    from cli import index_cmd, onboard_cmd

    extra = ["--catalog", "c", "--registry", "r"] if command == "onboard" else ["--gallery", "g", "--out", "o"]
    args = build_parser().parse_args([command, *extra, *flags])
    return (onboard_cmd if command == "onboard" else index_cmd).config_from_args(args)


# "--ti-micro-batch 0" keeps these independent of the learner's "auto" (tested on its own below).
def test_use_gpu_defaults_precision_to_bf16_and_precision_overrides_it():
    assert _config().precision == "fp32"
    assert _config("--use-gpu", "--ti-micro-batch", "0").precision == "bf16"
    assert _config("--use-gpu", "--ti-micro-batch", "0", "--precision", "fp32").precision == "fp32"
    assert _config("--precision", "bf16").precision == "bf16"


def test_fp16_is_refused_for_onboarding_but_not_for_indexing():
    with pytest.raises(ConfigError, match="fp16"):
        _config("--use-gpu", "--ti-micro-batch", "0", "--precision", "fp16")
    from jobs.onboard import OnboardConfig

    with pytest.raises(ConfigError, match="fp16"):
        OnboardConfig("c", "r", precision="fp16")  # the job config refuses it too, not only the flags
    assert _config("--use-gpu", "--precision", "fp16", command="index").precision == "fp16"
    assert _config("--use-gpu", command="index").precision == "bf16"
    assert _config(command="index").precision == "fp32"


def _micro(*flags):
    return learner_config(
        build_parser().parse_args(["onboard", "--catalog", "c", "--registry", "r", *flags])
    ).ti_micro_batch


def test_ti_micro_batch_defaults_to_auto_on_gpus_and_0_on_cpus():
    assert _micro() == 0
    assert _micro("--use-gpu") == "auto"  # passed on unchanged: the learner resolves it on its device
    assert _micro("--use-gpu", "--ti-micro-batch", "0") == 0
    assert _micro("--ti-micro-batch", "auto") == "auto"
    assert _micro("--ti-micro-batch", "8") == 8


@pytest.mark.parametrize("bad", ["-1", "eight", "1.5"])
def test_ti_micro_batch_refuses_what_is_neither_a_count_nor_auto(bad, capsys):
    with pytest.raises(SystemExit):
        _micro("--ti-micro-batch", bad)
    assert "'auto'" in capsys.readouterr().err


def test_ti_micro_batch_reaches_the_learner_config():
    assert _learner("--ti-micro-batch", "4").ti_micro_batch == 4
    assert _learner().ti_micro_batch == 0
    assert _learner("--use-gpu").ti_micro_batch == "auto"  # resolved by the learner on its device


def test_help_documents_the_gpu_defaults():
    import argparse

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices["onboard"].format_help().split())
    assert "auto" in text and "fp16 is refused" in text and "bf16 with --use-gpu" in text
    assert "capped at the GPUs" in text
