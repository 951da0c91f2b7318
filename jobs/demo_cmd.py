"""`tokenfactory demo`: the main job on the embedded default, end to end, in minutes on a laptop.

Renders a sample catalog of the fashion world, learns one token per product on `fashion-mini`
(TI + CE losses, subspace projection), commits a registry version, prints held-out classification
accuracy of the tokens against the parent word and the hand-written caption, and writes a PNG of
few-shot images beside images generated from the tokens, alone and composed with other words.
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid

log = logging.getLogger(__name__)

COMPOSITIONS = ("on the beach", "in the snow")


def register(sub) -> None:
    p = sub.add_parser("demo", help="render a sample catalog, learn its tokens, evaluate, draw a picture",
                       description=__doc__)
    p.add_argument("--out", default="out/demo", help="output folder (URI) for catalog, registry, report, PNG (default: out/demo)")
    p.add_argument("--backbone", default="fashion-mini", help="backbone name (default: fashion-mini)")
    p.add_argument("--weights", default=None, help="weights URI (default: the backbone's own)")
    p.add_argument("--products", type=int, default=24, help="products in the sample catalog (default: 24)")
    p.add_argument("--shots", type=int, default=5, help="few-shot images per product (default: 5)")
    p.add_argument("--heldout", type=int, default=10, help="held-out images per product (default: 10)")
    p.add_argument("--steps", type=int, default=150, help="learner steps per chunk of concepts (default: 150)")
    p.add_argument("--lr", type=float, default=0.01, help="learner Adam learning rate (default: 0.01)")
    p.add_argument("--concepts-per-step", type=int, default=8, help="concepts learned together (default: 8)")
    p.add_argument("--lambda-ti", type=float, default=1.0, help="weight of the textual-inversion loss (default: 1)")
    p.add_argument("--lambda-ce", type=float, default=1.0, help="weight of the text-side CE loss (default: 1)")
    p.add_argument("--lambda-image-ce", type=float, default=1.0,
                   help="weight of the image-side CE among concepts learned together (default: 1)")
    p.add_argument("--parametrization", choices=["projected", "free"], default="projected",
                   help="token parametrisation (default: projected)")
    p.add_argument("--figure-products", type=int, default=4, help="products drawn in the PNG (default: 4)")
    p.add_argument("--sample-steps", type=int, default=40, help="DDIM steps for the PNG's images (default: 40)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of catalog, learning and sampling (default: 0)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    from factory import storage
    from factory.backbones import load_backbone
    from factory.evaluation import heldout_accuracy
    from factory.learner import LearnerConfig, to_record
    from factory.losses import LossWeights
    from factory.onboarding import heldout_features, learn_in_chunks, negative_banks, prepare_concepts
    from factory.registry import TokenRegistry
    from factory.world import read_catalog, write_catalog

    from jobs.cli import effective_config

    console = Console()
    console.print("demo config: " + json.dumps(effective_config(args), sort_keys=True))
    torch.manual_seed(args.seed)
    timings = {}
    t0 = time.perf_counter()
    catalog_uri = storage.join(args.out, "catalog")
    write_catalog(catalog_uri, seed=args.seed, products=args.products, shots=args.shots, heldout=args.heldout)
    catalog = read_catalog(catalog_uri)
    timings["catalog_s"] = time.perf_counter() - t0
    console.print(f"catalog: {len(catalog.concepts)} products at {catalog_uri}")

    t0 = time.perf_counter()
    backbone = load_backbone(args.backbone, weights=args.weights)
    concepts, loaded, skipped = prepare_concepts(backbone, catalog.concepts)
    heldout = heldout_features(backbone, catalog.concepts)
    timings["encode_s"] = time.perf_counter() - t0
    for uri, why in loaded.rejected:
        console.print(f"[yellow]rejected image[/] {uri}: {why}")

    config = LearnerConfig(steps=args.steps, lr=args.lr, seed=args.seed, parametrization=args.parametrization,
                           weights=LossWeights(ti=args.lambda_ti, ce=args.lambda_ce, image_ce=args.lambda_image_ce),
                           log_every=0)
    console.print("learner config: " + json.dumps({**vars(config), "weights": vars(config.weights)}, default=str))
    run_id = f"demo-{uuid.uuid4().hex[:8]}"
    registry = TokenRegistry(storage.join(args.out, "registry"))
    writer = registry.begin(run_id, backbone.name, backbone.fingerprint(), config={"demo": effective_config(args)})
    t0 = time.perf_counter()
    with tqdm(total=len(concepts), desc="learning tokens", unit="concept") as bar:
        def on_chunk(tokens):
            writer.write_shard(f"chunk-{bar.n:05d}", [to_record(t, backbone, run_id) for t in tokens])
            bar.update(len(tokens))
        learned = learn_in_chunks(backbone, concepts, negative_banks(concepts), config, args.concepts_per_step,
                                  on_chunk=on_chunk)
    timings["learn_s"] = time.perf_counter() - t0
    version = writer.commit()
    console.print(f"registry version {version} committed at {registry.root_uri}")

    tokens = {t.concept_id: t.vector for t in learned}
    pairs = [(s.concept_id, s.parent) for s in catalog.concepts if s.concept_id in tokens]
    captions = {s.concept_id: s.caption for s in catalog.concepts}
    tpl = config.templates
    methods = {
        "parent word": (lambda c, p: [t.format(concept="", parent=p).replace("  ", " ") for t in tpl], None),
        "caption": (lambda c, p: [captions[c]], None),
        "token (TI+CE, projected)": (lambda c, p: [t.format(concept=f"<concept:{c}>", parent=p) for t in tpl], tokens),
    }
    results = {name: heldout_accuracy(backbone, pairs, heldout, fn, toks)[0] for name, (fn, toks) in methods.items()}
    table = Table(title=f"held-out classification among products of the same category ({len(pairs)} products)")
    table.add_column("prompt")
    table.add_column("accuracy", justify="right")
    for name, acc in results.items():
        table.add_row(name, f"{acc:.3f}")
    console.print(table)

    t0 = time.perf_counter()
    figure = storage.join(args.out, "tokens.png")
    _draw(backbone, catalog, loaded, learned, tokens, args, figure)
    timings["figure_s"] = time.perf_counter() - t0
    report = {"run_id": run_id, "version": version, "accuracy": results, "timings": timings,
              "products": len(catalog.concepts), "learned": len(learned), "skipped": skipped,
              "norm_ratio_mean": sum(t.metrics["norm_ratio"] for t in learned) / max(1, len(learned))}
    storage.write_json(storage.join(args.out, "report.json"), report)
    console.print(f"picture: {figure}\nreport: {storage.join(args.out, 'report.json')}  timings: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    return 0


def _draw(backbone, catalog, loaded, learned, tokens, args, uri) -> None:
    import numpy as np
    import torch

    from factory import storage
    from factory.figures import image_grid, to_uint8

    chosen = [t for t in learned][: args.figure_products]
    prompts = []
    for t in chosen:
        m = f"<concept:{t.concept_id}>"
        prompts += [f"a photo of a {m} {t.parent}"] + [f"a {m} {t.parent} {c}" for c in COMPOSITIONS]
    with torch.no_grad():
        cond = backbone.encode_prompts(prompts, tokens).hidden
        uncond = backbone.encode_prompts([""]).hidden
        images = to_uint8(backbone.generator.sample(cond, uncond, steps=args.sample_steps, guidance=args.guidance,
                                                    seed=args.seed))
    owners = np.array(loaded.owners)
    rows = []
    per = 1 + len(COMPOSITIONS)
    for i, t in enumerate(chosen):
        shots = list(loaded.images[owners == t.concept_id][:3])
        rows.append((t.concept_id, shots + list(images[i * per: (i + 1) * per])))
    titles = ["few-shot"] * 3 + ["token alone"] + [f"token {c}" for c in COMPOSITIONS]
    import io

    buf = io.BytesIO()
    image_grid(rows, titles, scale=3, label_w=110).save(buf, format="PNG")
    storage.write_bytes(uri, buf.getvalue())
