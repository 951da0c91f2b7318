from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import (
    ARROW_SCHEMAS,
    CatalogManifest,
    CatalogRow,
    TokenRecord,
    arrow_schema,
    from_arrow,
    to_arrow,
)

MakeToken = Callable[..., TokenRecord]


def _catalog_rows() -> list[CatalogRow]:
    return [
        CatalogRow(
            concept_id="sku-1",
            parent="dress",
            image_uri="s3://b/1.png",
            split="fewshot",
            attributes={"colour": "red", "pattern": "stripes"},
            caption="a red striped dress",
        ),
        CatalogRow(concept_id="sku-2", parent="ankle boot", image_uri="/data/2.png", split="gallery"),
    ]


def _tokens(make_token: MakeToken) -> list[TokenRecord]:
    return [
        make_token("sku-1"),
        make_token("sku-2", parametrization="free", coefficients=None, basis_id=None, metrics={}),
    ]


def _through_parquet(table: pa.Table) -> pa.Table:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return pq.read_table(pa.BufferReader(sink.getvalue()))


def _assert_tokens_equal(got: list[TokenRecord], want: list[TokenRecord]) -> None:
    # Vectors and coefficients are stored as float32: compare them with a float32 tolerance, and every
    # other field exactly.
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        exact = {"vector", "coefficients"}
        assert g.model_dump(exclude=exact) == w.model_dump(exclude=exact)
        np.testing.assert_allclose(g.vector, w.vector, rtol=1e-6)
        assert (g.coefficients is None) == (w.coefficients is None)
        if w.coefficients is not None:
            np.testing.assert_allclose(g.coefficients, w.coefficients, rtol=1e-6)


@pytest.mark.parametrize("model_cls", list(ARROW_SCHEMAS))
def test_arrow_schema_has_exactly_the_model_fields(model_cls: type) -> None:
    assert arrow_schema(model_cls).names == list(model_cls.model_fields)


def test_catalog_rows_round_trip_exactly() -> None:
    rows = _catalog_rows()
    table = to_arrow(rows, CatalogRow)
    assert table.schema == arrow_schema(CatalogRow)
    assert from_arrow(table, CatalogRow) == rows


def test_catalog_rows_round_trip_through_parquet() -> None:
    rows = _catalog_rows()
    assert from_arrow(_through_parquet(to_arrow(rows, CatalogRow)), CatalogRow) == rows


def test_token_records_round_trip(make_token: MakeToken) -> None:
    tokens = _tokens(make_token)
    table = to_arrow(tokens, TokenRecord)
    assert table.schema == arrow_schema(TokenRecord)
    assert table.schema.field("vector").type == pa.list_(pa.float32())
    assert table.schema.field("created_at").type == pa.timestamp("us", tz="UTC")
    _assert_tokens_equal(from_arrow(table, TokenRecord), tokens)


def test_token_records_round_trip_through_parquet(make_token: MakeToken) -> None:
    tokens = _tokens(make_token)
    _assert_tokens_equal(from_arrow(_through_parquet(to_arrow(tokens, TokenRecord)), TokenRecord), tokens)


def test_vectors_come_back_rounded_to_float32(make_token: MakeToken) -> None:
    token = make_token(dim=2, vector=[0.1, 1.0 / 3.0])
    (back,) = from_arrow(to_arrow([token], TokenRecord), TokenRecord)
    assert back.vector == [float(np.float32(0.1)), float(np.float32(1.0 / 3.0))]


def test_empty_input_gives_an_empty_typed_table() -> None:
    table = to_arrow([], TokenRecord)
    assert table.num_rows == 0
    assert table.schema == arrow_schema(TokenRecord)
    assert from_arrow(table, TokenRecord) == []


def test_from_arrow_matches_columns_by_name_and_ignores_extras() -> None:
    rows = _catalog_rows()
    table = to_arrow(rows, CatalogRow)
    shuffled = table.select(list(reversed(table.column_names))).append_column("width", pa.array([64, 64]))
    assert from_arrow(shuffled, CatalogRow) == rows


def test_from_arrow_fills_defaults_for_missing_optional_columns() -> None:
    table = pa.table({"concept_id": ["a"], "parent": ["dress"], "image_uri": ["1.png"], "split": ["fewshot"]})
    (row,) = from_arrow(table, CatalogRow)
    assert (row.attributes, row.caption) == ({}, None)


def test_from_arrow_names_missing_required_columns() -> None:
    table = pa.table({"concept_id": ["a"], "parent": ["dress"]})
    with pytest.raises(ValueError, match=r"lacks required columns: \['image_uri', 'split'\]"):
        from_arrow(table, CatalogRow)


def test_from_arrow_validates_rows() -> None:
    table = pa.table({"concept_id": ["../a"], "parent": ["dress"], "image_uri": ["1.png"], "split": ["fewshot"]})
    with pytest.raises(ValueError, match="invalid id"):
        from_arrow(table, CatalogRow)


def test_models_without_a_table_schema_are_refused() -> None:
    with pytest.raises(TypeError, match="CatalogManifest has no Arrow schema"):
        to_arrow([], CatalogManifest)


def test_to_arrow_refuses_records_of_another_model(make_token: MakeToken) -> None:
    with pytest.raises(TypeError, match="expected CatalogRow, got TokenRecord"):
        to_arrow([make_token()], CatalogRow)
