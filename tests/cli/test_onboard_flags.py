"""`tokenfactory onboard`'s learner flags reach the learner (they are recorded with the version as given)."""
from cli.main import build_parser
from cli.onboard_cmd import config_from_args
from factory.learner import LearnerConfig


def _learner(*flags):
    args = build_parser().parse_args(["onboard", "--catalog", "c", "--registry", "r", *flags])
    learner = config_from_args(args).learner
    assert isinstance(learner, LearnerConfig)
    return learner


def test_less_work_flags_become_learner_settings():
    cfg = _learner("--templates-per-step", "1", "--ti-samples", "1", "--patience", "5", "--min-delta", "0.01",
                   "--calibration-samples", "4")
    assert (cfg.templates_per_step, cfg.ti_samples, cfg.patience, cfg.min_delta, cfg.calibration_samples) == (1, 1, 5, 0.01, 4)


def test_without_the_flags_every_template_and_step_run():
    cfg = _learner()
    assert (cfg.templates_per_step, cfg.patience, cfg.calibration_samples) == (0, 0, 8)
