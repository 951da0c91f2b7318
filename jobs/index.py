"""The gallery indexing job as a typed function: `IndexConfig` in, a saved vector index out.

    gallery items (`factory.catalogs.gallery_items`) -> Ray Data: read + validate (tasks)
      -> image features (an actor pool of `CatalogEncoder`) -> `factory.index` -> saved, manifest last

With ``append`` the output is a root of index versions (`factory.index.versions`): only the items the
newest version lacks are read and encoded, and the union is committed as the next, immutable version.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

from factory.storage import S3Options, absolute_uri
from jobs._ray import connect


@dataclass
class IndexConfig:
    gallery: str  # a catalog root / manifest.json, a gallery Parquet/JSONL, a PerVL layout, or a folder of images
    out: str  # the index folder to write
    backbone: str | dict[str, Any] = "fashion-mini"
    weights: str | None = None
    use_gpu: bool = False
    allow_outside_catalog: bool = False
    precision: str | None = None  # of the image encoder (None: bf16 on GPUs, else fp32; fp16 is allowed
    # here: indexing only encodes, there are no gradients for fp16's range to lose)
    backend: str = "exact"  # exact, hnsw, ivf or ivfpq (factory.index.BACKENDS)
    batch_size: int = 128
    decode_tasks: int = 2
    encoders: int = 1
    append: bool = False  # out is a root of index versions: add what the newest lacks as the next version
    s3: S3Options | None = field(default=None, repr=False)  # never printed: it may hold keys

    def __post_init__(self):
        from factory.device import PRECISIONS, default_precision
        from factory.errors import ConfigError

        for name in ("gallery", "out", "weights"):
            setattr(self, name, absolute_uri(getattr(self, name)))
        if self.precision is None:
            self.precision = default_precision(self.use_gpu)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")

    def record(self) -> dict[str, Any]:
        """The config as JSON-able data (printed at the start), without the S3 options."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "s3"}


def build_index(cfg: IndexConfig):
    """Embed the gallery images of ``cfg.gallery`` and save the index at ``cfg.out`` (with ``append``: only
    the new ones, committed as the next version); returns the index."""
    import numpy as np
    import ray
    import ray.data
    from ray.data.expressions import col

    from factory.backbones import resolve_backbone_config
    from factory.catalogs import gallery_items
    from factory.errors import CatalogError
    from factory.index import create_index
    from factory.index.versions import IndexVersions
    from jobs.onboard_data import CatalogEncoder, decode_batch, plan_placement

    print("[index] config: " + json.dumps(cfg.record(), sort_keys=True), flush=True)
    t0 = time.perf_counter()
    backbone = resolve_backbone_config(cfg.backbone, cfg.weights, cfg.s3)  # fails fast, travels as data
    items = gallery_items(cfg.gallery, cfg.s3, cfg.allow_outside_catalog)
    if not items:
        raise CatalogError(f"no gallery images found at {cfg.gallery}")
    versions, base = IndexVersions(cfg.out, cfg.s3), None
    if cfg.append and versions.latest() is not None:
        base_version, base = versions.open()
        items = [it for it in items if it["item_id"] not in base]
        print(f"[index] version {base_version} holds {len(base)} items; {len(items)} new", flush=True)
        if not items:
            print("[index] nothing to add: no new version", flush=True)
            return base
    connect()
    # No Train workers here: only the encoders ask for GPU shares; a GPU request the cluster cannot hold
    # fails now instead of waiting on resources.
    placement = plan_placement(ray.cluster_resources().get("GPU", 0), 0, cfg.use_gpu, cfg.encoders)
    decoded = (
        ray.data.from_items(items)
        .map_batches(
            decode_batch,
            fn_kwargs={"size": backbone.image.size, "s3": cfg.s3},
            batch_size=cfg.batch_size,
            compute=ray.data.TaskPoolStrategy(size=cfg.decode_tasks),
        )
        .materialize()
    )
    # Expressions, not Python lambdas: Ray evaluates them on the Arrow blocks without a row-by-row call.
    bad = decoded.filter(expr=col("error") != "").select_columns(["uri", "error"]).take_all()
    encoded = decoded.filter(expr=col("error") == "").map_batches(
        CatalogEncoder,
        fn_constructor_kwargs={
            "backbone": backbone.to_dict(),
            "weights": None,
            "s3": cfg.s3,
            "latents": False,
            "keep": ("item_id", "uri"),
            "precision": cfg.precision,
        },
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.encoders),
        **placement.encoder_options,
    )
    ids, uris, feats = [], [], []
    for batch in encoded.iter_batches(batch_size=None, batch_format="numpy"):
        ids += [str(x) for x in batch["item_id"]]
        uris += [str(x) for x in batch["uri"]]
        feats.append(batch["features"])
    if not ids and base is None:
        raise CatalogError(
            f"every gallery image at {cfg.gallery} was rejected ({len(bad)}; e.g. {bad[0]['uri']}: {bad[0]['error']})"
        )
    index = base if base is not None else create_index(cfg.backend, int(feats[0].shape[1]))
    if ids:
        index.add(np.concatenate(feats).astype(np.float32), ids, uris)
    if cfg.append:
        where = versions.version_uri(versions.commit(index))
    else:
        index.save(cfg.out, cfg.s3)
        where = cfg.out
    print(
        f"[index] {len(ids)} items encoded, {len(index)} in the index ({len(bad)} rejected) -> {where} "
        f"[{index.backend}] in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    for r in bad:
        print(f"  rejected {r['uri']}: {r['error']}")
    return index


__all__ = ["IndexConfig", "build_index"]
