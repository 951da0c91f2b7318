"""The items of a retrieval gallery, from whatever names it.

A gallery is the gallery table of a catalog written by `tokenfactory world` (its root or manifest), a
bare table of `schemas.CatalogRow` (Parquet or JSON Lines), the retrieval images of a PerVL-DeepFashion2
layout (its ``<split>_fsl_train.txt``), or a folder of image files (S3 or local; the item id is the file
name without its extension).
"""

from __future__ import annotations

import posixpath

from factory import storage
from factory.catalogs.manifest import manifest_uri, resolve
from factory.catalogs.pervl import is_pervl, read_pervl
from factory.catalogs.rows import read_manifest, read_rows
from factory.errors import CatalogError
from factory.storage import S3Options

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def gallery_items(uri: str, s3: S3Options | None = None, allow_outside: bool = False) -> list[dict[str, str]]:
    """``{"item_id", "uri"}`` of every gallery image named by ``uri`` (see the module docstring); catalog
    images stay inside their catalog unless ``allow_outside`` (`factory.catalogs.rows`)."""
    if is_pervl(uri):
        rows = read_pervl(uri, s3).gallery
    elif uri.endswith((".parquet", ".jsonl")):
        rows = read_rows(uri, s3, allow_outside)
    elif storage.exists(manifest_uri(uri), s3):
        manifest, base = read_manifest(uri, s3)
        if not manifest.gallery_uri:
            raise CatalogError(f"catalog {uri} has no gallery: index a catalog written with one, or a folder of images")
        rows = read_rows(resolve(base, manifest.gallery_uri), s3, allow_outside)
    else:
        files = [f for f in storage.glob_files(uri, s3=s3) if f.lower().endswith(IMAGE_SUFFIXES)]
        return [{"item_id": posixpath.splitext(posixpath.basename(f))[0], "uri": f} for f in files]
    return [
        {
            "item_id": r.attributes.get("item") or posixpath.splitext(posixpath.basename(r.image_uri))[0],
            "uri": r.image_uri,
        }
        for r in rows
    ]


__all__ = ["IMAGE_SUFFIXES", "gallery_items"]
