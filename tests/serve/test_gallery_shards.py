"""A sharded gallery served: the session's gallery split into 2 shards, each its own GalleryIndex deployment,
served by a second app of the same code beside the session's (same registry, same backbone), whose ingress
fans each query out and merges. Its answers must be the unsharded app's."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.serve.conftest import CLIENT_HEADERS, CLIENT_KEY_ENV, TEST_LIMITS

APP, PREFIX, SHARDS = "tokenfactory-sharded", "/sharded", 2
# Seven more replicas to start (each imports torch and the backbone) on a 2-core machine, perhaps after the
# session's own app: minutes, not the default 300 s.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def sharded(service, s3_server, tmp_path_factory):
    from ray import serve

    from factory.index.sharded import ShardedIndex
    from factory.index.versions import IndexVersions
    from serve.app import build_app
    from serve.settings import ServeSettings

    root = str(tmp_path_factory.mktemp("sharded-gallery"))
    index = IndexVersions(service.index).open()[1]
    parts = ShardedIndex.from_index(index, SHARDS)
    assert all(len(s) for s in parts.shards)  # both shards hold items, so both must answer
    parts.save(root)
    settings = ServeSettings(
        registry=service.registry,
        index=root,
        gallery_shards=SHARDS,
        backbone="fashion-mini",
        api_key_env=CLIENT_KEY_ENV,
        require_key=True,
        poll_s=0,
        max_batch_size=16,
        limits=TEST_LIMITS,
        replica_env=s3_server.env,
    )
    serve.run(build_app(settings), name=APP, route_prefix=PREFIX, blocking=False)
    client = httpx.Client(base_url=service.url + PREFIX, timeout=120.0, headers=CLIENT_HEADERS)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if client.get("/readyz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    try:
        yield client, index
    finally:
        client.close()
        serve.delete(APP)


def test_ready_counts_the_items_of_every_shard(sharded):
    client, index = sharded
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["gallery_items"] == len(index)


def test_merged_answers_equal_the_unsharded_apps(service, sharded):
    client, index = sharded
    for spec in service.specs:
        for top_k in (3, len(index)):  # all items: every item of both shards, in the unsharded order
            body = {"query": f"a photo of a <concept:{spec.concept_id}> {spec.parent}", "top_k": top_k}
            whole, merged = service.client.post("/v1/retrieve", json=body), client.post("/v1/retrieve", json=body)
            assert whole.status_code == merged.status_code == 200, merged.text
            a, b = whole.json()["items"], merged.json()["items"]
            assert [(i["id"], i["uri"]) for i in b] == [(i["id"], i["uri"]) for i in a]
            assert [i["score"] for i in b] == pytest.approx([i["score"] for i in a], abs=1e-5)


def test_an_items_thumbnail_is_found_in_its_shard(sharded):
    from factory.index.sharded import shard_of

    client, index = sharded
    items = list(index.ids)[:6]
    assert {shard_of(i, SHARDS) for i in items} == {0, 1}  # items of both shards
    for item in items:
        r = client.get(f"/v1/items/{item}/thumbnail")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    assert client.get("/v1/items/no-such-item/thumbnail").status_code == 404
