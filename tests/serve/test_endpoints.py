"""Each endpoint answers correctly on a small registry and gallery (real Serve, real HTTP)."""

from __future__ import annotations

import base64
import io
from collections import Counter

import numpy as np
from PIL import Image


def _b64(uri: str) -> str:
    with open(uri, "rb") as f:
        return base64.b64encode(f.read()).decode()


def test_health_ready_and_openapi(service):
    assert service.client.get("/healthz").json() == {"status": "ok"}
    ready = service.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["registry_version"] == 1
    assert ready.json()["gallery_items"] == len(service.catalog.gallery)
    paths = service.client.get("/openapi.json").json()["paths"]
    assert {"/v1/classify", "/v1/retrieve", "/v1/generate", "/v1/gair", "/v1/tokens", "/v1/admin/reload"} <= set(paths)
    assert service.client.get("/docs").status_code == 404  # off by default (`ServeSettings.docs`): no CDN page


def test_tokens_list_and_detail(service):
    listed = service.client.get("/v1/tokens").json()
    ids = sorted(t["concept_id"] for t in listed["tokens"])
    assert ids == sorted(s.concept_id for s in service.specs)
    detail = service.client.get(f"/v1/tokens/{ids[0]}").json()
    assert detail["concept_id"] == ids[0] and len(detail["vector"]) == detail["dim"]


def test_held_out_images_classify_as_their_concept(service):
    for spec in service.specs:
        for uri in spec.heldout_uris:
            r = service.client.post("/v1/classify", json={"image": _b64(uri), "top_k": 3})
            assert r.status_code == 200, r.text
            top = r.json()["concepts"]
            assert len(top) == 3 and top[0]["score"] >= top[1]["score"] >= top[2]["score"]
            assert top[0]["concept_id"] == spec.concept_id, (uri, top)


def test_classify_within_a_parent(service):
    spec = service.specs[0]
    r = service.client.post(
        "/v1/classify", json={"image": _b64(spec.heldout_uris[0]), "parent": spec.parent, "top_k": 10}
    )
    assert r.status_code == 200
    assert {c["parent"] for c in r.json()["concepts"]} == {spec.parent}


def test_a_token_query_retrieves_its_gallery_items_first(service):
    own = Counter(r.concept_id for r in service.catalog.gallery)
    for spec in service.specs:
        r = service.client.post(
            "/v1/retrieve", json={"query": f"a photo of a <concept:{spec.concept_id}> {spec.parent}", "top_k": 5}
        )
        assert r.status_code == 200, r.text
        items = r.json()["items"]
        assert len(items) == 5 and all(it["uri"].endswith(".png") for it in items)
        assert own[spec.concept_id] == 2
        assert all(it["id"].startswith(spec.concept_id + "-") for it in items[:2]), (spec.concept_id, items)


def test_generate_returns_pngs(service):
    spec = service.specs[0]
    r = service.client.post(
        "/v1/generate",
        json={"prompt": f"a <concept:{spec.concept_id}> {spec.parent} on the beach", "n": 2, "steps": 4, "seed": 1},
    )
    assert r.status_code == 200, r.text
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in r.json()["images"]]
    assert len(images) == 2 and images[0].shape == (32, 32, 3)
    again = service.client.post(
        "/v1/generate",
        json={"prompt": f"a <concept:{spec.concept_id}> {spec.parent} on the beach", "n": 2, "steps": 4, "seed": 1},
    ).json()["images"]
    assert again == r.json()["images"]  # a seed fixes the images


def test_gair_trace(service):
    spec = service.specs[1]
    r = service.client.post(
        "/v1/gair",
        json={
            "concept_ids": [spec.concept_id],
            "intent": "in the snow",
            "top_k": 4,
            "alphas": [0, 0.5, 1],
            "previews": 1,
            "steps": 3,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert [s["alpha"] for s in body["steps"]] == [0, 0.5, 1] and body["alpha"] in (0, 0.5, 1)
    assert all(len(s["previews"]) == 1 for s in body["steps"]) and len(body["ranking"]) == 4
    manual = service.client.post(
        "/v1/gair",
        json={
            "concept_ids": [spec.concept_id],
            "intent": "in the snow",
            "mode": "manual",
            "alpha": 0.3,
            "previews": 1,
            "steps": 2,
        },
    )
    assert manual.status_code == 200 and manual.json()["alpha"] == 0.3


def test_gair_bisection_with_previews_of_the_chosen_alpha_only(service):
    """refine searches between the schedule's α; previews_for="chosen" renders the kept α alone, and the
    unrendered α's preview scores are null, not NaN (JSON has none). The object rule reads the look-alikes."""
    spec = service.specs[1]
    body = {
        "concept_ids": [spec.concept_id],
        "intent": "in the snow",
        "top_k": 3,
        "alphas": [0, 0.5, 1],
        "previews": 1,
        "steps": 2,
        "refine": 2,
        "previews_for": "chosen",
    }
    for rule in ("retrieval", "object"):
        r = service.client.post("/v1/gair", json={**body, "rule": rule})
        assert r.status_code == 200, r.text
        out = r.json()
        alphas = [s["alpha"] for s in out["steps"]]
        assert alphas == sorted(alphas) and len(alphas) > 3 and out["alpha"] in alphas
        for s in out["steps"]:
            rendered = s["alpha"] == out["alpha"]
            assert len(s["previews"]) == (1 if rendered else 0)
            assert (s["fidelity"] is not None) == rendered and s["retrieved_object"] is not None


def test_the_gair_api_takes_the_methods_request_as_it_is():
    """A GAIR option added to the method (`schemas.gair.GairRequest`) reaches /v1/gair with its default and its
    checks, and no other file changes, unless the service withholds it (`serve.api.WITHHELD`). No service
    needed: this reads the two types."""
    from pydantic import TypeAdapter

    from schemas.gair import GairRequest
    from serve.api import WITHHELD, GairApiRequest

    method, api = GairRequest.__pydantic_fields__, GairApiRequest.__pydantic_fields__
    assert api.keys() == method.keys()
    assert all(api[n].default == method[n].default for n in method)
    schema = TypeAdapter(GairApiRequest).json_schema()
    assert set(schema["properties"]) == set(method) - set(WITHHELD) and schema["additionalProperties"] is False
    body = {"concept_ids": ["sku-1"], "intent": "on the beach", "refine": 1, "previews_for": "chosen"}
    parsed = TypeAdapter(GairApiRequest).validate_python(body)
    assert parsed == GairApiRequest(**body) and parsed.unet_passes() == GairRequest(**body).unet_passes()
