"""The whole chain on checkpoints in their standard layouts (tiny random models of the real classes).

    SD 1.x-style ROOT on SeaweedFS -> `tokenfactory onboard` on Ray with the shipped clip-vit-l14+sd15 config
      -> `tokenfactory export` -> a real diffusers StableDiffusionPipeline.from_pretrained +
      load_textual_inversion samples 2 steps from a prompt with the token
      -> `tokenfactory index` + `tokenfactory serve` answer classify, retrieve and generate on that backbone

and the SD 2.x-style ROOT (open_clip, penultimate layer, v-prediction) onboarded in-process and exported.
"""

from __future__ import annotations

import base64
import json
import socket

import httpx
import numpy as np
import pytest
import torch

from cli.main import main
from factory.backbones import load_backbone
from factory.catalogs import read_world_catalog
from factory.registry import TokenRegistry
from factory.world import write_catalog
from tests.checkpoints import upload, write_sd1_root, write_sd2_root


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("catalog"))
    write_catalog(uri, seed=3, products=4, shots=3, heldout=1, contexts=1, distractors=2)
    return uri


def _pipeline_with_tokens(root, out):
    from diffusers import StableDiffusionPipeline

    index = json.loads((out / "tokens.json").read_text())
    pipe = StableDiffusionPipeline.from_pretrained(
        str(root / "diffusion"), safety_checker=None, requires_safety_checker=False
    )
    for t in index["tokens"]:
        pipe.load_textual_inversion(str(out / t["file"]))
    return pipe, index


def _assert_pipeline_uses_the_tokens(pipe, index, backbone, version):
    first = index["tokens"][0]
    prompt = first["prompt_example"] + " on the beach"
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        ours = backbone.encode_prompts([prompt], {first["concept_id"]: version.get(first["concept_id"]).vector}).hidden
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    image = pipe(
        prompt, num_inference_steps=2, height=16, width=16, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all() and image.std() > 0


@pytest.mark.s3
@pytest.mark.ray
def test_sd1_root_on_s3_onboard_export_diffusers_and_serve(
    ray_cluster, catalog, tmp_path, s3_server, s3_bucket, monkeypatch
):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    root = write_sd1_root(tmp_path / "sd15")
    weights = upload(root, f"{s3_bucket}/models/sd15", s3_server.s3_options)
    registry, out = str(tmp_path / "registry"), tmp_path / "exported"
    assert (
        main(
            [
                "onboard",
                "--catalog",
                catalog,
                "--registry",
                registry,
                "--backbone",
                "clip-vit-l14+sd15",
                "--weights",
                weights,
                "--steps",
                "3",
                "--concepts-per-step",
                "2",
                "--workers",
                "1",
                "--ti-micro-batch",
                "2",
                "--run-id",
                "sd15",
            ]
        )
        == 0
    )
    version = TokenRegistry(registry).open()
    assert len(version) == 4 and {r.backbone for r in version.records()} == {"clip-vit-l14+sd15"}
    assert version.manifest.config["backbone_config"]["resolved_from"] == weights  # the job shipped the config
    backbone = load_backbone("clip-vit-l14+sd15", weights=str(root))
    assert {r.backbone_fingerprint for r in version.records()} == {backbone.fingerprint()}

    assert main(["export", "--registry", registry, "--out", str(out)]) == 0
    pipe, index = _pipeline_with_tokens(root, out)
    assert len(index["tokens"]) == 4 and index["backbone_fingerprint"] == backbone.fingerprint()
    _assert_pipeline_uses_the_tokens(pipe, index, backbone, version)

    index_uri = str(tmp_path / "index")
    assert (
        main(
            [
                "index",
                "--gallery",
                catalog,
                "--out",
                index_uri,
                "--backbone",
                "clip-vit-l14+sd15",
                "--weights",
                str(root),
            ]
        )
        == 0
    )
    _serve_answers(registry, index_uri, str(root), read_world_catalog(catalog))


def _serve_answers(registry, index_uri, weights, catalog):
    from serve.app import stop

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert (
        main(
            [
                "serve",
                "--registry",
                registry,
                "--index",
                index_uri,
                "--backbone",
                "clip-vit-l14+sd15",
                "--weights",
                weights,
                "--port",
                str(port),
                "--poll-s",
                "0",
                "--exit-when-ready",
            ]
        )
        == 0
    )
    try:
        spec = catalog.concepts[0]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            image = base64.b64encode(open(spec.heldout_uris[0], "rb").read()).decode()
            r = client.post("/v1/classify", json={"image": image, "top_k": 2})
            assert r.status_code == 200, r.text
            assert len(r.json()["concepts"]) == 2
            r = client.post(
                "/v1/retrieve", json={"query": f"a photo of a <concept:{spec.concept_id}> {spec.parent}", "top_k": 3}
            )
            assert r.status_code == 200 and len(r.json()["items"]) == 3, r.text
            r = client.post("/v1/generate", json={"prompt": f"a <concept:{spec.concept_id}> {spec.parent}", "steps": 2})
            assert r.status_code == 200, r.text
            png = base64.b64decode(r.json()["images"][0])
            assert png.startswith(b"\x89PNG")
    finally:
        stop()


def test_sd2_root_onboard_in_process_and_export(catalog, tmp_path):
    from factory.catalogs import read_concepts
    from factory.learner import LearnerConfig
    from factory.onboarding import learn_and_commit
    from jobs.export import export_tokens

    root = write_sd2_root(tmp_path / "sd21")
    backbone = load_backbone("openclip-vit-h14+sd21", weights=str(root))
    registry = str(tmp_path / "registry")
    learn_and_commit(
        TokenRegistry(registry), read_concepts(catalog)[:2], "sd21", backbone, LearnerConfig(steps=3, log_every=0)
    )
    out = tmp_path / "exported"
    export_tokens(registry, str(out))
    pipe, index = _pipeline_with_tokens(root, out)
    _assert_pipeline_uses_the_tokens(pipe, index, backbone, TokenRegistry(registry).open())


@pytest.mark.parametrize(
    "backbone, weights, message",
    [
        ("no-such-backbone", None, "unknown backbone 'no-such-backbone'"),
        ("clip-vit-l14+sd15", None, "give --weights ROOT"),
        ("clip-vit-l14+sd15", "/nonexistent/root", "clip/config.json"),
    ],
)
def test_onboard_refuses_a_bad_backbone_in_seconds(catalog, tmp_path, capsys, backbone, weights, message):
    import time

    t0 = time.perf_counter()
    rc = main(
        [
            "onboard",
            "--catalog",
            catalog,
            "--registry",
            str(tmp_path / "r"),
            "--backbone",
            backbone,
            *(["--weights", weights] if weights else []),
        ]
    )
    assert rc == 2 and time.perf_counter() - t0 < 10
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one line, no traceback
