"""What crosses into Ray is typed, and joining Ray is written once (issue 27, item 3)."""

from __future__ import annotations

import dataclasses
import pickle
import re
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _worker(**changes):
    from jobs.onboard import onboard_learner
    from jobs.onboard_train import WorkerConfig

    fields = dict(
        run_id="run",
        registry="/tmp/registry",
        backbone={"name": "tiny-hf-clip"},
        precision="fp32",
        learner=onboard_learner(steps=3),
        job_config={"workers": 2},
        min_images=2,
        threads=1,
        use_gpu=False,
        banks="an object ref",
    )
    return WorkerConfig(**{**fields, **changes})


def test_the_worker_config_is_frozen_and_survives_pickling():
    from factory.storage import S3Options

    worker = _worker(s3=S3Options(endpoint="http://127.0.0.1:8333"))
    back = pickle.loads(pickle.dumps(worker))
    assert back == worker and back.learner.steps == 3 and back.s3.endpoint == "127.0.0.1:8333"
    with pytest.raises(dataclasses.FrozenInstanceError):
        worker.run_id = "other"
    assert "8333" not in repr(worker)  # the S3 options (they may hold keys) stay out of logs


def test_the_worker_config_crosses_ray_train_as_the_one_value_of_its_dict():
    from jobs.onboard_train import WorkerConfig

    worker = _worker()
    config = worker.train_loop_config()
    assert list(config) == ["worker"] and WorkerConfig.of(config) is worker
    with pytest.raises(TypeError, match="WorkerConfig"):
        WorkerConfig.of({"run_id": "run", "learner": {}})  # the old string-keyed dict is refused, by name


def test_a_misspelt_worker_setting_fails_on_the_driver():
    with pytest.raises(TypeError):
        _worker(thread=2)


def test_the_encode_settings_are_one_typed_value():
    from jobs.onboard_data import EncodeSettings

    encode = EncodeSettings(backbone={"name": "tiny-hf-clip"}, image_size=32, batch_size=2, use_gpu=True)
    assert pickle.loads(pickle.dumps(encode)) == encode and (encode.latents, encode.thumbnails) == (True, True)
    with pytest.raises(TypeError):
        EncodeSettings(backbone={}, image_size=32, decode_task=2)


# ---- jobs/_ray.py: the one place that joins Ray ----------------------------------------------------------------


def _fake_ray(initialized: bool):
    calls = []
    return types.SimpleNamespace(is_initialized=lambda: initialized, init=lambda **kw: calls.append(kw)), calls


def test_connect_joins_ray_address_with_usage_stats_off(monkeypatch):
    import sys

    from jobs._ray import connect

    fake, calls = _fake_ray(initialized=False)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED", raising=False)
    connect()
    assert calls == [{"address": "ray://head:10001", "logging_level": "WARNING"}]
    import os

    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    connect(dashboard=True)  # a training job also starts the dashboard, on loopback only
    assert calls[1]["include_dashboard"] is True and calls[1]["dashboard_host"] == "127.0.0.1"


def test_connect_keeps_an_existing_connection(monkeypatch):
    import sys

    from jobs._ray import connect

    fake, calls = _fake_ray(initialized=True)
    monkeypatch.setitem(sys.modules, "ray", fake)
    connect()
    assert calls == []


def test_nothing_else_in_jobs_or_cli_calls_ray_init():
    calls = []
    for pkg in ("jobs", "cli"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if path.relative_to(ROOT).as_posix() == "jobs/_ray.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\bray\.init\(", line.split("#")[0]):  # code, not a comment naming it
                    calls.append(f"{path.relative_to(ROOT)}:{n}")
    assert not calls, f"join Ray with jobs._ray.connect(): {calls}"
