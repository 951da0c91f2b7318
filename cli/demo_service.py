"""The demo's last act: index the gallery, start the service, and send it one request of each kind."""

from __future__ import annotations

import base64
import os
import secrets
import time

KEY_ENV = "TOKENFACTORY_DEMO_API_KEY"


def serve_tour(args, bucket: str, catalog_uri: str, registry_uri: str, s3, s3_env: dict, specs, intent: str) -> dict:
    """Index, serve, call every endpoint over HTTP; returns a summary of each answer. ``intent`` is a
    scene the first product appears in within the gallery, so its retrieval has a right answer."""
    import httpx
    from rich.console import Console

    from jobs.index import IndexConfig, build_index
    from serve.app import start, stop
    from serve.settings import ServeSettings

    console = Console()
    index_uri = f"{bucket}/index"
    build_index(IndexConfig(catalog_uri, index_uri, backbone=args.backbone, weights=args.weights, s3=s3))
    os.environ[KEY_ENV] = secrets.token_urlsafe(24)  # a fresh admin key for this run, never printed
    # No S3 keys in the Serve config (anyone who can read it would see them): the replicas read them from
    # an owner-only file whose path is all the config holds.
    settings = ServeSettings(
        registry=registry_uri,
        index=index_uri,
        backbone=args.backbone,
        weights=args.weights,
        admin_key_env=KEY_ENV,
        poll_s=5,
        s3_env_file=_private_json(s3_env),
    )
    url = start(settings, port=args.port)
    console.print(f"[demo] service ready at {url} (OpenAPI at {url}/openapi.json, studio at {url}/studio)")
    console.print(f"[demo] GAIR studio: {url}/studio  (compose, preview and refine queries in a browser)")
    try:
        with httpx.Client(base_url=url, timeout=300.0) as client:
            summary = _tour(client, specs, args, console, intent)
        if args.keep_serving:
            console.print(f"[demo] serving at {url} until Ctrl-C (registry {registry_uri}, index {index_uri})")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return summary
    finally:
        stop()
        console.print("[demo] service stopped")


def _private_json(values: dict) -> str:
    """Write ``values`` to a fresh owner-only file (in an owner-only folder); returns its path."""
    import json
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="tokenfactory-secrets-"), "s3-env.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(values, f)
    return path


def _tour(client, specs, args, console, intent: str) -> dict:
    from rich.table import Table

    from factory import storage

    spec = specs[0]
    m = f"<concept:{spec.concept_id}>"
    image = base64.b64encode(
        storage.read_bytes(spec.heldout_uris[0] if spec.heldout_uris else spec.image_uris[0])
    ).decode()
    admin = {"Authorization": f"Bearer {os.environ[KEY_ENV]}"}
    calls = [
        ("GET /readyz", "get", "/readyz", None, {}),
        ("GET /v1/tokens", "get", "/v1/tokens", None, {}),
        ("POST /v1/classify", "post", "/v1/classify", {"image": image, "parent": spec.parent, "top_k": 3}, {}),
        (
            "POST /v1/retrieve",
            "post",
            "/v1/retrieve",
            {"query": f"a photo of a {m} {spec.parent} {intent}", "top_k": 3},
            {},
        ),
        (
            "POST /v1/generate",
            "post",
            "/v1/generate",
            {"prompt": f"a {m} {spec.parent} in the snow", "n": 2, "steps": args.sample_steps, "seed": args.seed},
            {},
        ),
        (
            "POST /v1/gair",
            "post",
            "/v1/gair",
            {
                "concept_ids": [spec.concept_id],
                "intent": "on the grass",
                "top_k": 3,
                "previews": 1,
                "steps": min(args.sample_steps, 20),
            },
            {},
        ),
        ("POST /v1/admin/reload", "post", "/v1/admin/reload", {}, admin),
    ]
    table = Table(title=f"the service, one request of each kind (concept {spec.concept_id})")
    for col in ("request", "status", "ms", "answer"):
        table.add_column(col)
    summary = {}
    for name, method, path, body, headers in calls:
        t0 = time.perf_counter()
        r = client.post(path, json=body, headers=headers) if method == "post" else client.get(path, headers=headers)
        ms = (time.perf_counter() - t0) * 1000
        answer = _describe(path, r, spec, args)
        summary[name] = {"status": r.status_code, "ms": round(ms, 1), "answer": answer}
        table.add_row(name, str(r.status_code), f"{ms:.0f}", answer)
    console.print(table)
    return summary


def _describe(path: str, r, spec, args) -> str:
    if r.status_code != 200:
        return r.text[:200]
    body = r.json()
    if path == "/readyz":
        return f"registry version {body['registry_version']}, {body['gallery_items']} gallery items"
    if path == "/v1/tokens":
        return f"{len(body['tokens'])} tokens"
    if path == "/v1/classify":
        return (
            ", ".join(f"{c['concept_id']} {c['score']:.2f}" for c in body["concepts"]) + f"  (truth: {spec.concept_id})"
        )
    if path == "/v1/retrieve":
        return ", ".join(f"{it['id']} {it['score']:.2f}" for it in body["items"]) + f"  (wanted: {spec.concept_id}-…)"
    if path == "/v1/generate":
        for i, b64 in enumerate(body["images"]):
            with open(os.path.join(args.out, f"service-generate-{i}.png"), "wb") as f:
                f.write(base64.b64decode(b64))
        return f"{len(body['images'])} PNGs -> {args.out}/service-generate-*.png"
    if path == "/v1/gair":
        steps = " ".join(f"α={s['alpha']:g}:{s['score']:.2f}" for s in body["steps"])
        return f"chose α={body['alpha']:g} ({steps}); top: {body['ranking'][0]['id']}"
    return str(body)[:200]
