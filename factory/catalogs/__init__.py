"""Reading catalogs, whatever wrote them: one package for every kind of thing a catalog holds.

    rows.py        CatalogRow rows and the concepts they group into (`read_rows`, `read_concepts`), image
                   URIs confined to the catalog; `read_manifest`
    gallery.py     the items of a retrieval gallery (`gallery_items`)
    world.py       a `tokenfactory world` catalog with its queries and scenes (`read_world_catalog`)
    evaluation.py  what the evaluation reads: concepts, queries, gallery (`read_eval_catalog`)
    pervl.py       the PerVL-DeepFashion2 layout (`read_pervl`)
    manifest.py    the one resolver of a catalog's manifest and of the relative URIs in it

The writing side of the sample catalog stays with the world that renders it (`factory.world`).
"""

from factory.catalogs.evaluation import EvalCatalog, read_eval_catalog, world_template
from factory.catalogs.gallery import IMAGE_SUFFIXES, gallery_items
from factory.catalogs.manifest import manifest_uri
from factory.catalogs.pervl import PervlCatalog, PervlLayoutError, is_pervl, read_pervl
from factory.catalogs.rows import read_concepts, read_manifest, read_rows
from factory.catalogs.world import Catalog, Query, read_world_catalog

__all__ = [
    "Catalog",
    "EvalCatalog",
    "IMAGE_SUFFIXES",
    "PervlCatalog",
    "PervlLayoutError",
    "Query",
    "gallery_items",
    "is_pervl",
    "manifest_uri",
    "read_concepts",
    "read_eval_catalog",
    "read_manifest",
    "read_pervl",
    "read_rows",
    "read_world_catalog",
    "world_template",
]
