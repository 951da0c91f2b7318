"""`tokenfactory onboard` against a real SeaweedFS and a real local Ray cluster.

A tiny backbone and few learner steps keep each run to seconds of learning; what is under test is the
job: reading from S3, reporting bad images, sharding, staging, resuming and committing.
"""
from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from factory import storage
from factory.registry import TokenRegistry
from factory.world import write_catalog
from cli.main import main
from schemas import CatalogRow, to_arrow


def _onboard(catalog, registry, *extra):
    return main(["onboard", "--catalog", catalog, "--registry", registry, "--backbone", "tiny-hf-clip",
                 "--steps", "2", "--concepts-per-step", "2", "--workers", "2", *extra])


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    return s3_server.s3_options


@pytest.fixture
def catalog(s3_bucket, s3_env):
    uri = f"{s3_bucket}/catalog"
    write_catalog(uri, seed=3, products=6, shots=3, heldout=1, contexts=1, distractors=0, s3=s3_env)
    return uri


def _png(size, colour=(200, 10, 10)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_end_to_end_on_s3(ray_cluster, catalog, s3_bucket, s3_env):
    registry = f"{s3_bucket}/registry"
    report_uri = f"{s3_bucket}/report.json"
    assert _onboard(catalog, registry, "--run-id", "e2e", "--report", report_uri) == 0
    reg = TokenRegistry(registry, s3_env)
    version = reg.open()
    assert len(version.concept_ids()) == 6 == len(set(version.concept_ids()))
    report = storage.read_json(report_uri, s3_env)
    assert (report["concepts_requested"], report["concepts_learned"], report["images_read"]) == (6, 6, 18)
    assert report["skipped"] == [] and report["images_rejected"] == []
    assert version.manifest.report["run_id"] == "e2e" and set(report["concept_metrics"]) == set(version.concept_ids())
    assert version.manifest.config["workers"] == 2  # the effective config is stored with the version


def test_rerun_of_a_finished_run_id_does_nothing(ray_cluster, catalog, s3_bucket, s3_env):
    registry = f"{s3_bucket}/registry"
    assert _onboard(catalog, registry, "--run-id", "again") == 0
    reg = TokenRegistry(registry, s3_env)
    before = reg.open().records()
    t0 = time.perf_counter()
    assert _onboard(catalog, registry, "--run-id", "again") == 0
    assert time.perf_counter() - t0 < 10  # no data or training stage ran
    assert reg.versions() == [1]
    assert [r.vector for r in reg.open().records()] == [r.vector for r in before]


def test_bad_images_are_reported_not_fatal(ray_cluster, s3_bucket, s3_env):
    good = [_png((32, 32), (i * 40, 10, 200)) for i in range(4)]
    bad = {
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(np.random.default_rng(0).integers(0, 255, 200, dtype=np.uint8)),
        "truncated.png": _png((32, 32))[:60],
        "empty.png": b"",
        "huge.png": _png((5000, 5000)),  # 25 Mpx: refused from the header, never decoded
        "text.png": b"hello, I am not an image",
    }
    rows = []
    for c in range(2):  # two good concepts with one bad image each
        for i, data in enumerate(good):
            uri = f"{s3_bucket}/imgs/c{c}-{i}.png"
            storage.write_bytes(uri, data, s3_env)
            rows.append(CatalogRow(concept_id=f"c{c}", parent="dress", image_uri=uri, split="fewshot"))
    for name, data in bad.items():
        uri = f"{s3_bucket}/imgs/{name}"
        storage.write_bytes(uri, data, s3_env)
        rows.append(CatalogRow(concept_id="c0" if name == "corrupt.png" else "c-bad", parent="dress",
                               image_uri=uri, split="fewshot"))
    rows.append(CatalogRow(concept_id="c1", parent="dress", image_uri=f"{s3_bucket}/imgs/missing.png", split="fewshot"))
    storage.write_parquet(to_arrow(rows, CatalogRow), f"{s3_bucket}/rows.parquet", s3_env)
    report_uri = f"{s3_bucket}/report.json"
    assert _onboard(f"{s3_bucket}/rows.parquet", f"{s3_bucket}/registry", "--report", report_uri) == 0
    report = storage.read_json(report_uri, s3_env)
    reasons = {r["uri"].rsplit("/", 1)[-1]: r["reason"] for r in report["images_rejected"]}
    assert set(reasons) == set(bad) | {"missing.png"}
    assert "too large" in reasons["huge.png"] and "empty" in reasons["empty.png"]
    assert [s["concept_id"] for s in report["skipped"]] == ["c-bad"]
    assert sorted(TokenRegistry(f"{s3_bucket}/registry", s3_env).open().concept_ids()) == ["c0", "c1"]


def _run_in_thread(args):
    out = {}
    t = threading.Thread(target=lambda: out.update(rc=_safe(args)), daemon=True)
    t.start()
    return t, out


def _safe(args):
    try:
        return _onboard(*args)
    except Exception as e:  # the test decides what a failure means
        return e


def _wait_for_staged(registry, run_id, s3, timeout=120):
    staged = TokenRegistry(registry, s3).staged(run_id)
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            if staged.shards():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise AssertionError("no shard was staged in time")


def test_killed_train_worker_loses_nothing_and_repeats_nothing(ray_cluster, catalog, s3_bucket, s3_env):
    import os
    import signal

    from ray.util.state import list_actors

    registry = f"{s3_bucket}/registry"
    t, out = _run_in_thread((catalog, registry, "--run-id", "kill", "--concepts-per-step", "1", "--steps", "15"))
    _wait_for_staged(registry, "kill", s3_env)
    import ray

    address = ray.get_runtime_context().gcs_address  # this test's cluster, whatever else runs on the machine
    victims = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert victims, "no live Train worker to kill"
    os.kill(victims[0].pid, signal.SIGKILL)  # a dead worker process, as a crash or an OOM kill leaves it
    t.join(timeout=600)
    assert out.get("rc") == 0, out
    ids = TokenRegistry(registry, s3_env).open().concept_ids()
    assert len(ids) == 6 == len(set(ids))


def test_s3_restart_mid_run_loses_nothing(ray_cluster, catalog, s3_bucket, s3_env, s3_server):
    registry = f"{s3_bucket}/registry"
    args = (catalog, registry, "--run-id", "s3restart", "--concepts-per-step", "1", "--steps", "15")
    t, out = _run_in_thread(args)
    _wait_for_staged(registry, "s3restart", s3_env)
    s3_server.restart()
    t.join(timeout=600)
    if out.get("rc") != 0:  # the run may fail while S3 is down; a rerun with the same run id resumes
        assert _onboard(*args) == 0
    ids = TokenRegistry(registry, s3_env).open().concept_ids()
    assert len(ids) == 6 == len(set(ids))
