"""What an evaluation reads from a catalog: concepts (few-shot and held-out images) and retrieval queries.

Two layouts: a catalog written by `tokenfactory world` (its ``queries.jsonl``: one query per product and
scene, the intent being the scene phrase) and a PerVL-DeepFashion2 layout (`factory.catalogs.pervl`: one caption
query per retrieval image). Both become `schemas.RetrievalQuery` rows, so every method below is written
once.
"""

from __future__ import annotations

from dataclasses import dataclass

from factory.catalogs.pervl import is_pervl, read_pervl
from factory.catalogs.world import read_world_catalog
from factory.storage import S3Options
from schemas import CONCEPT_SLOT, CatalogRow, ConceptSpec, RetrievalQuery, concepts_from_rows


@dataclass
class EvalCatalog:
    name: str
    concepts: list[ConceptSpec]
    queries: list[RetrievalQuery]
    gallery: list[CatalogRow]

    @property
    def intents(self) -> list[str]:
        """The distinct intents of the queries, in first-appearance order (the classes previews are
        judged among)."""
        return list(dict.fromkeys(q.intent for q in self.queries))


def world_template(intent: str) -> str:
    """The query of the sample catalog: "a photo of {concept} on the beach"."""
    return f"a photo of {CONCEPT_SLOT} {intent}".strip()


def read_eval_catalog(uri: str, s3: S3Options | None = None) -> EvalCatalog:
    """Concepts, queries and gallery of a `world` catalog (folder or manifest) or a PerVL layout."""
    if is_pervl(uri):
        cat = read_pervl(uri, s3)
        return EvalCatalog(uri.rstrip("/").rsplit("/", 1)[-1], concepts_from_rows(cat.rows), cat.queries, cat.gallery)
    cat = read_world_catalog(uri, s3)
    queries = [
        RetrievalQuery(
            query_id=q.query_id,
            concept_id=q.concept_id,
            parent=q.parent,
            template=world_template(q.intent),
            intent=q.intent,
            relevant=q.relevant,
        )
        for q in cat.queries
    ]
    return EvalCatalog(cat.manifest.name, cat.concepts, queries, cat.gallery)


__all__ = ["EvalCatalog", "read_eval_catalog", "world_template"]
