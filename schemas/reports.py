"""What a job run tells its operator: what was asked, what was learned, what was skipped and why."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

from schemas.ids import NonEmptyStr, RunId, UtcDatetime


class SkippedConcept(BaseModel):
    """A concept the run did not learn. ``concept_id`` is a plain string: an invalid id is itself a
    reason to skip, and it must still be reportable."""

    model_config = ConfigDict(extra="forbid")

    concept_id: str
    reason: NonEmptyStr


class RejectedImage(BaseModel):
    """An image that could not be used (unreadable, wrong size, ...). Never fatal for the run."""

    model_config = ConfigDict(extra="forbid")

    uri: str
    reason: NonEmptyStr


class RunReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_id: RunId
    started_at: UtcDatetime
    finished_at: UtcDatetime | None = None
    concepts_requested: NonNegativeInt = 0
    concepts_learned: NonNegativeInt = 0
    skipped: list[SkippedConcept] = Field(default_factory=list)
    images_read: NonNegativeInt = 0
    images_rejected: list[RejectedImage] = Field(default_factory=list)
    stage_seconds: dict[str, float] = Field(default_factory=dict, description="wall time per stage")
    concept_metrics: dict[str, dict[str, float]] = Field(default_factory=dict)
    workers: list[dict[str, Any]] = Field(
        default_factory=list, description="per Train worker attempt: rank, peak RSS (MiB), concepts, chunk end times"
    )
    config: dict[str, Any] = Field(default_factory=dict)
