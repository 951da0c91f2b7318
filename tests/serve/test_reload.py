"""Hot reload: replicas move to a new registry version without failing a single in-flight request.

These tests commit new versions into the package's shared registry; each pins the service back to the
version it found (`served_version_restored`), so no other module depends on running before or after them.
"""
from __future__ import annotations

import contextlib
import threading
import time

import httpx
import pytest

from tests.serve.conftest import CLIENT_HEADERS, learn_version


@pytest.fixture
def served_version_restored(service):
    """The version served before the test; afterwards the service is pinned back to it."""
    before = service.client.get("/readyz").json()["registry_version"]
    yield before
    r = service.client.post("/v1/admin/reload", json={"version": before}, headers=service.admin())
    assert r.status_code == 200 and r.json()["registry_version"] == before, r.text


def _hammer(url: str, concept_id: str, parent: str, stop: threading.Event, results: list) -> None:
    with httpx.Client(base_url=url, timeout=120.0, headers=CLIENT_HEADERS) as c:
        while not stop.is_set():
            for method, path, body in (("post", "/v1/retrieve", {"query": f"a <concept:{concept_id}> {parent}", "top_k": 3}),
                                       ("get", "/v1/tokens", None)):
                try:
                    r = c.post(path, json=body) if method == "post" else c.get(path)
                    results.append((r.status_code, r.json().get("registry_version")))
                except httpx.HTTPError as e:
                    results.append((repr(e), None))


@contextlib.contextmanager
def _clients(service, spec, n: int = 3):
    """``n`` threads sending requests about ``spec`` until the block ends; yields their (status, version)s."""
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=_hammer, args=(service.url, spec.concept_id, spec.parent, stop, results))
               for _ in range(n)]
    for t in threads:
        t.start()
    try:
        yield results
    finally:
        stop.set()
        for t in threads:
            t.join()


def _until_more(results: list, more: int, timeout_s: float = 60.0) -> None:
    """Wait (polling, with a deadline) until ``more`` further answers have come in."""
    target, deadline = len(results) + more, time.monotonic() + timeout_s
    while len(results) < target and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(results) >= target, f"only {len(results)} answers in {timeout_s:.0f}s"


def test_reload_while_clients_send_requests(service, served_version_restored):
    old, before = service.specs[0], served_version_restored
    new = next(s for s in service.catalog.concepts if s.concept_id not in {x.concept_id for x in service.specs})
    with _clients(service, old) as results:
        _until_more(results, 10)
        version = learn_version(service.registry, [*service.specs, new], "serve-test-v2", service.backbone)
        assert version > before
        r = service.client.post("/v1/admin/reload", json={}, headers=service.admin())
        assert r.status_code == 200, r.text
        assert r.json() == {"registry_version": version, "previous_version": before}
        _until_more(results, 20)

    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:5]
    versions = [v for _, v in results]
    assert before in versions and version in versions and len(results) > 20
    assert versions[versions.index(version):].count(before) <= 6  # at most the few requests in flight at the switch
    # the new concept is served afterwards, by every endpoint that uses tokens
    assert new.concept_id in {t["concept_id"] for t in service.client.get("/v1/tokens").json()["tokens"]}
    r = service.client.post("/v1/retrieve", json={"query": f"a <concept:{new.concept_id}> {new.parent}", "top_k": 2})
    assert r.status_code == 200 and r.json()["registry_version"] == version
    assert all(it["id"].startswith(new.concept_id + "-") for it in r.json()["items"])
    r = service.client.post("/v1/generate", json={"prompt": f"a <concept:{new.concept_id}> {new.parent}", "steps": 2})
    assert r.status_code == 200 and r.json()["registry_version"] == version
    assert service.client.get("/readyz").json()["registry_version"] == version


def test_a_corrupt_newest_version_under_load_fails_no_request(service, served_version_restored):
    from pathlib import Path

    from factory.registry import TokenRegistry

    served = service.client.get("/readyz").json()["registry_version"]
    version = learn_version(service.registry, service.specs, "serve-test-corrupt", service.backbone, steps=5)
    shard = next(Path(TokenRegistry(service.registry).version_uri(version)).glob("tokens-*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-16] + b"\0" * 16)  # the manifest parses, the checksum does not
    with _clients(service, service.specs[0]) as results:
        _until_more(results, 10)
        r = service.client.post("/v1/admin/reload", json={}, headers=service.admin())
        assert r.status_code == 409 and r.json()["error"]["code"] == "version_unreadable", r.text
        assert f"still serving version {served}" in r.json()["error"]["message"]
        _until_more(results, 20)
    assert len(results) > 10 and not [r for r in results if r[0] != 200]
    assert {v for _, v in results} == {served}
    assert service.client.get("/readyz").json()["registry_version"] == served
