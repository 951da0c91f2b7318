"""The sample catalog of the fashion world: products, their images, a retrieval gallery and queries.

A *product* is one specific Fashion-MNIST garment of the **test** split (so pretraining on the train split
never saw it) in its own colourway (colour, pattern, pattern colour). Products are made in GROUPS of 2-3
that share category and colourway and differ only in the garment: "a red striped dress" then describes
every product of a group equally well, so telling them apart needs what a learned token can hold and a
caption cannot say (the silhouette and texture of that particular dress). Groups differ from each other
in category or colourway, so words do separate groups.

Layout written under the output URI::

    images/<concept>/fewshot-XX.png, images/<concept>/heldout-XX.png   (random scenes)
    gallery/<concept>-<background>-XX.png                              (each product in K scenes)
    gallery/distractor-NNNN-<background>-XX.png                        (other garments; half copy a
                                                                         product's category and colourway)
    concepts.parquet   CatalogRow, split fewshot/heldout, plus a ``background`` column (see below)
    gallery.parquet    CatalogRow, split gallery
    queries.jsonl      one composite query per (product, scene) with its relevant gallery items
    manifest.json      CatalogManifest (URIs of the three tables relative to the manifest)

Fewshot/heldout rows carry only *concept-level* attributes, because ``schemas.concepts_from_rows``
rejects a concept whose rows disagree on an attribute; the scene of each image, which varies per image,
is stored in an extra ``background`` column that ``from_arrow`` ignores and
`factory.catalogs.read_world_catalog` (the reading side) returns.
"""

from __future__ import annotations

import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import pyarrow as pa
from PIL import Image

from factory import storage
from factory.catalogs.world import Query
from factory.storage import S3Options
from factory.world.attributes import (
    BACKGROUNDS,
    CATEGORIES,
    COLOURS,
    NO_PATTERN_COLOUR,
    PATTERNS,
    PLAIN,
    background_phrase,
)
from factory.world.fashion_mnist import load_fashion_mnist
from factory.world.products import Product
from factory.world.render import FashionWorld
from schemas import CatalogManifest, CatalogRow, to_arrow

GROUP_SIZES = (2, 3)
_WRITE_THREADS = 8  # object stores reward concurrency; local disks do not mind it


class _GarmentPool:
    """Unused test-split garments per category, in a seeded random order; every draw is a new garment."""

    def __init__(self, rng: np.random.Generator) -> None:
        _, labels = load_fashion_mnist("test")
        self._free = {c: list(rng.permutation(np.flatnonzero(labels == c))) for c in range(len(CATEGORIES))}

    def take(self, category: int) -> int:
        if not self._free[category]:
            raise ValueError(f"no unused Fashion-MNIST test garment left for {CATEGORIES[category]!r}")
        return int(self._free[category].pop())


def _random_colourway(rng: np.random.Generator) -> tuple[int, int, int]:
    colour = int(rng.integers(len(COLOURS)))
    pattern = int(rng.integers(len(PATTERNS)))
    other = (colour + int(rng.integers(1, len(COLOURS)))) % len(COLOURS)  # never the fill colour
    return colour, pattern, NO_PATTERN_COLOUR if pattern == PLAIN else other


def _group_sizes(n: int, rng: np.random.Generator) -> list[int]:
    """Split ``n`` into groups of 2 or 3 (a lone group of 1 only when ``n == 1``)."""
    sizes: list[int] = []
    while n > 0:
        size = n if n <= 3 else 2 if n == 4 else int(rng.choice(GROUP_SIZES))
        sizes.append(size)
        n -= size
    return sizes


