"""`factory.catalog`: a catalog's image URIs stay inside the catalog unless the caller allows otherwise."""

from __future__ import annotations

import json

import pytest

from factory import storage
from factory.catalogs import read_concepts, read_rows
from factory.errors import CatalogError


def _row(uri: str, i: int = 0) -> dict:
    return {"concept_id": f"sku-{i}", "parent": "dress", "image_uri": uri, "split": "fewshot"}


def _jsonl(rows) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


@pytest.mark.s3
@pytest.mark.parametrize(
    "escape",
    [
        "file:///root/.aws/credentials",
        "file:///proc/self/environ",
        "/etc/passwd",
        "s3://another-bucket/image.png",
        "../../outside.png",
    ],
)
def test_an_s3_catalog_cannot_point_outside_its_bucket(s3_server, s3_bucket, escape):
    uri = f"{s3_bucket}/catalog/rows.jsonl"
    storage.write_bytes(uri, _jsonl([_row(f"{s3_bucket}/catalog/a.png"), _row(escape, 1)]), s3_server.s3_options)
    with pytest.raises(CatalogError, match="outside"):
        read_concepts(uri, s3_server.s3_options)
    assert len(read_rows(uri, s3_server.s3_options, allow_outside=True)) == 2  # the flag lifts it


def test_a_local_catalog_keeps_to_its_folder(tmp_path):
    folder = tmp_path / "catalog"
    folder.mkdir()
    (folder / "rows.jsonl").write_bytes(_jsonl([_row("images/a.png"), _row(str(folder / "images" / "b.png"), 1)]))
    assert [r.image_uri for r in read_rows(str(folder / "rows.jsonl"))] == [
        str(folder / "images" / "a.png"),
        str(folder / "images" / "b.png"),
    ]
    (folder / "bad.jsonl").write_bytes(_jsonl([_row("images/../../secret.png")]))
    with pytest.raises(CatalogError, match="outside"):
        read_rows(str(folder / "bad.jsonl"))
