"""The sample catalog: groups that words cannot separate, round trips through the schemas, local and S3."""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from factory import storage
from factory.catalogs import read_world_catalog
from factory.catalogs.world import Catalog
from factory.world import BACKGROUNDS, CATEGORIES, load_fashion_mnist, write_catalog
from jobs.s3server import SeaweedS3
from schemas import CatalogManifest, CatalogRow, from_arrow

SMALL = dict(products=7, shots=2, heldout=3, contexts=2, distractors=6, size=32)


def _check_catalog(cat: Catalog, root: str, s3=None) -> None:
    m = cat.manifest
    assert (m.n_concepts, m.seed) == (7, 11)
    assert m.n_images == 7 * (2 + 3) + 7 * 2 + 6
    assert [c.concept_id for c in cat.concepts] == [f"p{i:04d}-{c.parent}" for i, c in enumerate(cat.concepts)]
    for spec in cat.concepts:
        assert len(spec.image_uris) == 2 and len(spec.heldout_uris) == 3
        assert spec.parent == spec.attributes["category"] and spec.caption
        assert spec.caption == f"{'an' if spec.attributes['colour'] == 'orange' else 'a'} " + " ".join(
            [spec.attributes["colour"]]
            + ([] if spec.attributes["pattern"] == "plain" else [spec.attributes["pattern"]])
            + [spec.parent]
        )
        assert spec.image_uris[0] == storage.join(root, "images", spec.concept_id, "fewshot-00.png")
        assert cat.backgrounds[spec.heldout_uris[-1]] in BACKGROUNDS
    # Every image is a real PNG of the right size, stored where its row says.
    some = [cat.concepts[0].image_uris[0], cat.gallery[-1].image_uri]
    for uri in some:
        with Image.open(io.BytesIO(storage.read_bytes(uri, s3))) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
    distractors = [r for r in cat.gallery if r.attributes["distractor"] == "1"]
    assert [r.concept_id for r in distractors] == [f"distractor-{i:04d}" for i in range(6)]
    assert all(r.split == "gallery" and r.parent in CATEGORIES for r in cat.gallery)
    # Queries: one per (product, scene); the relevant item is exactly that product's gallery image there.
    by_item = {r.attributes["item"]: r for r in cat.gallery}
    assert len(cat.queries) == 7 * 2
    for q in cat.queries:
        (item,) = q.relevant
        row = by_item[item]
        assert (row.concept_id, row.attributes["background"], row.image_uri) == (
            q.concept_id,
            q.background,
            q.relevant_uris[0],
        )
        assert q.caption.endswith(q.intent) and q.caption == row.caption


