"""`tokenfactory onboard` against a real SeaweedFS and a real local Ray cluster.

A tiny backbone and few learner steps keep each run to seconds of learning; what is under test is the
job: reading from S3, reporting bad images, sharding, staging, resuming and committing.
"""

from __future__ import annotations

import io
import threading
import time
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from cli.main import main
from factory import storage
from factory.registry import TokenRegistry
from factory.world import write_catalog
from schemas import CatalogRow, to_arrow


def _onboard(catalog, registry, *extra):
    return main(
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
            "2",
            *extra,
        ]
    )


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


@pytest.fixture(scope="module")
def onboarded(ray_cluster, s3_server):
    """One run on S3 (2 workers, chunks of 4, Ray Data batches of 2), shared by the tests that read what it
    wrote: starting Ray Train is most of a run's minute."""
    bucket = s3_server.create_bucket(f"t-{uuid.uuid4().hex[:16]}")
    run = SimpleNamespace(
        catalog=f"{bucket}/catalog",
        registry=f"{bucket}/registry",
        report=f"{bucket}/report.json",
        s3=s3_server.s3_options,
    )
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_server.env.items():
            mp.setenv(k, v)
        write_catalog(run.catalog, seed=3, products=6, shots=3, heldout=1, contexts=1, distractors=0, s3=run.s3)
        assert (
            _onboard(
                run.catalog,
                run.registry,
                "--run-id",
                "e2e",
                "--report",
                run.report,
                "--concepts-per-step",
                "4",
                "--batch-size",
                "2",
            )
            == 0
        )
    return run


def test_end_to_end_on_s3(onboarded):
    version = TokenRegistry(onboarded.registry, onboarded.s3).open()
    assert len(version.concept_ids()) == 6 == len(set(version.concept_ids()))
    report = storage.read_json(onboarded.report, onboarded.s3)
    assert (report["concepts_requested"], report["concepts_learned"], report["images_read"]) == (6, 6, 18)
    assert report["skipped"] == [] and report["images_rejected"] == []
    assert version.manifest.report["run_id"] == "e2e" and set(report["concept_metrics"]) == set(version.concept_ids())
    assert version.manifest.config["workers"] == 2  # the effective config is stored with the version


def test_job_learns_the_same_chunks_as_the_evaluation(onboarded):
    # The image-side CE couples the concepts of a chunk, so the job must chunk by the catalog, as the
    # evaluation's ablations do (`learn_in_chunks`), not by the order the stream reaches its 2 workers
    # (Ray Data batches of 2 concepts, as here, used to split a chunk of 4 over both workers).
    from factory.backbones import load_backbone
    from factory.catalogs import read_concepts
    from factory.concepts import negative_banks
    from factory.onboarding import learn_in_chunks, prepare_concepts
    from jobs.evaluate import run_learner_config

    version = TokenRegistry(onboarded.registry, onboarded.s3).open()
    learner, per_step = run_learner_config(version.manifest.config)
    backbone = load_backbone("tiny-hf-clip")
    data, _, _ = prepare_concepts(backbone, read_concepts(onboarded.catalog, onboarded.s3), onboarded.s3)
    local = {t.concept_id: t for t in learn_in_chunks(backbone, data, negative_banks(data), learner, per_step)}
    job = {r.concept_id: np.asarray(r.vector) for r in version.records()}
    assert per_step == 4 and job.keys() == local.keys() and len(job) == 6
    for cid, v in job.items():
        np.testing.assert_allclose(v, local[cid].vector.numpy(), rtol=0, atol=1e-5, err_msg=cid)


def test_rerun_of_a_finished_run_id_does_nothing(onboarded, s3_env):
    reg = TokenRegistry(onboarded.registry, onboarded.s3)
    before = reg.open().records()
    t0 = time.perf_counter()
    assert _onboard(onboarded.catalog, onboarded.registry, "--run-id", "e2e", "--concepts-per-step", "4") == 0
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
        rows.append(
            CatalogRow(
                concept_id="c0" if name == "corrupt.png" else "c-bad", parent="dress", image_uri=uri, split="fewshot"
            )
        )
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


def _stream_rows(catalog_dir, todo, bank_size, per_step=4, s3=None):
    from factory.backbones import resolve_backbone_config
    from factory.catalogs import read_concepts
    from factory.onboarding import image_size_for
    from jobs.onboard_data import EncodedConcept, EncodeSettings, concept_stream

    specs = read_concepts(catalog_dir, s3)
    bb = resolve_backbone_config("tiny-hf-clip", None, s3)
    encode = EncodeSettings(backbone=bb.to_dict(), image_size=image_size_for(bb), s3=s3, latents=False)
    banks, stream, n = concept_stream(specs, todo(specs), bank_size, 1, per_step, encode)
    chunks = [
        [c.concept_id for c in chunk]
        for batch in stream.iter_batches(batch_size=1, batch_format="numpy")
        for chunk in EncodedConcept.chunks_of(batch)
    ]
    return specs, banks, chunks, n


def test_stream_rows_are_the_catalogs_chunks(ray_cluster, tmp_path):
    from factory.onboarding import chunks_by_parent

    write_catalog(str(tmp_path), seed=3, products=6, shots=2, heldout=0, contexts=1, distractors=0)
    specs, _, chunks, n = _stream_rows(str(tmp_path), lambda specs: {s.concept_id for s in specs}, 0)
    want = [[s.concept_id for s in c] for c in chunks_by_parent(specs, 4)]
    assert sorted(chunks) == sorted(want) and n == len(want) == 2


def test_stream_holds_the_bank_sample_and_the_rest(ray_cluster, tmp_path):
    write_catalog(str(tmp_path), seed=3, products=6, shots=2, heldout=0, contexts=1, distractors=0)
    # Chunks of 1 and a bank of 2 images per parent: one chunk per parent streams from the bank sample,
    # the other is encoded after it; every concept streams exactly once.
    specs, banks, chunks, n = _stream_rows(str(tmp_path), lambda specs: {s.concept_id for s in specs}, 2, per_step=1)
    assert sorted(c for chunk in chunks for c in chunk) == sorted(s.concept_id for s in specs) and n == 6
    assert sorted(len(b.owners) for b in banks.values()) == [2] * len({s.parent for s in specs})


def test_stream_of_a_resumed_run_keeps_chunks_whole(ray_cluster, tmp_path):
    write_catalog(str(tmp_path), seed=3, products=6, shots=2, heldout=0, contexts=1, distractors=0)
    # One concept of the second chunk still to do: that chunk streams whole (the worker drops the done
    # ones), so it is learned exactly as in an uninterrupted run; the finished chunk does not stream.
    from factory.onboarding import chunks_by_parent

    last = lambda specs: max(s.concept_id for s in specs)  # noqa: E731
    specs, _, chunks, n = _stream_rows(str(tmp_path), lambda specs: {last(specs)}, 0)
    whole = next(
        [s.concept_id for s in c] for c in chunks_by_parent(specs, 4) if last(specs) in {s.concept_id for s in c}
    )
    assert n == 1 and chunks == [whole] and len(whole) > 1
