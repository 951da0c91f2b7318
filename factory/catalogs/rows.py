"""Reading a catalog's concepts from any URI, whatever wrote it.

A catalog is either a folder (or its ``manifest.json``, a `schemas.CatalogManifest`) as `tokenfactory
world` writes it, a bare table of `schemas.CatalogRow` rows (Parquet, or JSON Lines), or the
``<split>_fsl_train.txt`` of a catalog laid out like PerVL-DeepFashion2 (`factory.catalogs.pervl`). Relative image
URIs are resolved against the catalog's folder.

Image URIs stay inside the catalog: an ``s3://`` catalog's images must be in its bucket, a local
catalog's under its folder. Otherwise a catalog from anywhere could make the job read whatever the
worker's credentials reach (``~/.aws/credentials``, ``file:///proc/self/environ``, another bucket) and
store it as training data; ``allow_outside=True`` (the jobs' ``--allow-outside-catalog``) lifts that.
"""

from __future__ import annotations

import json
import os
import posixpath

from factory import storage
from factory.catalogs.manifest import base_of, manifest_uri, resolve
from factory.catalogs.pervl import is_pervl, read_pervl
from factory.errors import CatalogError
from factory.storage import S3Options
from schemas import CatalogManifest, CatalogRow, ConceptSpec, concepts_from_rows, from_arrow


def _root(uri: str) -> str:
    """What a catalog's images must stay under: ``s3://bucket/`` or the catalog's own folder."""
    if uri.startswith("s3://"):
        return "s3://" + uri[len("s3://") :].split("/", 1)[0] + "/"
    folder = uri if not uri.endswith((".json", ".jsonl", ".parquet")) else base_of(uri)
    return posixpath.normpath(os.path.abspath(folder.removeprefix("file://"))) + "/"


def _inside(root: str, image_uri: str) -> bool:
    if root.startswith("s3://"):
        return image_uri.startswith(root) and ".." not in image_uri[len(root) :].split("/")
    if "://" in image_uri and not image_uri.startswith("file://"):
        return False
    return (posixpath.normpath(os.path.abspath(image_uri.removeprefix("file://"))) + "/").startswith(root)


def read_rows(uri: str, s3: S3Options | None = None, allow_outside: bool = False) -> list[CatalogRow]:
    """Rows of a catalog folder, manifest, Parquet table, JSONL file or PerVL layout (image URIs absolute),
    each image inside the catalog unless ``allow_outside`` (see the module docstring)."""
    rows = _read_rows(uri, s3)
    if not allow_outside and not is_pervl(uri):
        root = _root(uri)
        outside = [r.image_uri for r in rows if not _inside(root, r.image_uri)]
        if outside:
            raise CatalogError(
                f"{len(outside)} image URIs of catalog {uri} lie outside {root} (e.g. {outside[0]!r}): "
                "move the images into the catalog, or pass --allow-outside-catalog if you trust it"
            )
    return rows


def _read_rows(uri: str, s3: S3Options | None) -> list[CatalogRow]:
    if is_pervl(uri):
        return read_pervl(uri, s3).rows
    if uri.endswith(".parquet"):
        rows, base = from_arrow(storage.read_parquet(uri, s3), CatalogRow), base_of(uri)
    elif uri.endswith(".jsonl"):
        text = storage.read_bytes(uri, s3).decode()
        rows = [CatalogRow.model_validate(json.loads(line)) for line in text.splitlines() if line.strip()]
        base = base_of(uri)
    else:
        manifest, base = read_manifest(uri, s3)
        rows = _read_rows(resolve(base, manifest.concepts_uri), s3)
    return [r.model_copy(update={"image_uri": resolve(base, r.image_uri)}) for r in rows]


def read_manifest(uri: str, s3: S3Options | None = None) -> tuple[CatalogManifest, str]:
    """A catalog's manifest (``uri``: its folder or the manifest) and the folder its URIs are relative to."""
    where = manifest_uri(uri)
    return CatalogManifest.model_validate(storage.read_json(where, s3)), base_of(where)


def read_concepts(uri: str, s3: S3Options | None = None, allow_outside: bool = False) -> list[ConceptSpec]:
    """The concepts of a catalog (few-shot and held-out images grouped per concept)."""
    return concepts_from_rows([r for r in read_rows(uri, s3, allow_outside) if r.split != "gallery"])


__all__ = ["read_concepts", "read_manifest", "read_rows"]
