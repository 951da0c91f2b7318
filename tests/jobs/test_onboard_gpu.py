"""Onboarding on GPUs without a GPU: the placement rule, the encoders' device handling, and a local Ray
that *declares* one GPU (issue 26; audit rows #4, #10, #16 of ../shared/audits/gpu-path.md).

A whole GPU per encoder actor and per Train worker could never schedule on a one-GPU node: Ray waited
for resources, silently. The rule is now a pure function (`jobs.onboard_data.plan_placement`), tested
here on GPU counts, and the real job runs on a Ray cluster started with ``num_gpus=1``, where the CPU
stands in for the GPU Ray hands out (`GPU_STAND_IN_ENV`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from factory.errors import ConfigError, DeviceError
from jobs.onboard_data import ENCODER_GPU_SHARE, actor_device, encoder_options, plan_placement

ROOT = Path(__file__).resolve().parents[2]


# ---- the placement rule ------------------------------------------------------------------------------------


def _gpus_held(placement, encoders):
    return placement.workers * placement.worker_resources.get("GPU", 0) + encoders * placement.encoder_options.get(
        "num_gpus", 0
    )


def test_one_gpu_node_fits_one_worker_and_one_encoder_beside_it():
    p = plan_placement(1, workers=2, use_gpu=True, encoders=1, cpus_per_worker=0.5, encoder_cpus=0.5)
    assert p.workers == 1 and p.capped_from == 2  # --workers 2 capped at the one GPU Ray sees
    assert p.worker_resources == {"CPU": 0.5, "GPU": 1 - ENCODER_GPU_SHARE}
    assert p.encoder_options == {"num_cpus": 0.5, "num_gpus": ENCODER_GPU_SHARE}
    assert 0 < p.encoder_options["num_gpus"] < 1 and _gpus_held(p, 1) == pytest.approx(1.0)


def test_a_gpu_request_that_cannot_fit_fails_at_once():
    with pytest.raises(DeviceError, match="no GPU"):
        plan_placement(0, workers=1, use_gpu=True)
    with pytest.raises(DeviceError, match="--encoders"):
        plan_placement(1, workers=1, use_gpu=True, encoders=2)  # a second encoder has no room beside the worker
    with pytest.raises(ConfigError):
        plan_placement(1, workers=1, use_gpu=True, encoders=0)


def test_encoders_fill_the_gpus_no_worker_holds():
    per_free = round(1 / ENCODER_GPU_SHARE)
    p = plan_placement(2, workers=1, use_gpu=True, encoders=1 + per_free)  # one beside the worker, the rest free
    assert p.workers == 1 and p.capped_from is None and _gpus_held(p, 1 + per_free) <= 2 + 1e-9
    with pytest.raises(DeviceError):
        plan_placement(2, workers=1, use_gpu=True, encoders=2 + per_free)
    p = plan_placement(8, workers=2, use_gpu=True, encoders=2)
    assert p.workers == 2 and p.capped_from is None


def test_indexing_has_no_workers_and_packs_encoders():
    p = plan_placement(1, workers=0, use_gpu=True, encoders=round(1 / ENCODER_GPU_SHARE))
    assert p.workers == 0 and p.worker_resources == {} and p.encoder_options == {"num_gpus": ENCODER_GPU_SHARE}


def test_without_use_gpu_nothing_asks_for_a_gpu():
    p = plan_placement(0, workers=3, use_gpu=False, encoders=2, cpus_per_worker=0.5, encoder_cpus=0.5)
    assert (p.workers, p.worker_resources, p.encoder_options, p.capped_from) == (
        3,
        {"CPU": 0.5},
        {"num_cpus": 0.5},
        None,
    )
    assert plan_placement(4, workers=3, use_gpu=False).worker_resources == {}
    assert encoder_options(False) == {} and encoder_options(True) == {"num_gpus": ENCODER_GPU_SHARE}


def test_actor_device_refuses_a_gpu_torch_cannot_see():
    assert actor_device(False, None) == torch.device("cpu")
    assert actor_device(True, torch.device("cuda", 0)) == torch.device("cuda", 0)
    assert actor_device(False, torch.device("cuda", 0)) == torch.device("cpu")  # Ray gave none: not ours to use
    with pytest.raises(DeviceError, match="torch sees none"):
        actor_device(True, None)
    assert actor_device(True, None, stand_in=True) == torch.device("cpu")  # tests on CPU machines only


def test_train_worker_without_use_gpu_is_on_the_cpu():
    from jobs.onboard_train import worker_device

    assert worker_device(False) == torch.device("cpu")


# ---- the encoders: only the image tower and the VAE move, uint8 travels, batches are capped -------------


@pytest.fixture(scope="module")
def vae_backbone():
    from factory.backbones import load_backbone

    return load_backbone("tiny-open-clip")  # the tiny backbone with a VAE


def _images(n, size=40, seed=0):  # not the tower's size: the resize runs too
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_to_encoding_device_moves_only_the_image_tower_and_the_vae(vae_backbone):
    import copy

    from factory.concepts import to_encoding_device

    bb = copy.deepcopy(vae_backbone)
    to_encoding_device(bb, "meta")  # any device but the CPU shows what moved
    moved = {id(p) for m in [*bb.image_tower(), bb.generator.vae] for p in m.parameters()}
    assert moved and all(p.device.type == "meta" for m in [*bb.image_tower(), bb.generator.vae] for p in m.parameters())
    stayed = [p for p in bb.parameters() if id(p) not in moved]
    assert stayed and all(p.device.type == "cpu" for p in stayed)  # text tower and UNet: not an encoder's
    assert bb.device.type == "cpu" and all(p.device.type == "cpu" for p in bb.generator.unet.parameters())


def test_gpu_batches_are_capped_cpu_batches_are_not():
    from factory.concepts import GPU_ENCODE_BATCH, encode_batch_size

    assert encode_batch_size(256, torch.device("cuda", 0)) == GPU_ENCODE_BATCH == 32
    assert encode_batch_size(8, torch.device("cuda")) == 8
    assert encode_batch_size(256, torch.device("cpu")) == 256  # CPU outputs stay what they were
    assert encode_batch_size(256, torch.device("cpu"), cap=3) == 3


def test_encode_images_caps_images_per_forward_and_sends_uint8(vae_backbone, monkeypatch):
    from factory.concepts import encode_images

    images = _images(10)
    want_f, want_l = encode_images(vae_backbone, images)  # one forward of all 10 (the CPU's batch)
    calls = {"tower": [], "vae": [], "pre": [], "gen": []}
    tower, vae = vae_backbone.image_features, vae_backbone.generator.encode
    pre, gen = vae_backbone.preprocess, vae_backbone.generator_pixels
    monkeypatch.setattr(vae_backbone, "image_features", lambda x: (calls["tower"].append(len(x)), tower(x))[1])
    monkeypatch.setattr(vae_backbone.generator, "encode", lambda x: (calls["vae"].append(len(x)), vae(x))[1])
    monkeypatch.setattr(vae_backbone, "preprocess", lambda x: (calls["pre"].append(x), pre(x))[1])
    monkeypatch.setattr(vae_backbone, "generator_pixels", lambda x: (calls["gen"].append(x), gen(x))[1])
    f, lat = encode_images(vae_backbone, images, max_batch=4)
    assert calls["tower"] == calls["vae"] == [4, 4, 2]
    # uint8 [n, H, W, 3] tensors reach the conversion and the resize, which run where the towers are.
    assert all(
        isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.shape[1:] == (40, 40, 3)
        for x in calls["pre"] + calls["gen"]
    )
    torch.testing.assert_close(f, want_f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lat, want_l, rtol=1e-5, atol=1e-5)


def test_encode_images_on_the_cpu_matches_the_numpy_path(vae_backbone):
    # The uint8 tensor path computes exactly what the former NumPy path did (features and latents).
    from factory.concepts import encode_images

    images = _images(5, seed=1)
    f, lat = encode_images(vae_backbone, images)
    with torch.no_grad():
        ref_f = vae_backbone.encode_image(vae_backbone.preprocess(images)).float()
        ref_l = vae_backbone.generator.encode(vae_backbone.generator_pixels(images)).float()
    assert torch.equal(f, ref_f) and torch.equal(lat, ref_l)


# ---- a local Ray with one declared GPU ----------------------------------------------------------------------

_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import ray
    from ray.util.state import list_actors

    from factory import storage
    from factory.errors import DeviceError
    from factory.registry import TokenRegistry
    from factory.world import write_catalog
    from jobs.onboard import OnboardConfig, onboard, onboard_learner

    tmp = sys.argv[1]
    ray.init(num_cpus=2, num_gpus=1, logging_level="WARNING", log_to_driver=False, include_dashboard=True,
             dashboard_host="127.0.0.1")
    out = {"cluster_gpus": ray.cluster_resources().get("GPU", 0)}
    catalog, registry, report = f"{tmp}/catalog", f"{tmp}/registry", f"{tmp}/report.json"
    write_catalog(catalog, seed=3, products=6, shots=2, heldout=0, contexts=1, distractors=0)
    learner = onboard_learner(steps=2, ti_micro_batch=0)
    cfg = dict(catalog=catalog, registry=registry, backbone="tiny-hf-clip", learner=learner, use_gpu=True,
               precision="fp32", concepts_per_step=1, bank_size=2)

    t0 = time.perf_counter()
    try:  # two encoders cannot fit beside the worker on one GPU: an error now, not a wait
        onboard(OnboardConfig(**cfg, workers=1, encoders=2, run_id="toomany"))
        out["too_many"] = "ran"
    except DeviceError as e:
        out["too_many"] = str(e)
    out["too_many_s"] = time.perf_counter() - t0

    # --workers 2 on one GPU (capped at 1); chunks of 1 and banks of 2 images per parent, so chunks beyond
    # the bank sample are encoded while the Train worker holds its share: the audit's hang.
    t0 = time.perf_counter()
    version, _ = onboard(OnboardConfig(**cfg, workers=2, encoders=1, run_id="gpu", report=report))
    out["run_s"] = time.perf_counter() - t0
    out["learned"] = sorted(TokenRegistry(registry).open().concept_ids())
    out["workers"] = [{k: w[k] for k in ("rank", "device", "gpu_ids", "concepts")}
                      for w in storage.read_json(report)["workers"]]
    address = ray.get_runtime_context().gcs_address
    out["actors"] = [{"class": a.class_name, "resources": a.required_resources, "state": a.state}
                     for a in list_actors(address=address, detail=True, limit=1000)]
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_onboard_use_gpu_schedules_and_finishes_on_a_one_gpu_node(tmp_path):
    # Its own process: a Ray cluster with num_gpus=1, apart from the session's CPU cluster (`ray_cluster`),
    # which one process cannot hold beside another.
    from jobs.onboard_data import GPU_STAND_IN_ENV

    env = {
        **os.environ,
        GPU_STAND_IN_ENV: "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=540
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    assert out["cluster_gpus"] == 1
    assert "--encoders" in out["too_many"] and out["too_many_s"] < 60  # refused before any data moved
    assert len(out["learned"]) == 6  # every concept, within the timeout: nothing waited on resources
    assert [(w["device"], w["gpu_ids"]) for w in out["workers"]] == [("cpu", ["0"])]  # one worker, given the GPU
    assert sum(w["concepts"] for w in out["workers"]) == 6
    train = [_gpu(a["resources"]) for a in out["actors"] if "TrainWorker" in a["class"]]
    encoders = [_gpu(a["resources"]) for a in out["actors"] if "ChunkEncoder" in a["class"]]
    assert train and all(g == pytest.approx(1 - ENCODER_GPU_SHARE) for g in train), out["actors"]
    # Two encoder actors in all: the bank sample's, then the one that encodes beside the Train worker.
    assert len(encoders) >= 2 and all(g == pytest.approx(ENCODER_GPU_SHARE) for g in encoders), out["actors"]


def _gpu(resources: dict) -> float:
    """An actor's GPU request; Train workers ask through their placement group ("GPU_group_<id>")."""
    return max((v for k, v in resources.items() if k == "GPU" or k.startswith("GPU_group_")), default=0.0)
