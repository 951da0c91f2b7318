"""Reading a catalog's concepts from any URI, whatever wrote it.

A catalog is either a folder (or its ``manifest.json``, a `schemas.CatalogManifest`) as `tokenfactory
world` writes it, a bare table of `schemas.CatalogRow` rows (Parquet, or JSON Lines), or the
``<split>_fsl_train.txt`` of a catalog laid out like PerVL-DeepFashion2 (`factory.pervl`). Relative image
URIs are resolved against the catalog's folder.
"""
from __future__ import annotations

import json

from factory import storage
from factory.pervl import is_pervl, read_pervl
from factory.storage import S3Options
from schemas import CatalogManifest, CatalogRow, ConceptSpec, concepts_from_rows, from_arrow


def _base(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


def _resolve(base: str, uri: str) -> str:
    return uri if "://" in uri or uri.startswith("/") else storage.join(base, uri)


def read_rows(uri: str, s3: S3Options | None = None) -> list[CatalogRow]:
    """Rows of a catalog folder, manifest, Parquet table, JSONL file or PerVL layout (image URIs absolute)."""
    if is_pervl(uri):
        return read_pervl(uri, s3).rows
    if uri.endswith(".parquet"):
        rows, base = from_arrow(storage.read_parquet(uri, s3), CatalogRow), _base(uri)
    elif uri.endswith(".jsonl"):
        text = storage.read_bytes(uri, s3).decode()
        rows = [CatalogRow.model_validate(json.loads(line)) for line in text.splitlines() if line.strip()]
        base = _base(uri)
    else:
        manifest_uri = uri if uri.endswith(".json") else storage.join(uri, "manifest.json")
        manifest = CatalogManifest.model_validate(storage.read_json(manifest_uri, s3))
        base = _base(manifest_uri)
        rows = read_rows(_resolve(base, manifest.concepts_uri), s3)
    return [r.model_copy(update={"image_uri": _resolve(base, r.image_uri)}) for r in rows]


def read_concepts(uri: str, s3: S3Options | None = None) -> list[ConceptSpec]:
    """The concepts of a catalog (few-shot and held-out images grouped per concept)."""
    return concepts_from_rows([r for r in read_rows(uri, s3) if r.split != "gallery"])


__all__ = ["read_concepts", "read_rows"]
