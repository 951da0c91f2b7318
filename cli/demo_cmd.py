"""`tokenfactory demo`: the main job on the embedded default, end to end, in minutes on a laptop.

1. starts an embedded S3 server (SeaweedFS, loopback, its own data folder, stopped at the end);
2. renders a sample catalog of the fashion world straight into it;
3. runs `tokenfactory onboard` on a local Ray cluster, reading ``s3://`` and writing the token registry
   to ``s3://`` (TI + CE losses, subspace projection, on `fashion-mini`);
4. prints held-out classification accuracy of the tokens against the parent word and the caption;
5. writes a PNG: few-shot images beside images generated from each token alone and composed with words;
6. indexes the catalog's gallery (`tokenfactory index`, Ray Data), starts the online service (Ray Serve,
   `serve/`), sends one request of each kind with a real HTTP client, prints the answers and stops it
   (``--keep-serving``, i.e. `make serve`, keeps it up until Ctrl-C).
"""

from __future__ import annotations

import io
import json
import logging
import os

log = logging.getLogger(__name__)

COMPOSITIONS = ("on the beach", "in the snow")


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job on the embedded default: world -> S3 -> onboard on Ray -> table + PNG -> index -> service",
        description=__doc__,
    )
    p.add_argument(
        "--out", default="out/demo", help="local folder for the report, the table and the PNG (default: out/demo)"
    )
    p.add_argument("--backbone", default="fashion-mini", help="backbone name (default: fashion-mini)")
    p.add_argument("--weights", default=None, help="weights URI (default: the backbone's own)")
    p.add_argument("--products", type=int, default=24, help="products in the sample catalog (default: 24)")
    p.add_argument("--shots", type=int, default=5, help="few-shot images per product (default: 5)")
    p.add_argument("--heldout", type=int, default=10, help="held-out images per product (default: 10)")
    p.add_argument("--steps", type=int, default=150, help="learner steps per chunk of concepts (default: 150)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: 2)")
    p.add_argument("--concepts-per-step", type=int, default=6, help="concepts learned together (default: 6)")
    p.add_argument("--figure-products", type=int, default=4, help="products drawn in the PNG (default: 4)")
    p.add_argument("--sample-steps", type=int, default=40, help="DDIM steps for the PNG's images (default: 40)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of catalog, learning and sampling (default: 0)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the service (default: 8000)")
    p.add_argument("--keep-serving", action="store_true", help="keep the service (and the embedded S3) up until Ctrl-C")
    p.add_argument("--no-serve", action="store_true", help="stop after the table and the PNG (no index, no service)")
    p.set_defaults(func=run)


