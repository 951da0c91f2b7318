"""A gallery that grows while served: a new index version swaps in under load without a failed request."""

from __future__ import annotations

import time

from factory.index.versions import IndexVersions
from tests.serve.conftest import hammering, until_more


def _wait_for_items(service, n: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while service.client.get("/readyz").json()["gallery_items"] != n and time.monotonic() < deadline:
        time.sleep(0.1)
    assert service.client.get("/readyz").json()["gallery_items"] == n


def test_a_new_index_version_is_served_without_a_failed_request(service):
    versions = IndexVersions(service.index)
    first, index = versions.open()
    before = len(index)
    spec = service.specs[0]
    # The new item: a copy of one of this product's gallery vectors, under a new id. A query for the product
    # then ranks the two equally, so once the new version is served the copy shows up in its answers.
    own = next(i for i in index.ids if i.startswith(spec.concept_id + "-"))
    index.add(index.vectors_of([own]), [f"{own}-copy"], [index.uris[index.position(own)]])
    with hammering(service, spec) as results:
        until_more(results, 10)
        added = versions.commit(index)
        _wait_for_items(service, before + 1)
        until_more(results, 10)
    assert added == first + 1
    assert not [r for r in results if r[0] != 200], results[:5]
    r = service.client.post("/v1/retrieve", json={"query": f"a <concept:{spec.concept_id}> {spec.parent}", "top_k": 2})
    assert r.status_code == 200 and f"{own}-copy" in {it["id"] for it in r.json()["items"]}
    # Back to the first version's items as a newer version (versions are immutable), so other tests see
    # the gallery they expect whatever the order.
    versions.commit(versions.open(first)[1])
    _wait_for_items(service, before)
