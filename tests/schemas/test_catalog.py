from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from schemas import CatalogManifest, CatalogRow, ConceptSpec, concepts_from_rows, rows_from_concepts


def _row(concept_id: str, split: str, uri: str, **kw: object) -> CatalogRow:
    parent = kw.pop("parent", "dress")
    return CatalogRow(concept_id=concept_id, parent=parent, image_uri=uri, split=split, **kw)


def test_concept_spec_needs_at_least_one_image() -> None:
    with pytest.raises(ValidationError, match="at least 1"):
        ConceptSpec(concept_id="a", parent="dress", image_uris=[])


def test_concept_spec_rejects_unknown_fields() -> None:
    with pytest.raises(ValidationError, match="extra"):
        ConceptSpec(concept_id="a", parent="dress", image_uris=["x.png"], colour="red")


def test_catalog_row_rejects_unknown_split() -> None:
    with pytest.raises(ValidationError):
        _row("a", "train", "x.png")


def test_concepts_from_rows_groups_by_concept_in_first_seen_order() -> None:
    rows = [
        _row("b", "fewshot", "b1.png", attributes={"colour": "red"}, caption="a red dress"),
        _row("a", "fewshot", "a1.png"),
        _row("b", "heldout", "b9.png", attributes={"colour": "red"}),
        _row("b", "fewshot", "b2.png"),
    ]
    specs = concepts_from_rows(rows)
    assert [s.concept_id for s in specs] == ["b", "a"]
    assert specs[0].image_uris == ["b1.png", "b2.png"]
    assert specs[0].heldout_uris == ["b9.png"]
    assert specs[0].attributes == {"colour": "red"}
    assert specs[0].caption == "a red dress"
    assert specs[1].heldout_uris == []


def test_concepts_from_rows_ignores_gallery_rows() -> None:
    rows = [_row("a", "fewshot", "a1.png"), _row("a", "gallery", "g1.png"), _row("g", "gallery", "g2.png")]
    specs = concepts_from_rows(rows)
    assert [(s.concept_id, s.image_uris) for s in specs] == [("a", ["a1.png"])]


def test_concepts_from_rows_rejects_inconsistent_parents() -> None:
    rows = [_row("a", "fewshot", "1.png"), _row("a", "fewshot", "2.png", parent="coat")]
    with pytest.raises(ValueError, match="inconsistent parents: 'dress' and 'coat'"):
        concepts_from_rows(rows)


def test_concepts_from_rows_rejects_conflicting_attributes() -> None:
    rows = [
        _row("a", "fewshot", "1.png", attributes={"colour": "red"}),
        _row("a", "fewshot", "2.png", attributes={"colour": "blue"}),
    ]
    with pytest.raises(ValueError, match="inconsistent attribute 'colour'"):
        concepts_from_rows(rows)


def test_concept_with_only_heldout_images_is_an_error() -> None:
    with pytest.raises(ValueError, match="no fewshot images"):
        concepts_from_rows([_row("a", "heldout", "1.png")])


def test_rows_from_concepts_and_back_is_lossless() -> None:
    specs = [
        ConceptSpec(
            concept_id="sku-1",
            parent="ankle boot",
            image_uris=["s3://b/1.png", "s3://b/2.png"],
            heldout_uris=["s3://b/3.png"],
            attributes={"colour": "teal", "pattern": "dots"},
            caption="a teal dotted ankle boot",
        ),
        ConceptSpec(concept_id="sku-2", parent="bag", image_uris=["s3://b/4.png"]),
    ]
    rows = rows_from_concepts(specs)
    assert [(r.concept_id, r.split) for r in rows] == [
        ("sku-1", "fewshot"),
        ("sku-1", "fewshot"),
        ("sku-1", "heldout"),
        ("sku-2", "fewshot"),
    ]
    assert concepts_from_rows(rows) == specs


def test_concept_spec_json_round_trip() -> None:
    spec = ConceptSpec(concept_id="a", parent="coat", image_uris=["x.png"], attributes={"k": "v"}, caption="c")
    assert ConceptSpec.model_validate_json(spec.model_dump_json()) == spec


def test_catalog_manifest_json_round_trip() -> None:
    manifest = CatalogManifest(
        name="fashion-world-small",
        created_at=datetime(2026, 11, 29, 8, 0, 0, 123456, tzinfo=timezone.utc),
        seed=7,
        concepts_uri="concepts.parquet",
        gallery_uri="gallery.parquet",
        queries_uri=None,
        n_concepts=12,
        n_images=96,
        extra={"renderer": {"size": 64}},
    )
    assert CatalogManifest.model_validate_json(manifest.model_dump_json()) == manifest


def test_catalog_manifest_defaults_created_at_to_now_utc() -> None:
    manifest = CatalogManifest(name="x", concepts_uri="c.parquet", n_concepts=0, n_images=0)
    assert manifest.created_at.tzinfo is timezone.utc
    assert abs((datetime.now(timezone.utc) - manifest.created_at).total_seconds()) < 60