def test_local_round_trip_and_determinism(tmp_path: Path) -> None:
    manifest = write_catalog(str(tmp_path / "a"), seed=11, **SMALL)
    assert isinstance(manifest, CatalogManifest)
    cat = read_world_catalog(str(tmp_path / "a"))
    _check_catalog(cat, str(tmp_path / "a"))
    assert read_world_catalog(str(tmp_path / "a" / "manifest.json")).concepts == cat.concepts
    # The rows validate through the schemas' own Arrow schema, and the files hold full URIs.
    rows = from_arrow(storage.read_parquet(str(tmp_path / "a" / "concepts.parquet")), CatalogRow)
    assert all(r.image_uri.startswith(str(tmp_path)) for r in rows)
    # Same seed, same bytes (in another folder, so only the URIs inside the tables differ).
    write_catalog(str(tmp_path / "b"), seed=11, **SMALL)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert files_a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files_a)
    write_catalog(str(tmp_path / "c"), seed=12, **SMALL)
    assert any(
        (tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes()
        for f in files_a
        if (tmp_path / "c" / f).exists()
    )


@pytest.mark.s3
def test_s3_round_trip(s3_server: SeaweedS3, s3_bucket: str) -> None:
    root = storage.join(s3_bucket, "catalogs", "demo")
    write_catalog(root, seed=11, s3=s3_server.s3_options, **SMALL)
    cat = read_world_catalog(root, s3=s3_server.s3_options)
    _check_catalog(cat, root, s3_server.s3_options)
    assert cat.concepts[0].image_uris[0].startswith("s3://")
    assert len(storage.glob_files(root, "*.png", s3_server.s3_options)) == cat.manifest.n_images


def test_groups_share_category_and_colourway_but_not_garment(tmp_path: Path) -> None:
    write_catalog(str(tmp_path), seed=5, products=24, shots=1, heldout=0, contexts=1, distractors=20)
    cat = read_world_catalog(str(tmp_path))
    specs = {c.concept_id: c for c in cat.concepts}
    groups = cat.manifest.extra["groups"]
    assert sum(map(len, groups)) == 24 and all(len(g) in (2, 3) for g in groups)
    words = ("category", "colour", "pattern", "pattern_colour")
    seen_words = set()
    for group in groups:
        attrs = [specs[cid].attributes for cid in group]
        assert len({tuple(a[k] for k in words) for a in attrs}) == 1  # identical in words...
        assert len({a["garment"] for a in attrs}) == len(group)  # ...but different garments
        assert len({specs[cid].caption for cid in group}) == 1  # so the caption cannot tell them apart
        seen_words.add(tuple(attrs[0][k] for k in words))
    assert len(seen_words) == len(groups)  # while groups differ from each other in words
    # Garments are test-split images of the right class, never reused (products and distractors alike).
    _, labels = load_fashion_mnist("test")
    garments = [int(s.attributes["garment"]) for s in cat.concepts]
    garments += [int(r.attributes["garment"]) for r in cat.gallery if r.attributes["distractor"] == "1"]
    assert len(set(garments)) == len(garments)
    assert all(CATEGORIES[labels[int(s.attributes["garment"])]] == s.parent for s in cat.concepts)
    # Half the distractors copy a product's words and sit in one of that product's query scenes.
    query_scenes = defaultdict(set)
    for q in cat.queries:
        query_scenes[q.concept_id].add(q.background)
    mimics = [r for r in cat.gallery if "mimics" in r.attributes]
    assert len(mimics) == 10
    for r in mimics:
        p = specs[r.attributes["mimics"]]
        assert all(r.attributes[k] == p.attributes[k] for k in words)
        assert r.attributes["background"] in query_scenes[p.concept_id]


def test_categories_and_bad_sizes(tmp_path: Path) -> None:
    write_catalog(
        str(tmp_path), seed=1, products=4, shots=1, heldout=1, contexts=1, distractors=4, categories=["dress", "coat"]
    )
    cat = read_world_catalog(str(tmp_path))
    assert {c.parent for c in cat.concepts} | {r.parent for r in cat.gallery} == {"dress", "coat"}
    with pytest.raises(ValueError, match="unknown categories"):
        write_catalog(str(tmp_path), seed=1, categories=["hat"])
    with pytest.raises(ValueError, match="contexts"):
        write_catalog(str(tmp_path), seed=1, contexts=7)
    queries = [json.loads(line) for line in (tmp_path / "queries.jsonl").read_text().splitlines()]
    assert queries[0]["relevant"] and np.all([q["intent"].split()[0] in ("on", "in", "at") for q in queries])


def test_several_colourway_groups_per_parent_make_the_caption_informative(tmp_path):
    from factory.catalogs import read_world_catalog
    from factory.world import write_catalog

    write_catalog(
        str(tmp_path / "c"), seed=0, products=12, shots=1, heldout=0, contexts=1, distractors=0, groups_per_parent=2
    )
    concepts = read_world_catalog(str(tmp_path / "c")).concepts
    by_parent: dict[str, set] = {}
    for s in concepts:
        by_parent.setdefault(s.parent, set()).add(s.attributes["group"])
    shared = [p for p, groups in by_parent.items() if len(groups) >= 2]
    assert len(shared) >= len(by_parent) - 1  # every category but perhaps the last has two colourway groups
    for parent in shared:  # and there the caption tells the groups apart, unlike the parent word
        assert len({s.caption for s in concepts if s.parent == parent}) >= 2
