"""Catalog contracts: what a concept is, how a catalog is stored, and how to convert between the two.

A catalog is stored as rows (one per image, ``CatalogRow``) because that is what Ray Data streams and
what a Parquet file holds naturally; the learner thinks in concepts (``ConceptSpec``). The two helpers at
the bottom convert losslessly between the views.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, field_validator

from schemas.ids import ConceptId, NonEmptyStr, ParentWord, UtcDatetime, utc_now

Split = Literal["fewshot", "heldout", "gallery"]


class ConceptSpec(BaseModel):
    """One concept to learn a token for: a few images plus the parent word it specialises."""

    model_config = ConfigDict(extra="forbid")

    concept_id: ConceptId
    parent: ParentWord
    image_uris: list[NonEmptyStr] = Field(min_length=1, description="few-shot training images")
    heldout_uris: list[NonEmptyStr] = Field(default_factory=list, description="evaluation-only images")
    attributes: dict[str, str] = Field(default_factory=dict, description="hints such as colour=red")
    caption: str | None = None


class CatalogRow(BaseModel):
    """One image of a catalog. ``split`` says what the image is for; gallery rows are retrieval targets."""

    model_config = ConfigDict(extra="forbid")

    concept_id: ConceptId
    parent: ParentWord
    image_uri: NonEmptyStr
    split: Split
    attributes: dict[str, str] = Field(default_factory=dict)
    caption: str | None = None


class CatalogManifest(BaseModel):
    """Entry point of a stored catalog. URIs are relative to the manifest's own folder unless absolute,
    so a catalog folder can be copied between buckets without rewriting it."""

    model_config = ConfigDict(extra="forbid")

    name: NonEmptyStr
    created_at: UtcDatetime = Field(default_factory=utc_now)
    seed: int | None = None
    concepts_uri: NonEmptyStr = Field(description="Parquet of CatalogRow (fewshot and heldout rows)")
    gallery_uri: str | None = Field(default=None, description="Parquet of CatalogRow with split=gallery")
    queries_uri: str | None = Field(default=None, description="retrieval queries with ground truth")
    n_concepts: NonNegativeInt
    n_images: NonNegativeInt
    extra: dict[str, Any] = Field(default_factory=dict)


def concepts_from_rows(rows: Iterable[CatalogRow]) -> list[ConceptSpec]:
    """Group fewshot and heldout rows into one ``ConceptSpec`` per concept, in first-appearance order.

    Gallery rows are skipped: they are retrieval targets, not training data. A concept's attributes are
    the union of its rows' attributes; two rows disagreeing on a value (or on the parent) is a catalog
    error, reported rather than resolved by picking one. The caption is the first non-null one.
    """
    groups: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.split == "gallery":
            continue
        g = groups.setdefault(
            row.concept_id,
            {"parent": row.parent, "fewshot": [], "heldout": [], "attributes": {}, "caption": None},
        )
        if g["parent"] != row.parent:
            raise ValueError(f"concept {row.concept_id!r} has inconsistent parents: {g['parent']!r} and {row.parent!r}")
        for key, value in row.attributes.items():
            seen = g["attributes"].setdefault(key, value)
            if seen != value:
                raise ValueError(
                    f"concept {row.concept_id!r} has inconsistent attribute {key!r}: {seen!r} and {value!r}"
                )
        if g["caption"] is None:
            g["caption"] = row.caption
        g[row.split].append(row.image_uri)

    specs = []
    for concept_id, g in groups.items():
        if not g["fewshot"]:
            raise ValueError(f"concept {concept_id!r} has heldout images but no fewshot images")
        specs.append(
            ConceptSpec(
                concept_id=concept_id,
                parent=g["parent"],
                image_uris=g["fewshot"],
                heldout_uris=g["heldout"],
                attributes=g["attributes"],
                caption=g["caption"],
            )
        )
    return specs


def rows_from_concepts(specs: Iterable[ConceptSpec]) -> list[CatalogRow]:
    """Flatten concepts into rows (fewshot first, then heldout), repeating concept-level fields per row."""
    rows = []
    for spec in specs:
        for split, uris in (("fewshot", spec.image_uris), ("heldout", spec.heldout_uris)):
            rows.extend(
                CatalogRow(
                    concept_id=spec.concept_id,
                    parent=spec.parent,
                    image_uri=uri,
                    split=split,
                    attributes=dict(spec.attributes),
                    caption=spec.caption,
                )
                for uri in uris
            )
    return rows


CONCEPT_SLOT = "{concept}"


class RetrievalQuery(BaseModel):
    """One composite text-to-image query with its ground truth, whatever catalog it came from.

    ``template`` is the query's words with one ``{concept}`` slot where the concept goes: a method fills it
    with "a <concept:ID> dress" (the token), "a dress" (the parent word) or a mix of the two. ``intent``
    is what the user adds to the concept ("on the beach"): the words previews are judged against.
    """

    model_config = ConfigDict(extra="forbid")

    query_id: NonEmptyStr
    concept_id: ConceptId
    parent: ParentWord
    template: NonEmptyStr
    intent: str
    relevant: list[NonEmptyStr] = Field(min_length=1, description="gallery item ids that answer the query")

    @field_validator("template")
    @classmethod
    def _one_slot(cls, v: str) -> str:
        if v.count(CONCEPT_SLOT) != 1 or v.replace(CONCEPT_SLOT, "").count("{") or "}" in v.replace(CONCEPT_SLOT, ""):
            raise ValueError(f"template must contain exactly one {CONCEPT_SLOT} slot and no other braces: {v!r}")
        return v

    def text(self, concept_phrase: str) -> str:
        """The query with ``concept_phrase`` in its slot, whitespace collapsed."""
        return " ".join(self.template.replace(CONCEPT_SLOT, concept_phrase).split())
