"""Abuse resistance over real HTTP: body limits, the image_uri allow-list, the costly-route cap, keys."""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
from PIL import Image

from factory import storage
from tests.serve.conftest import CLIENT_HEADERS, CLIENT_KEY


def _png_bytes(size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (20, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_json_routes_take_small_bodies_only(service):
    r = service.client.post("/v1/retrieve", json={"query": "a boot " * 20_000, "top_k": 3})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    t0 = time.perf_counter()
    huge = b'{"concept_ids": ["a"], "intent": "x", "alphas": [' + b"0.5," * 2_000_000 + b"0.5]}"
    r = service.client.post("/v1/gair", content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 413 and time.perf_counter() - t0 < 5  # refused by size, never parsed


def test_image_uri_reads_only_under_the_allowed_prefix_and_answers_absent_and_denied_alike(service):
    allowed, private = f"{service.bucket}/allowed/ok.png", f"{service.bucket}/private/secret.png"
    storage.write_bytes(allowed, _png_bytes(), service.s3)
    storage.write_bytes(private, _png_bytes(), service.s3)
    r = service.client.post("/v1/classify", json={"image_uri": allowed, "top_k": 1})
    assert r.status_code == 200, r.text
    denied = service.client.post("/v1/classify", json={"image_uri": private})
    absent = service.client.post("/v1/classify", json={"image_uri": f"{service.bucket}/allowed/missing.png"})
    assert denied.status_code == absent.status_code == 404 and denied.json() == absent.json()  # no existence oracle


def test_an_oversized_object_is_refused_without_being_read_whole(service):
    big = f"{service.bucket}/allowed/big.png"
    storage.write_bytes(big, b"\x89PNG" + b"\0" * (9 << 20), service.s3)
    r = service.client.post("/v1/classify", json={"image_uri": big})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_a_gair_flood_gets_429_while_classify_answers(service):
    spec = service.specs[0]
    body = {"concept_ids": [spec.concept_id], "intent": "on the beach", "previews": 1, "steps": 8, "alphas": [0.0, 1.0]}
    answers, lock = [], threading.Lock()

    def flood():
        with httpx.Client(base_url=service.url, timeout=120, headers=CLIENT_HEADERS) as c:
            r = c.post("/v1/gair", json=body)
            with lock:
                answers.append((r.status_code, r.headers.get("retry-after"), r.json().get("error", {}).get("code")))

    threads = [threading.Thread(target=flood) for _ in range(6)]
    for t in threads:
        t.start()
    image = base64.b64encode(_png_bytes()).decode()
    cheap = service.client.post("/v1/classify", json={"image": image, "top_k": 1})
    for t in threads:
        t.join()
    assert cheap.status_code == 200
    busy = [a for a in answers if a[0] == 429]
    assert busy and all(a[1] and a[2] == "busy" for a in busy)  # the cap of 2 costly requests in flight
    assert {a[0] for a in answers} <= {200, 429}


def test_the_clients_key_is_not_the_admin_key(service):
    r = service.client.post("/v1/admin/reload", json={}, headers={"Authorization": f"Bearer {CLIENT_KEY}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


def test_readyz_shows_no_internals(service):
    body = service.client.get("/readyz").json()
    assert set(body) == {"ready", "registry_version", "gallery_items"}


def test_with_a_required_key_every_route_refuses_requests_without_it(service):
    for method, path, body in (
        ("get", "/v1/tokens", None),
        ("post", "/v1/retrieve", {"query": "a boot"}),
        ("get", f"/v1/tokens/{service.specs[0].concept_id}/thumbnails/0", None),
        ("get", "/v1/items/anything/thumbnail", None),
    ):
        r = getattr(httpx, method)(service.url + path, **({"json": body} if body else {}))
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", (path, r.text)
    assert httpx.get(service.url + "/v1/auth").json() == {"key_required": True, "key_valid": False}
    assert service.client.get("/v1/auth").json() == {"key_required": True, "key_valid": True}


def test_thumbnails_come_from_the_registry_and_the_index_only(service):
    spec = service.specs[0]
    r = service.client.get(f"/v1/tokens/{spec.concept_id}/thumbnails/0")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content.startswith(b"\x89PNG")
    assert service.client.get(f"/v1/tokens/{spec.concept_id}/thumbnails/9").status_code == 404
    item = service.client.post(
        "/v1/retrieve", json={"query": f"a <concept:{spec.concept_id}> {spec.parent}", "top_k": 1}
    ).json()["items"][0]["id"]
    r = service.client.get(f"/v1/items/{item}/thumbnail")
    assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
    assert service.client.get("/v1/items/not-in-the-index/thumbnail").status_code == 404
    assert service.client.get("/v1/items/..%2F..%2Fetc%2Fpasswd/thumbnail").status_code == 404
