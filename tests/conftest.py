"""Shared fixtures: a real S3 server (SeaweedFS) for the whole session, fresh buckets, token factories."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from jobs.s3server import SeaweedS3
from schemas import TokenRecord


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    """One SeaweedFS server for the session: it starts in about a second but stops in about two."""
    server = SeaweedS3()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def s3_bucket(s3_server: SeaweedS3) -> str:
    """A fresh, empty bucket, as ``s3://<name>``, so tests never see each other's objects."""
    return s3_server.create_bucket(f"t-{uuid.uuid4().hex[:16]}")


@pytest.fixture
def make_token() -> Callable[..., TokenRecord]:
    """Build a valid TokenRecord; keyword arguments override the defaults."""

    def make(concept_id: str = "sku-1", dim: int = 8, **overrides: Any) -> TokenRecord:
        fields: dict[str, Any] = {
            "concept_id": concept_id,
            "parent": "dress",
            "backbone": "fashion-mini",
            "backbone_fingerprint": "fp-0123",
            "dim": dim,
            # Deterministic, distinct per concept, and not exactly representable in float32.
            "vector": [0.1 * (i + 1) + (sum(map(ord, concept_id)) % 97) / 1000 for i in range(dim)],
            "parametrization": "projected",
            "coefficients": [0.5, -0.25, 1.0 / 3.0][:dim],
            "basis_id": "dress-attrs-v1",
            "metrics": {"loss": 0.125, "acc": 1.0},
            "run_id": "run-1",
        }
        fields.update(overrides)
        return TokenRecord(**fields)

    return make


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster for the session (starting one costs seconds)."""
    import os

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        num_cpus=2, logging_level="WARNING", log_to_driver=False, include_dashboard=True, dashboard_host="127.0.0.1"
    )
    try:
        yield ray
    finally:
        ray.shutdown()
