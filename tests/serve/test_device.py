"""Where serve replicas compute and in what precision (`ServeSettings.device` / ``precision``).

The device choice is a pure function of the setting, Ray's GPU ids and torch's view, tested here case by
case on a CPU; the settings are then followed into real replica classes (their `__init__` and request
methods, run in this process without Serve) in bf16 on the CPU, which must answer as fp32 replicas do.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from factory.errors import ConfigError, DeviceError
from serve.deployments import replica_device
from serve.settings import ServeSettings


@pytest.mark.parametrize(
    "setting, gpu_ids, cuda_available, expected",
    [
        ("auto", [0], True, "cuda"),  # a replica Ray gave a GPU (the Generator in cluster.yaml) computes on it
        ("auto", [], True, "cpu"),  # GPUs on the node, none reserved for this replica: leave them alone
        ("auto", [0], False, "cpu"),  # a CPU build of torch on a GPU node
        ("auto", [], False, "cpu"),
        ("cpu", [0], True, "cpu"),
        ("cuda", [], True, "cuda"),  # asked for explicitly: taken whether Ray accounted it or not
        ("cuda", [1], True, "cuda"),
    ],
)
def test_replica_device_choice(setting, gpu_ids, cuda_available, expected):
    assert replica_device(setting, gpu_ids, cuda_available) == expected


def test_cuda_without_a_gpu_is_an_error_not_a_cpu_replica():
    with pytest.raises(DeviceError, match="no GPU"):
        replica_device("cuda", [0], False)
    with pytest.raises(ConfigError):
        replica_device("gpu", [0], True)


def test_device_and_precision_settings_are_validated():
    s = ServeSettings(registry="r", index="i")
    assert (s.device, s.precision) == ("auto", "fp32")
    assert ServeSettings(registry="r", index="i", device="cuda", precision="bf16").precision == "bf16"
    with pytest.raises(ConfigError, match="device must be one of auto, cpu, cuda"):
        ServeSettings(registry="r", index="i", device="gpu")
    with pytest.raises(ConfigError, match="precision must be one of"):
        ServeSettings(registry="r", index="i", precision="fp64")
    with pytest.raises(ValueError):  # the pydantic path (no __init__) refuses too
        ServeSettings.model_validate({"registry": "r", "index": "i", "precision": "int8"})


def test_precision_names_are_the_factory_s():
    from factory.device import PRECISIONS
    from serve.settings import PRECISION_NAMES

    assert set(PRECISION_NAMES) == set(PRECISIONS)


def test_serve_flags_default_to_the_settings_and_reach_them():
    from cli.main import build_parser
    from cli.serve_cmd import settings_from

    base = ["serve", "--registry", "/tmp/r", "--index", "/tmp/i"]
    args = build_parser().parse_args(base)
    fields = ServeSettings.model_fields
    assert (args.device, args.precision) == (fields["device"].default, fields["precision"].default)
    s = settings_from(build_parser().parse_args([*base, "--device", "cpu", "--precision", "bf16"]))
    assert (s.device, s.precision) == ("cpu", "bf16")
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--precision", "fp64"])


def test_a_replica_loads_its_backbone_on_the_chosen_device_in_the_set_precision(monkeypatch):
    import factory.backbones
    import serve.deployments as deployments

    seen, loaded = [], {}
    monkeypatch.setattr(deployments, "replica_device", lambda *a: seen.append(a) or "cpu")
    monkeypatch.setattr(factory.backbones, "load_backbone", lambda spec, **kw: loaded.update(kw, spec=spec) or "model")
    assert deployments._backbone(ServeSettings(registry="r", index="i", precision="bf16", device="auto")) == "model"
    assert seen == [("auto", [], torch.cuda.is_available())]  # no Ray worker here: no GPU ids
    assert (loaded["spec"], loaded["device"], loaded["dtype"]) == ("fashion-mini", torch.device("cpu"), torch.bfloat16)


def _watcher(version: int):
    async def current():
        return version

    return SimpleNamespace(current=SimpleNamespace(remote=current))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A registry of a few fashion-mini tokens, a gallery index and held-out images."""
    from factory.backbones import load_backbone
    from factory.catalogs import read_world_catalog
    from factory.gallery import index_images
    from factory.index.versions import IndexVersions
    from factory.world import write_catalog
    from tests.serve.conftest import learn_version

    root = tmp_path_factory.mktemp("device")
    catalog_uri, registry, index = str(root / "catalog"), str(root / "registry"), str(root / "index")
    write_catalog(catalog_uri, seed=5, products=6, shots=3, heldout=2, contexts=2, distractors=2)
    catalog = read_world_catalog(catalog_uri)
    backbone = load_backbone("fashion-mini")
    specs = catalog.concepts  # two look-alikes of each of three parents: each has negatives to learn against
    learn_version(registry, specs, "device-v1", backbone, steps=8)  # tokens apart enough to rank; seconds
    gallery, _ = index_images(backbone, {r.attributes["item"]: r.image_uri for r in catalog.gallery})
    IndexVersions(index).commit(gallery)
    return SimpleNamespace(registry=registry, index=index, specs=specs, size=backbone.config.image.size)


def _replicas(served, precision: str):
    from serve.deployments import ImageEncoder, TextEncoder

    settings = ServeSettings(
        registry=served.registry, index=served.index, backbone="fashion-mini", precision=precision, poll_s=0
    ).model_dump()
    return ImageEncoder.func_or_class(settings), TextEncoder.func_or_class(settings, _watcher(1))


def _unbatched(replica, method: str, *calls):
    """A @serve.batch method's own body on a list of calls (its batching needs a Serve replica context)."""
    return getattr(type(replica), method).__wrapped__(replica, list(calls))