def make_products(
    n: int,
    rng: np.random.Generator,
    pool: _GarmentPool,
    categories: list[int],
    groups_per_parent: int = 1,
) -> list[Product]:
    """``n`` products in groups sharing category and colourway; no two groups share both.

    ``groups_per_parent`` consecutive groups share a category (in different colourways): with 2 or more, a
    product's caption names its colourway among same-category rivals, so the caption is a real baseline
    (with 1, every product of a category shares one colourway and its caption says no more than the
    parent word).
    """
    products: list[Product] = []
    used: set[tuple[int, tuple[int, int, int]]] = set()
    order = list(rng.permutation(categories))
    for g, size in enumerate(_group_sizes(n, rng)):
        category = int(order[(g // groups_per_parent) % len(order)])  # cycle so categories stay balanced
        while (category, colourway := _random_colourway(rng)) in used:
            pass  # 370 colourways per category: a clash is rare and a redraw is cheap
        used.add((category, colourway))
        for _ in range(size):
            i = len(products)
            products.append(
                Product(f"p{i:04d}-{CATEGORIES[category]}", category, pool.take(category), *colourway, group=g)
            )
    return products


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _full_uri(uri: str) -> str:
    """Catalog rows hold full URIs: a plain relative path becomes absolute, schemes are kept."""
    return uri.rstrip("/") if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def _category_indices(categories: list[str] | None) -> list[int]:
    if not categories:
        return list(range(len(CATEGORIES)))
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; known: {', '.join(CATEGORIES)}")
    return sorted({CATEGORIES.index(c) for c in categories})


def write_catalog(
    out_uri: str,
    seed: int,
    products: int = 24,
    shots: int = 5,
    heldout: int = 10,
    contexts: int = 3,
    distractors: int = 48,
    size: int = 32,
    categories: list[str] | None = None,
    s3: S3Options | None = None,
    groups_per_parent: int = 1,
) -> CatalogManifest:
    """Render and write a sample catalog under ``out_uri`` (a path, ``file://`` or ``s3://``).

    Deterministic for a seed: every file but the manifest's ``created_at`` is byte-identical. Products,
    renders and distractors draw from separate seeded streams, so asking for more distractors does not
    change the products. Existing files of the same names are overwritten; nothing else is deleted.
    """
    if products < 1 or shots < 1 or heldout < 0 or distractors < 0 or groups_per_parent < 1:
        raise ValueError("need products >= 1, shots >= 1, heldout >= 0, distractors >= 0 and groups_per_parent >= 1")
    if not 1 <= contexts <= len(BACKGROUNDS):
        raise ValueError(f"contexts must be between 1 and {len(BACKGROUNDS)} (the number of scenes)")
    cats = _category_indices(categories)
    root = _full_uri(out_uri)
    seeds = np.random.SeedSequence(seed).spawn(3)
    product_rng, render_rng, distractor_rng = (np.random.default_rng(s) for s in seeds)
    pool = _GarmentPool(product_rng)
    prods = make_products(products, product_rng, pool, cats, groups_per_parent)
    world = FashionWorld(seed, size=size, split="test")

    files: dict[str, bytes] = {}
    rows: list[CatalogRow] = []
    row_scenes: list[str] = []
    gallery: list[CatalogRow] = []
    queries: list[Query] = []
    for p in prods:
        # Few-shot and held-out images in random scenes, so a token must not learn the scene.
        n_img = shots + heldout
        scene = render_rng.integers(len(BACKGROUNDS), size=n_img)
        r = world.render_product(p, scene, n_img, render_rng)
        for i in range(n_img):
            split, k = ("fewshot", i) if i < shots else ("heldout", i - shots)
            uri = storage.join(root, "images", p.concept_id, f"{split}-{k:02d}.png")
            files[uri] = _png(r.images[i])
            rows.append(
                CatalogRow(
                    concept_id=p.concept_id,
                    parent=p.parent,
                    image_uri=uri,
                    split=split,
                    attributes=p.attributes(),
                    caption=p.caption,
                )
            )
            row_scenes.append(BACKGROUNDS[scene[i]])
        # The gallery: the product in `contexts` distinct scenes, one query per scene.
        scenes = render_rng.choice(len(BACKGROUNDS), size=contexts, replace=False)
        r = world.render_product(p, scenes, contexts, render_rng)
        for i, b in enumerate(scenes.tolist()):
            item = f"{p.concept_id}-{BACKGROUNDS[b]}-00"
            uri = storage.join(root, "gallery", f"{item}.png")
            files[uri] = _png(r.images[i])
            attrs = {**p.attributes(), "background": BACKGROUNDS[b], "distractor": "0", "item": item}
            gallery.append(
                CatalogRow(
                    concept_id=p.concept_id,
                    parent=p.parent,
                    image_uri=uri,
                    split="gallery",
                    attributes=attrs,
                    caption=r.captions[i],
                )
            )
            queries.append(
                Query(
                    f"q{len(queries):04d}",
                    p.concept_id,
                    p.parent,
                    BACKGROUNDS[b],
                    background_phrase(BACKGROUNDS[b]),
                    r.captions[i],
                    [item],
                    [uri],
                )
            )

    queried = {p.concept_id: [q.background for q in queries if q.concept_id == p.concept_id] for p in prods}
    for d in range(distractors):
        rng = distractor_rng
        if d % 2 == 0:
            # A hard negative: a product's category and colourway on another garment, in one of the
            # product's query scenes, so neither words nor scene can tell it from the product.
            mimic = prods[int(rng.integers(len(prods)))]
            category, colourway = mimic.category, mimic.colourway
            background = BACKGROUNDS.index(str(rng.choice(queried[mimic.concept_id])))
        else:
            mimic = None
            category, colourway = int(rng.choice(cats)), _random_colourway(rng)
            background = int(rng.integers(len(BACKGROUNDS)))
        cid = f"distractor-{d:04d}"
        fake = Product(cid, category, pool.take(category), *colourway, group=-1)
        r = world.render_product(fake, background, 1, rng)
        item = f"{cid}-{BACKGROUNDS[background]}-00"
        uri = storage.join(root, "gallery", f"{item}.png")
        files[uri] = _png(r.images[0])
        attrs = {**fake.attributes(), "background": BACKGROUNDS[background], "distractor": "1", "item": item}
        del attrs["group"]
        if mimic is not None:
            attrs["mimics"] = mimic.concept_id
        gallery.append(
            CatalogRow(
                concept_id=cid,
                parent=fake.parent,
                image_uri=uri,
                split="gallery",
                attributes=attrs,
                caption=r.captions[0],
            )
        )

    with ThreadPoolExecutor(_WRITE_THREADS) as ex:
        list(ex.map(lambda kv: storage.write_bytes(kv[0], kv[1], s3), files.items()))
    table = to_arrow(rows, CatalogRow).append_column("background", pa.array(row_scenes, pa.string()))
    storage.write_parquet(table, storage.join(root, "concepts.parquet"), s3)
    storage.write_parquet(to_arrow(gallery, CatalogRow), storage.join(root, "gallery.parquet"), s3)
    jsonl = "".join(json.dumps(asdict(q), sort_keys=True) + "\n" for q in queries)
    storage.write_bytes(storage.join(root, "queries.jsonl"), jsonl.encode(), s3)

    groups: dict[int, list[str]] = {}
    for p in prods:
        groups.setdefault(p.group, []).append(p.concept_id)
    manifest = CatalogManifest(
        name=f"fashion-world-{seed}",
        seed=seed,
        concepts_uri="concepts.parquet",
        gallery_uri="gallery.parquet",
        queries_uri="queries.jsonl",
        n_concepts=len(prods),
        n_images=len(files),
        extra={
            "generator": "factory.world",
            "size": size,
            "shots": shots,
            "heldout": heldout,
            "contexts": contexts,
            "distractors": distractors,
            "fashion_mnist_split": "test",
            "categories": [CATEGORIES[c] for c in cats],
            "groups": list(groups.values()),
            "n_gallery": len(gallery),
            "n_queries": len(queries),
        },
    )
    storage.write_json(storage.join(root, "manifest.json"), manifest, s3)
    return manifest
