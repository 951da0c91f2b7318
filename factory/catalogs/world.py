"""Reading a catalog written by `tokenfactory world` (`factory.world.write_catalog`): its concepts, gallery,
composite retrieval queries and the scene of every image.

The writing side lives in `factory.world`; this side needs neither NumPy rendering nor Fashion-MNIST, so
readers (the evaluation, the demo, the tests) do not import the world's generator.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from factory import storage
from factory.catalogs.manifest import resolve
from factory.catalogs.rows import read_manifest
from factory.storage import S3Options
from schemas import CatalogManifest, CatalogRow, ConceptSpec, concepts_from_rows, from_arrow


@dataclass(frozen=True)
class Query:
    """A composite retrieval query: this product, in this scene. ``relevant`` are gallery item ids."""

    query_id: str
    concept_id: str
    parent: str
    background: str
    intent: str  # "on the beach": what a user adds to the product in the query
    caption: str  # the words-only version of the query: "a red striped dress on the beach"
    relevant: list[str]
    relevant_uris: list[str]


@dataclass
class Catalog:
    """What `read_world_catalog` returns. ``backgrounds`` maps every image URI to its scene word."""

    manifest: CatalogManifest
    concepts: list[ConceptSpec]
    gallery: list[CatalogRow]
    queries: list[Query]
    backgrounds: dict[str, str] = field(default_factory=dict)


def read_world_catalog(uri: str, s3: S3Options | None = None) -> Catalog:
    """Read a catalog written by ``write_catalog`` (``uri`` is its folder or its ``manifest.json``)."""
    manifest, base = read_manifest(uri, s3)
    table = storage.read_parquet(resolve(base, manifest.concepts_uri), s3)
    rows = from_arrow(table, CatalogRow)
    backgrounds: dict[str, str] = {}
    if "background" in table.column_names:
        backgrounds.update(zip(table.column("image_uri").to_pylist(), table.column("background").to_pylist()))
    gallery: list[CatalogRow] = []
    if manifest.gallery_uri:
        gallery = from_arrow(storage.read_parquet(resolve(base, manifest.gallery_uri), s3), CatalogRow)
        backgrounds.update({r.image_uri: r.attributes["background"] for r in gallery if "background" in r.attributes})
    queries: list[Query] = []
    if manifest.queries_uri:
        text = storage.read_bytes(resolve(base, manifest.queries_uri), s3).decode()
        queries = [Query(**json.loads(line)) for line in text.splitlines() if line.strip()]
    return Catalog(manifest, concepts_from_rows(rows), gallery, queries, backgrounds)


__all__ = ["Catalog", "Query", "read_world_catalog"]