def test_bf16_replicas_classify_as_fp32_ones(served):
    """The classify route's two replicas (image features, then the concepts' text embeddings) in bf16 on
    the CPU: the settings reach them, features stay fp32 NumPy, and the answers are fp32's."""
    from factory.images import load_rgb

    images = np.stack([load_rgb(open(u, "rb").read(), served.size) for s in served.specs for u in s.heldout_uris])

    async def classify(precision):
        image_enc, text_enc = _replicas(served, precision)
        for replica in (image_enc, text_enc):  # the image tower computes in the set precision
            assert next(replica.backbone.image_tower()[0].parameters()).dtype == PRECISION_DTYPES[precision]
        (feats,) = await _unbatched(image_enc, "encode", images)
        assert feats.dtype == np.float32 and np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
        return feats, await text_enc.classify(feats, [None] * len(feats), [3] * len(feats))

    feats32, fp32 = asyncio.run(classify("fp32"))
    feats16, bf16 = asyncio.run(classify("bf16"))
    assert all("concepts" in a and len(a["concepts"]) == 3 for a in bf16), bf16
    assert np.abs(feats16 - feats32).max() < 0.02  # bf16 rounding, not another model
    # The same ranking wherever fp32's top two are further apart than bf16's rounding (about 2e-3 here).
    clear = [i for i, a in enumerate(fp32) if a["concepts"][0][2] - a["concepts"][1][2] > 0.01]
    assert len(clear) >= len(fp32) // 2
    assert [bf16[i]["concepts"][0][0] for i in clear] == [fp32[i]["concepts"][0][0] for i in clear]
    by_id = [({c[0]: c[2] for c in x["concepts"]}, {c[0]: c[2] for c in y["concepts"]}) for x, y in zip(bf16, fp32)]
    assert max(abs(b[c] - f[c]) for b, f in by_id for c in b.keys() & f.keys()) < 0.01


def test_a_bf16_generator_replica_returns_images(served):
    """Sampling in bf16 ends in PNGs: the images reach NumPy as fp32 on the host."""
    import base64

    from factory.images import decode_image
    from serve.deployments import Generator

    settings = ServeSettings(
        registry=served.registry, index=served.index, backbone="fashion-mini", precision="bf16", poll_s=0
    ).model_dump()
    gen = Generator.func_or_class(settings, _watcher(1))
    assert gen.backbone.generator.unet.dtype == torch.bfloat16
    spec = served.specs[0]
    out = asyncio.run(gen.generate(f"a <concept:{spec.concept_id}> {spec.parent}", n=2, seed=0, steps=2, guidance=4.0))
    assert "error" not in out, out
    images = [decode_image(base64.b64decode(b)) for b in out["images"]]
    assert len(images) == 2 and all(im.dtype == np.uint8 and im.std() > 0 for im in images)


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def test_every_serve_path_is_device_clean_on_a_fake_gpu(served, monkeypatch):
    """Replicas that chose cuda, under `tests.fakecuda`: classify (image features, then the concepts'
    text embeddings), retrieve's text encoding, token lookups, generate and GAIR (object rule, refine,
    expand) run to the end with no op that a GPU would reject, and answer as on the CPU."""
    import serve.deployments as deployments
    from factory.images import load_rgb
    from tests.fakecuda import assert_device_clean, fake_cuda

    async def inline(fn):  # the harness is thread-local: sample in this thread
        return fn(lambda: False)

    monkeypatch.setattr(deployments, "run_cancellable", inline)
    images = np.stack([load_rgb(open(u, "rb").read(), served.size) for s in served.specs for u in s.heldout_uris])
    spec, rival = served.specs[0], served.specs[1]
    settings = ServeSettings(
        registry=served.registry, index=served.index, backbone="fashion-mini", device="cuda", poll_s=0
    ).model_dump()
    with fake_cuda() as rec:
        image_enc = deployments.ImageEncoder.func_or_class(settings)
        text_enc = deployments.TextEncoder.func_or_class(settings, _watcher(1))
        gen = deployments.Generator.func_or_class(settings, _watcher(1))
        assert image_enc.backbone.device.type == "cuda" and gen.backbone.device.type == "cuda"

        async def calls():
            (feats,) = await _unbatched(image_enc, "encode", images)
            classified = await text_enc.classify(feats, [None] * len(feats), [3] * len(feats))
            (texts,) = await _unbatched(text_enc, "encode", [f"a <concept:{spec.concept_id}> {spec.parent}"])
            token = await text_enc.token(spec.concept_id)
            generated = await gen.generate(
                f"a <concept:{spec.concept_id}> {spec.parent}", n=1, seed=0, steps=2, guidance=4.0
            )
            gair = await gen.gair(
                {
                    "concept_ids": [spec.concept_id],
                    "intent": "on a beach",
                    "alphas": [0.0, 1.0],
                    "previews": 1,
                    "steps": 2,
                    "rule": "object",
                    "refine": 1,
                    "expand": 0.5,
                    "top_k": 3,
                }
            )
            return feats, classified, texts, token, generated, gair

        feats, classified, texts, token, generated, gair = asyncio.run(calls())
    assert_device_clean(rec)
    assert feats.dtype == np.float32 and all("concepts" in a for a in classified), classified
    assert "features" in texts[0] and "vector" in token
    assert "error" not in generated and len(generated["images"]) == 1
    assert "error" not in gair, gair
    assert len(gair["steps"]) >= 3 and gair["ranking"]  # two α, at least one bisection, a ranking
    assert rival.concept_id != spec.concept_id
