"""Hot reload: replicas move to a new registry version without failing a single in-flight request.

These tests commit new versions into the package's shared registry; each pins the service back to the
version it found (`served_version_restored`), so no other module depends on running before or after them.
"""

from __future__ import annotations

import pytest

from tests.serve.conftest import hammering, learn_version, until_more


@pytest.fixture
def served_version_restored(service):
    """The version served before the test; afterwards the service is pinned back to it."""
    before = service.client.get("/readyz").json()["registry_version"]
    yield before
    r = service.client.post("/v1/admin/reload", json={"version": before}, headers=service.admin())
    assert r.status_code == 200 and r.json()["registry_version"] == before, r.text


def test_reload_while_clients_send_requests(service, served_version_restored):
    old, before = service.specs[0], served_version_restored
    new = next(s for s in service.catalog.concepts if s.concept_id not in {x.concept_id for x in service.specs})
    with hammering(service, old) as results:
        until_more(results, 10)
        version = learn_version(service.registry, [*service.specs, new], "serve-test-v2", service.backbone)
        assert version > before
        r = service.client.post("/v1/admin/reload", json={}, headers=service.admin())
        assert r.status_code == 200, r.text
        assert r.json() == {"registry_version": version, "previous_version": before}
        until_more(results, 20)

    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:5]
    versions = [v for _, v in results]
    assert before in versions and version in versions and len(results) > 20
    assert versions[versions.index(version) :].count(before) <= 6  # at most the few requests in flight at the switch
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
    with hammering(service, service.specs[0]) as results:
        until_more(results, 10)
        r = service.client.post("/v1/admin/reload", json={}, headers=service.admin())
        assert r.status_code == 409 and r.json()["error"]["code"] == "version_unreadable", r.text
        assert f"still serving version {served}" in r.json()["error"]["message"]
        until_more(results, 20)
    assert len(results) > 10 and not [r for r in results if r[0] != 200]
    assert {v for _, v in results} == {served}
    assert service.client.get("/readyz").json()["registry_version"] == served
