"""`tokenfactory index`: embed a gallery's images with Ray Data batch inference into a vector index.

``--gallery`` is the root (or manifest.json) of a catalog written by `tokenfactory world` (its gallery
table is used), a bare gallery table (CatalogRow Parquet/JSONL), or a folder of image files (S3 or
local; item id = file name without extension), or the ``<split>_fsl_train.txt`` of a PerVL-DeepFashion2
layout (its retrieval images). Images are read and validated by tasks and encoded by
an actor pool; bad images are listed, never fatal. The index (exact, or FAISS HNSW/IVF) is written to
``--out`` with item ids and URIs.
"""
from __future__ import annotations

import json
import os
import time


def register(sub) -> None:
    from jobs.arguments import add_s3_arguments

    p = sub.add_parser("index", help="embed gallery images into a vector index (Ray Data batch inference)",
                       description=__doc__)
    p.add_argument("--gallery", required=True, help="catalog root / manifest.json, a gallery Parquet/JSONL, a PerVL <split>_fsl_train.txt, or a folder of images")
    p.add_argument("--out", required=True, help="URI of the index folder to write")
    p.add_argument("--backbone", default="fashion-mini",
                   help="backbone: a registered name or a config file/URI (default: fashion-mini)")
    p.add_argument("--weights", default=None, help="backbone weights URI or ROOT (default: the config's own)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per image-encoder actor")
    p.add_argument("--allow-outside-catalog", action="store_true",
                   help="accept gallery image URIs outside the catalog's bucket/folder (default: refused)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="precision of the image encoder (default: fp32)")
    p.add_argument("--backend", choices=["exact", "hnsw", "ivf"], default="exact", help="index backend (default: exact)")
    p.add_argument("--batch-size", type=int, default=128, help="Ray Data batch size (default: 128)")
    p.add_argument("--decode-tasks", type=int, default=2, help="concurrent decode tasks (default: 2)")
    p.add_argument("--encoders", type=int, default=1, help="image-encoder actors (default: 1)")
    add_s3_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np
    import ray
    import ray.data

    from factory.backbones import resolve_backbone_config
    from factory.catalogs import gallery_items
    from factory.index import create_index
    from jobs.arguments import absolute_uri, effective_config, s3_options
    from jobs.onboard_data import CatalogEncoder, decode_batch, encoder_options

    args.gallery, args.out, args.weights = (absolute_uri(x) for x in (args.gallery, args.out, args.weights))
    print("[index] config: " + json.dumps(effective_config(args), sort_keys=True), flush=True)
    s3 = s3_options(args)
    t0 = time.perf_counter()
    backbone = resolve_backbone_config(args.backbone, args.weights, s3)  # fails fast, travels as data
    items = gallery_items(args.gallery, s3, args.allow_outside_catalog)
    if not items:
        raise ValueError(f"no gallery images found at {args.gallery}")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level="WARNING")
    size = backbone.image.size
    decoded = ray.data.from_items(items).map_batches(
        decode_batch, fn_kwargs={"size": size, "s3": s3}, batch_size=args.batch_size, concurrency=args.decode_tasks,
    ).materialize()
    bad = decoded.filter(lambda r: r["error"] != "").select_columns(["uri", "error"]).take_all()
    encoded = decoded.filter(lambda r: r["error"] == "").map_batches(
        CatalogEncoder, fn_constructor_kwargs={"backbone": backbone.to_dict(), "weights": None, "s3": s3,
                                             "latents": False, "keep": ("item_id", "uri"), "precision": args.precision},
        batch_size=args.batch_size, concurrency=args.encoders, **encoder_options(args.use_gpu),
    )
    ids, uris, feats = [], [], []
    for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
        ids += [str(x) for x in batch["item_id"]]
        uris += [str(x) for x in batch["uri"]]
        feats.append(batch["features"])
    index = create_index(args.backend, int(feats[0].shape[1]))
    index.add(np.concatenate(feats).astype(np.float32), ids, uris)
    index.save(args.out, s3)
    print(f"[index] {len(index)} items ({len(bad)} rejected) -> {args.out} [{args.backend}] "
          f"in {time.perf_counter() - t0:.1f}s", flush=True)
    for r in bad:
        print(f"  rejected {r['uri']}: {r['error']}")
    return 0
