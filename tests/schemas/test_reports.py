from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from schemas import RejectedImage, RunReport, SkippedConcept


def _report() -> RunReport:
    return RunReport(
        run_id="onboard-2026-11-29",
        started_at=datetime(2026, 11, 29, 8, 0, tzinfo=timezone.utc),
        finished_at=datetime(2026, 11, 29, 8, 5, 30, 250000, tzinfo=timezone.utc),
        concepts_requested=4,
        concepts_learned=2,
        skipped=[
            SkippedConcept(concept_id="../bad", reason="invalid id"),
            SkippedConcept(concept_id="c", reason="no images"),
        ],
        images_read=31,
        images_rejected=[RejectedImage(uri="s3://b/broken.png", reason="cannot decode")],
        stage_seconds={"read": 1.5, "encode": 3.25, "train": 40.0},
        concept_metrics={"a": {"loss": 0.5, "top1": 1.0}, "b": {"loss": 0.75}},
        config={"lambda_ti": 1.0, "workers": 2},
    )


def test_run_report_json_round_trip() -> None:
    report = _report()
    assert RunReport.model_validate_json(report.model_dump_json()) == report


def test_skipped_concept_may_carry_an_invalid_id() -> None:
    assert SkippedConcept(concept_id="a/b", reason="invalid id").concept_id == "a/b"


def test_skip_and_reject_need_a_reason() -> None:
    with pytest.raises(ValidationError):
        SkippedConcept(concept_id="a", reason=" ")
    with pytest.raises(ValidationError):
        RejectedImage(uri="x.png", reason="")


def test_run_report_counts_cannot_be_negative() -> None:
    with pytest.raises(ValidationError):
        RunReport(run_id="r", started_at=datetime.now(timezone.utc), images_read=-1)


def test_run_report_defaults_are_empty() -> None:
    report = RunReport(run_id="r", started_at=datetime.now(timezone.utc))
    assert (report.finished_at, report.skipped, report.stage_seconds) == (None, [], {})
