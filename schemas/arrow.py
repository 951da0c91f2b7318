"""Explicit Arrow schemas for the contracts that are stored as tables, and model <-> table conversion.

The schemas are written out rather than inferred so that every Parquet file of a kind has the same column
types whatever its first rows happen to hold (an all-null ``caption`` column would otherwise be inferred
as ``null`` and clash with the next shard).

Round trips are exact except for one documented loss: vectors and coefficients are stored as float32
(that is what the embedding tables hold, and it halves the storage), so a Python float comes back rounded
to the nearest float32. Everything else, timestamps included (microseconds, UTC), comes back equal.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

import pyarrow as pa
from pydantic import BaseModel

from schemas.catalog import CatalogRow
from schemas.tokens import TokenRecord

UTC_TIMESTAMP = pa.timestamp("us", tz="UTC")

CATALOG_ROW_SCHEMA = pa.schema(
    [
        pa.field("concept_id", pa.string(), nullable=False),
        pa.field("parent", pa.string(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("attributes", pa.map_(pa.string(), pa.string()), nullable=False),
        pa.field("caption", pa.string()),
    ],
    metadata={"tokenfactory.schema": "CatalogRow/1"},
)

TOKEN_RECORD_SCHEMA = pa.schema(
    [
        pa.field("concept_id", pa.string(), nullable=False),
        pa.field("parent", pa.string(), nullable=False),
        pa.field("backbone", pa.string(), nullable=False),
        pa.field("backbone_fingerprint", pa.string(), nullable=False),
        pa.field("dim", pa.int32(), nullable=False),
        pa.field("vector", pa.list_(pa.float32()), nullable=False),
        pa.field("parametrization", pa.string(), nullable=False),
        pa.field("coefficients", pa.list_(pa.float32())),
        pa.field("basis_id", pa.string()),
        pa.field("prototype", pa.list_(pa.float32())),
        pa.field("thumbnails", pa.list_(pa.string())),
        pa.field("metrics", pa.map_(pa.string(), pa.float64()), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("created_at", UTC_TIMESTAMP, nullable=False),
    ],
    metadata={"tokenfactory.schema": "TokenRecord/1"},
)

ARROW_SCHEMAS: dict[type[BaseModel], pa.Schema] = {
    CatalogRow: CATALOG_ROW_SCHEMA,
    TokenRecord: TOKEN_RECORD_SCHEMA,
}

M = TypeVar("M", bound=BaseModel)


def arrow_schema(model_cls: type[BaseModel]) -> pa.Schema:
    """The Arrow schema of a table-stored model; ``TypeError`` for models that are stored as JSON."""
    try:
        return ARROW_SCHEMAS[model_cls]
    except KeyError:
        known = ", ".join(c.__name__ for c in ARROW_SCHEMAS)
        raise TypeError(f"{model_cls.__name__} has no Arrow schema (tables exist for: {known})") from None


def _map_columns(schema: pa.Schema) -> list[str]:
    return [f.name for f in schema if pa.types.is_map(f.type)]


def to_arrow(records: Iterable[M], model_cls: type[M]) -> pa.Table:
    """Build a table with the model's explicit schema (an empty input gives an empty, typed table)."""
    schema = arrow_schema(model_cls)
    maps = _map_columns(schema)
    rows: list[dict[str, Any]] = []
    for record in records:
        if not isinstance(record, model_cls):
            raise TypeError(f"expected {model_cls.__name__}, got {type(record).__name__}")
        row = record.model_dump()
        # Arrow maps are lists of key/value pairs; giving pairs explicitly keeps insertion order.
        for name in maps:
            row[name] = list(row[name].items())
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=schema)


def from_arrow(table: pa.Table, model_cls: type[M]) -> list[M]:
    """Validate every row of ``table`` into ``model_cls``.

    Columns are matched by name, so column order does not matter and unknown columns are ignored (a
    catalog exported by another tool may carry more). A missing column is an error unless the model has
    a default for it.
    """
    schema = arrow_schema(model_cls)
    present = [f.name for f in schema if f.name in table.column_names]
    missing = [
        f.name for f in schema if f.name not in table.column_names and model_cls.model_fields[f.name].is_required()
    ]
    if missing:
        raise ValueError(f"table for {model_cls.__name__} lacks required columns: {missing}")
    maps = [name for name in _map_columns(schema) if name in present]
    out: list[M] = []
    for row in table.select(present).to_pylist():
        for name in maps:
            if row[name] is not None:
                row[name] = dict(row[name])
        out.append(model_cls.model_validate(row))
    return out
