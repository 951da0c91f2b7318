"""One source per default: a flag takes its default from its config's field, so a command run without a flag
and the config built in Python without that field are the same run (issue 27, item 3)."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def _subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _flag_defaults(command: str) -> dict:
    return {a.dest: a.default for a in _subparser(command)._actions if a.dest != "help"}


def _field_defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _parse(*argv):
    return build_parser().parse_args(list(argv))


# ---- onboard: the CLI and OnboardConfig(...) learn with the same LearnerConfig ---------------------------------


@pytest.mark.parametrize("gpu", [[], ["--use-gpu"]])
def test_onboard_without_flags_and_onboard_config_resolve_to_the_same_learner(gpu):
    from cli.onboard_cmd import config_from_args
    from factory.learner import LearnerConfig
    from jobs.onboard import OnboardConfig

    cli = config_from_args(_parse("onboard", "--catalog", "c", "--registry", "r", *gpu))
    python = OnboardConfig("c", "r", use_gpu=bool(gpu))
    assert isinstance(cli.learner, LearnerConfig) and cli.learner == python.learner
    assert cli.record() == python.record()  # and every other setting of the job too


def test_onboarding_learns_with_the_onboarding_defaults_not_the_libraries():
    # The numbers `tokenfactory onboard` has always run with (README): 150 steps, both CE terms, early
    # stopping's improvement 1e-3; LearnerConfig's own defaults (the in-process learner) stay as they are.
    from factory.learner import LearnerConfig
    from jobs.onboard import OnboardConfig

    learner = OnboardConfig("c", "r").learner
    assert (learner.steps, learner.min_delta, learner.weights.image_ce, learner.log_every) == (150, 1e-3, 1.0, 0)
    assert (LearnerConfig().steps, LearnerConfig().min_delta, LearnerConfig().weights.image_ce) == (200, 1e-4, 0.0)


def test_onboard_flags_default_to_their_fields():
    from cli.onboard_cmd import LEARNER_FLAGS, WEIGHT_FLAGS
    from jobs.onboard import OnboardConfig, onboard_learner

    flags, job = _flag_defaults("onboard"), _field_defaults(OnboardConfig)
    learner = onboard_learner()
    shared = [d for d in flags if d in job and d != "learner"]
    assert set(job) - {"learner", "s3"} == set(shared)  # every other field is a flag
    for dest in shared:
        assert flags[dest] == job[dest], dest
    for dest, name in LEARNER_FLAGS.items():
        assert flags[dest] == getattr(learner, name), dest
    for dest, name in WEIGHT_FLAGS.items():
        assert flags[dest] == getattr(learner.weights, name), dest
    assert flags["ti_micro_batch"] is None  # the device decides: `onboard_learner(use_gpu)`


def test_onboard_help_shows_the_fields_defaults():
    text = " ".join(_subparser("onboard").format_help().split())
    assert "learner steps per chunk (default: 150)" in text
    assert "(default: 0.001)" in text


# ---- index, evaluate, pretrain, serve ------------------------------------------------------------------------


def test_index_flags_default_to_their_fields():
    from cli.index_cmd import config_from_args
    from jobs.index import IndexConfig

    flags, fields = _flag_defaults("index"), _field_defaults(IndexConfig)
    shared = [d for d in flags if d in fields]
    assert set(fields) - {"s3"} == set(shared)  # every other field is a flag
    for dest in shared:
        assert flags[dest] == fields[dest], dest
    assert config_from_args(_parse("index", "--gallery", "g", "--out", "o")).record() == IndexConfig("g", "o").record()


def test_evaluate_flags_default_to_their_fields():
    from jobs.evaluate import EvaluateConfig

    flags, fields = _flag_defaults("evaluate"), _field_defaults(EvaluateConfig)
    shared = [d for d in flags if d in fields and d != "gair"]
    assert set(fields) - {"gair", "s3"} == set(shared)  # every other field is a flag
    for dest in shared:
        assert flags[dest] == fields[dest], dest


def test_evaluate_without_flags_is_evaluate_config_and_its_gair_settings(tmp_path):
    # The GAIR flags still spell their defaults out (GairSettings imports torch; the parser must not): this
    # holds them to GairSettings' own.
    from cli.evaluate_cmd import config_from_args
    from jobs.evaluate import EvaluateConfig

    paths = [str(tmp_path / d) for d in ("catalog", "registry", "index", "eval")]
    cli = config_from_args(
        _parse("evaluate", "--catalog", paths[0], "--registry", paths[1], "--index", paths[2], "--out", paths[3])
    )
    python = EvaluateConfig(*paths)
    cli_gair, python_gair = dataclasses.asdict(cli.gair), dataclasses.asdict(python.gair)
    assert [float(a) for a in cli_gair.pop("alphas")] == [float(a) for a in python_gair.pop("alphas")]
    assert cli_gair == python_gair
    assert {k: v for k, v in cli.record().items() if k != "gair"} == {
        k: v for k, v in python.record().items() if k != "gair"
    }


def test_pretrain_flags_default_to_their_fields_and_the_job_config_has_its_own_name():
    import factory.pretrain
    import jobs.pretrain
    from jobs.pretrain import PretrainJobConfig

    assert not hasattr(jobs.pretrain, "PretrainConfig")  # one class per name: factory.pretrain's
    assert hasattr(factory.pretrain, "PretrainConfig")
    flags, fields = _flag_defaults("pretrain"), _field_defaults(PretrainJobConfig)
    assert set(fields) <= set(flags)  # every field is a flag (the command builds the config from all of them)
    for dest in fields:
        assert flags[dest] == fields[dest], dest


def test_serve_flags_default_to_the_settings_fields():
    from cli.serve_cmd import SETTINGS_FLAGS
    from serve.settings import ServeSettings

    flags = _flag_defaults("serve")
    fields = ServeSettings.model_fields
    retyped_before = {"poll_s", "max_batch_size", "batch_wait_s", "gallery_shards", "device", "precision"}
    assert retyped_before <= set(SETTINGS_FLAGS.values())
    for dest, name in SETTINGS_FLAGS.items():
        if dest == "allowed_host":  # a repeatable flag: None stands for the field's default list
            assert flags[dest] is None
            continue
        assert flags[dest] == fields[name].get_default(call_default_factory=True), dest
    from cli.main import build_parser
    from cli.serve_cmd import settings_from

    args = build_parser().parse_args(["serve", "--registry", "/tmp/r", "--index", "/tmp/i"])
    assert settings_from(args).allowed_hosts == fields["allowed_hosts"].get_default(call_default_factory=True)


# ---- a value a config rejects: one line, exit 2 (the documented CLI error), no traceback -----------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["onboard", "--catalog", "c", "--registry", "r", "--templates-per-step", "99"],  # LearnerConfig.__post_init__
        ["onboard", "--catalog", "c", "--registry", "r", "--max-norm-ratio", "-1"],
        ["pretrain", "--out", "o", "--group-size", "0"],  # PretrainJobConfig.__post_init__
    ],
)
def test_a_flag_a_config_rejects_is_one_line_and_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"tokenfactory {argv[0]}: error: ") and "Traceback" not in err


def test_a_flag_a_config_rejects_is_one_line_from_the_real_command():
    # The installed entry point, as a user runs it: stderr is the one line, nothing else.
    out = subprocess.run(
        [sys.executable, "-m", "cli", "onboard", "--catalog", "c", "--registry", "r", "--templates-per-step", "99"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "templates_per_step" in out.stderr and "Traceback" not in out.stderr


def test_config_errors_are_still_value_errors():
    from factory.errors import ConfigError
    from factory.learner import LearnerConfig

    for bad in (
        {"parametrization": "other"},
        {"templates_per_step": 99},
        {"calibration_samples": 0},
        {"max_norm_ratio": -1.0},
        {"ti_micro_batch": -1},
    ):
        with pytest.raises(ConfigError) as e:
            LearnerConfig(**bad)
        assert isinstance(e.value, ValueError)  # callers that catch ValueError keep working


def test_parsing_the_flags_imports_no_torch():
    # Flags read their defaults off the config classes, and `tokenfactory --help` must stay fast: the
    # config modules the parser reads are importable without torch.
    code = "import sys; from cli.main import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr
