"""One real Ray Serve app over HTTP on loopback for the whole package, on the session's Ray cluster.

The registry holds tokens learned here on `fashion-mini` (CE losses only, so learning takes seconds)
for products of a sample catalog, one per look-alike group, so every request has one unambiguous right
answer (how well tokens separate look-alikes is the evaluation's business, not the server's). The
gallery index holds those products' gallery images and distractors of other categories.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass

import httpx
import pytest

API_KEY = "test-key-0123456789abcdef"  # the admin key
KEY_ENV = "TOKENFACTORY_TEST_API_KEY"
CLIENT_KEY = "client-key-0123456789abcdef"  # the clients' key: this app requires it on every /v1 route
CLIENT_KEY_ENV = "TOKENFACTORY_TEST_CLIENT_KEY"
CLIENT_HEADERS = {"Authorization": f"Bearer {CLIENT_KEY}"}
# Generous rates, so the tests' own traffic from one address is never throttled; a small costly
# concurrency cap, which test_admission.py fills on purpose.
TEST_LIMITS = dict(
    cheap_per_s=10_000, cheap_burst=10_000, costly_per_s=1_000, costly_burst=1_000, max_concurrent_costly=2
)


def learn_version(registry_uri: str, specs, run_id: str, backbone, steps: int = 120) -> int:
    """Learn tokens for ``specs`` in-process (CE losses only: seconds) and commit them as one version."""
    from factory.learner import LearnerConfig
    from factory.losses import LossWeights
    from factory.onboarding import learn_and_commit
    from factory.registry import TokenRegistry

    config = LearnerConfig(steps=steps, weights=LossWeights(ti=0.0, ce=1.0, image_ce=1.0), log_every=0)
    return learn_and_commit(TokenRegistry(registry_uri), specs, run_id, backbone, config)


@dataclass
class Service:
    url: str
    client: httpx.Client
    catalog: object  # factory.catalogs.Catalog
    registry: str
    backbone: object
    specs: list
    bucket: str  # s3://… of this app's image_uri tests: <bucket>/allowed/ is the one allowed prefix
    s3: object
    index: str  # the root of the gallery's index versions

    def admin(self) -> dict:
        return {"Authorization": f"Bearer {API_KEY}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="package")
def service(ray_cluster, tmp_path_factory, s3_server):
    from factory.backbones import load_backbone
    from factory.catalogs import read_world_catalog
    from factory.gallery import index_images
    from factory.index.versions import IndexVersions
    from factory.world import write_catalog
    from serve.app import start, stop
    from serve.settings import ServeSettings

    root = tmp_path_factory.mktemp("serve")
    catalog_uri, registry, index = str(root / "catalog"), str(root / "registry"), str(root / "index")
    write_catalog(catalog_uri, seed=5, products=14, shots=4, heldout=3, contexts=2, distractors=12)
    catalog = read_world_catalog(catalog_uri)
    backbone = load_backbone("fashion-mini")
    one_per_group = list({s.attributes["group"]: s for s in catalog.concepts}.values())
    specs = one_per_group[:5]  # the next one is learned into version 2 by the reload test
    chosen = {s.concept_id for s in one_per_group}
    # Distractors of a learned product's category could be look-alikes by chance (a random colourway
    # near the product's): keep only those of other categories, so every query has one right answer.
    categories = {s.parent for s in one_per_group}
    catalog.gallery = [
        r
        for r in catalog.gallery
        if r.concept_id in chosen or (r.attributes.get("distractor") == "1" and r.parent not in categories)
    ]
    catalog.concepts = one_per_group
    learn_version(registry, specs, "serve-test-v1", backbone)
    gallery_index, rejected = index_images(backbone, {r.attributes["item"]: r.image_uri for r in catalog.gallery})
    assert not rejected
    IndexVersions(index).commit(gallery_index)  # a root of index versions: the service follows the newest
    os.environ[KEY_ENV], os.environ[CLIENT_KEY_ENV] = API_KEY, CLIENT_KEY
    bucket = s3_server.create_bucket("serve-images")
    settings = ServeSettings(
        registry=registry,
        index=index,
        backbone="fashion-mini",
        admin_key_env=KEY_ENV,
        api_key_env=CLIENT_KEY_ENV,
        require_key=True,
        poll_s=0,
        index_check_s=0.2,
        max_batch_size=16,
        limits=TEST_LIMITS,
        image_uri_prefixes=[f"{bucket}/allowed/"],
        replica_env=s3_server.env,
    )
    url = start(settings, port=_free_port())
    with httpx.Client(base_url=url, timeout=120.0, headers=CLIENT_HEADERS) as client:
        yield Service(url, client, catalog, registry, backbone, specs, bucket, s3_server.s3_options, index)
    stop()


# Load while something changes: threads sending requests, and a wait for more answers (polls, no sleeps).
def _hammer(url: str, concept_id: str, parent: str, stop: threading.Event, results: list) -> None:
    with httpx.Client(base_url=url, timeout=120.0, headers=CLIENT_HEADERS) as c:
        while not stop.is_set():
            for method, path, body in (
                ("post", "/v1/retrieve", {"query": f"a <concept:{concept_id}> {parent}", "top_k": 3}),
                ("get", "/v1/tokens", None),
            ):
                try:
                    r = c.post(path, json=body) if method == "post" else c.get(path)
                    results.append((r.status_code, r.json().get("registry_version")))
                except httpx.HTTPError as e:
                    results.append((repr(e), None))


@contextlib.contextmanager
def hammering(service, spec, n: int = 3):
    """``n`` threads sending requests about ``spec`` until the block ends; yields their (status, version)s."""
    stop, results = threading.Event(), []
    threads = [
        threading.Thread(target=_hammer, args=(service.url, spec.concept_id, spec.parent, stop, results))
        for _ in range(n)
    ]
    for t in threads:
        t.start()
    try:
        yield results
    finally:
        stop.set()
        for t in threads:
            t.join()


def until_more(results: list, more: int, timeout_s: float = 60.0) -> None:
    """Wait (polling, with a deadline) until ``more`` further answers have come in."""
    target, deadline = len(results) + more, time.monotonic() + timeout_s
    while len(results) < target and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(results) >= target, f"only {len(results)} answers in {timeout_s:.0f}s"