def run(args) -> int:
    from cli.arguments import absolute_uri, effective_config
    from jobs.s3server import SeaweedS3

    args.out = absolute_uri(args.out)
    os.makedirs(args.out, exist_ok=True)
    print("[demo] config: " + json.dumps(effective_config(args), sort_keys=True), flush=True)
    with SeaweedS3() as server:
        bucket = server.create_bucket("tokenfactory-demo")
        print(f"[demo] embedded S3 (SeaweedFS) at {server.endpoint_url}, bucket {bucket}", flush=True)
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)  # the onboarding job (and its Ray workers) read S3 settings from env
        try:
            return _run(args, bucket, server.s3_options, server.env)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _run(args, bucket: str, s3, s3_env: dict) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from factory import storage
    from factory.backbones import load_backbone
    from factory.catalogs import read_concepts
    from factory.evaluation.methods import classification
    from factory.onboarding import heldout_features
    from factory.registry import TokenRegistry
    from factory.world import write_catalog
    from jobs.onboard import OnboardConfig, onboard, onboard_learner

    console = Console()
    catalog_uri, registry_uri = f"{bucket}/catalog", f"{bucket}/registry"
    write_catalog(catalog_uri, seed=args.seed, products=args.products, shots=args.shots, heldout=args.heldout, s3=s3)
    console.print(f"[demo] sample catalog of {args.products} products written to {catalog_uri}")

    report_path = os.path.join(args.out, "onboard-report.json")
    onboard(
        OnboardConfig(
            catalog_uri,
            registry_uri,
            onboard_learner(steps=args.steps, seed=args.seed),
            backbone=args.backbone,
            weights=args.weights,
            workers=args.workers,
            concepts_per_step=args.concepts_per_step,
            report=report_path,
            run_id=f"demo-seed{args.seed}",
            s3=s3,
        )
    )

    version = TokenRegistry(registry_uri, s3).open()
    tokens = {r.concept_id: torch.tensor(r.vector) for r in version.records()}
    specs = read_concepts(catalog_uri, s3)
    backbone = load_backbone(args.backbone, weights=args.weights)
    heldout = heldout_features(backbone, specs, s3)
    pairs = [(s.concept_id, s.parent) for s in specs if s.concept_id in tokens]
    captions = {s.concept_id: s.caption for s in specs}
    scores = classification(backbone, pairs, heldout, captions, {"token": tokens})  # the evaluation's own scoring
    accuracy = {
        name: scores[key]["accuracy"]
        for name, key in (
            ("parent word", "parent_word"),
            ("hand-written caption", "caption"),
            ("learned token", "token"),
        )
    }
    table = Table(
        title=f"held-out classification among products of the same category "
        f"({len(pairs)} products, registry version {version.version})"
    )
    table.add_column("prompt")
    table.add_column("accuracy", justify="right")
    for name, acc in accuracy.items():
        table.add_row(name, f"{acc:.3f}")
    console.print(table)

    figure = os.path.join(args.out, "tokens.png")
    _draw(backbone, specs, tokens, args, figure, s3)
    result = {
        "registry_version": version.version,
        "accuracy": accuracy,
        "products": len(specs),
        "learned": len(tokens),
        "figure": figure,
        "onboard_report": report_path,
    }
    if not args.no_serve:
        from cli.demo_service import serve_tour
        from factory.catalogs import read_world_catalog

        queries = read_world_catalog(catalog_uri, s3).queries  # a scene the first product really appears in
        intent = next((q.intent for q in queries if q.concept_id == specs[0].concept_id), "on the beach")
        result["service"] = serve_tour(args, bucket, catalog_uri, registry_uri, s3, s3_env, specs, intent)
    storage.write_json(os.path.join(args.out, "demo.json"), result)
    console.print(f"[demo] picture: {figure}\n[demo] results: {os.path.join(args.out, 'demo.json')}")
    return 0


def _draw(backbone, specs, tokens, args, path, s3) -> None:
    import numpy as np
    import torch

    from factory.figures import image_grid
    from factory.images import to_uint8
    from factory.onboarding import image_size_for, load_images

    chosen = [s for s in specs if s.concept_id in tokens][: args.figure_products]
    prompts = []
    for s in chosen:
        m = f"<concept:{s.concept_id}>"
        prompts += [f"a photo of a {m} {s.parent}"] + [f"a {m} {s.parent} {c}" for c in COMPOSITIONS]
    with torch.no_grad():
        cond = backbone.encode_prompts(prompts, tokens).hidden
        uncond = backbone.encode_prompts([""]).hidden
        images = to_uint8(
            backbone.generator.sample(cond, uncond, steps=args.sample_steps, guidance=args.guidance, seed=args.seed)
        )
    shots = load_images({s.concept_id: s.image_uris[:3] for s in chosen}, image_size_for(backbone.config), s3)
    owners = np.array(shots.owners)
    per = 1 + len(COMPOSITIONS)
    rows = [
        (s.concept_id, list(shots.images[owners == s.concept_id]) + list(images[i * per : (i + 1) * per]))
        for i, s in enumerate(chosen)
    ]
    titles = ["few-shot"] * 3 + ["token alone"] + [f"token {c}" for c in COMPOSITIONS]
    buf = io.BytesIO()
    image_grid(rows, titles, scale=3, label_w=110).save(buf, format="PNG")
    with open(path, "wb") as f:
        f.write(buf.getvalue())
