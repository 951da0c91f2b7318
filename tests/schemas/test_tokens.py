import math
from collections.abc import Callable
from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from schemas import RegistryFile, RegistryManifest, TokenRecord

MakeToken = Callable[..., TokenRecord]
SHA = "ab" * 32


def test_valid_token_record(make_token: MakeToken) -> None:
    token = make_token(dim=4)
    assert token.dim == len(token.vector) == 4
    assert token.created_at.tzinfo is timezone.utc


def test_vector_length_must_equal_dim(make_token: MakeToken) -> None:
    with pytest.raises(ValidationError, match="vector has 3 values but dim is 4"):
        make_token(dim=4, vector=[0.0, 1.0, 2.0])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e39])
def test_vector_values_must_be_finite_float32(make_token: MakeToken, bad: float) -> None:
    with pytest.raises(ValidationError, match=r"vector\[1\]"):
        make_token(dim=3, vector=[0.0, bad, 0.0])


def test_coefficients_must_be_finite(make_token: MakeToken) -> None:
    with pytest.raises(ValidationError, match=r"coefficients\[0\]"):
        make_token(coefficients=[math.nan])


def test_dim_must_be_positive(make_token: MakeToken) -> None:
    with pytest.raises(ValidationError):
        make_token(dim=0, vector=[])


def test_projected_token_needs_coefficients_and_basis(make_token: MakeToken) -> None:
    with pytest.raises(ValidationError, match="needs non-empty coefficients and a basis_id"):
        make_token(coefficients=None)
    with pytest.raises(ValidationError, match="needs non-empty coefficients and a basis_id"):
        make_token(basis_id=None)


def test_free_token_has_no_coefficients(make_token: MakeToken) -> None:
    token = make_token(parametrization="free", coefficients=None, basis_id=None)
    assert token.coefficients is None
    with pytest.raises(ValidationError, match="a free token has no coefficients"):
        make_token(parametrization="free")


def test_token_record_rejects_bad_run_id(make_token: MakeToken) -> None:
    with pytest.raises(ValidationError, match="run_id"):
        make_token(run_id="runs/1")


def test_token_record_json_round_trip(make_token: MakeToken) -> None:
    token = make_token()
    assert TokenRecord.model_validate_json(token.model_dump_json()) == token


@pytest.mark.parametrize("bad", ["../x.parquet", "/abs.parquet", "a//b", "s3://b/k", "", "./x"])
def test_registry_file_path_must_stay_inside_the_version(bad: str) -> None:
    with pytest.raises(ValidationError, match="plain relative path"):
        RegistryFile(path=bad, sha256=SHA, bytes=1, rows=1)


@pytest.mark.parametrize("bad", ["AB" * 32, "ab" * 31, "zz" * 32])
def test_registry_file_sha256_must_be_lowercase_hex(bad: str) -> None:
    with pytest.raises(ValidationError, match="64 lowercase hex"):
        RegistryFile(path="tokens-a.parquet", sha256=bad, bytes=1, rows=1)


def _manifest(**overrides: object) -> RegistryManifest:
    fields: dict[str, object] = {
        "version": 3,
        "run_id": "run-1",
        "created_at": datetime(2026, 11, 29, tzinfo=timezone.utc),
        "backbone": "fashion-mini",
        "backbone_fingerprint": "fp",
        "n_tokens": 5,
        "files": [
            RegistryFile(path="tokens-a.parquet", sha256=SHA, bytes=100, rows=2),
            RegistryFile(path="tokens-b.parquet", sha256="cd" * 32, bytes=120, rows=3),
        ],
        "config": {"lr": 0.01, "templates": ["a photo of {}"]},
        "report": {"concepts_learned": 5},
    }
    fields.update(overrides)
    return RegistryManifest(**fields)


def test_registry_manifest_json_round_trip() -> None:
    manifest = _manifest()
    assert manifest.format == "tokenfactory.registry/1"
    assert RegistryManifest.model_validate_json(manifest.model_dump_json()) == manifest


def test_registry_manifest_counts_must_agree() -> None:
    with pytest.raises(ValidationError, match="n_tokens is 4 but the files hold 5 rows"):
        _manifest(n_tokens=4)


def test_registry_manifest_rejects_a_file_listed_twice() -> None:
    f = RegistryFile(path="tokens-a.parquet", sha256=SHA, bytes=1, rows=1)
    with pytest.raises(ValidationError, match="listed twice"):
        _manifest(files=[f, f], n_tokens=2)


def test_registry_manifest_rejects_unknown_format() -> None:
    with pytest.raises(ValidationError):
        _manifest(format="tokenfactory.registry/2")
