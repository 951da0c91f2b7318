from datetime import datetime, timedelta, timezone

import pytest
from pydantic import BaseModel, ValidationError

from schemas import CONCEPT_ID_RULE, ConceptId, ParentWord, UtcDatetime, validate_concept_id, validate_parent


class _HasId(BaseModel):
    concept_id: ConceptId


class _HasParent(BaseModel):
    parent: ParentWord


class _HasTime(BaseModel):
    at: UtcDatetime


@pytest.mark.parametrize("good", ["a", "sku-123", "A.b_c-9", "0", "x" * 128, "v1.2"])
def test_valid_concept_ids_are_returned_unchanged(good: str) -> None:
    assert validate_concept_id(good) == good
    assert _HasId(concept_id=good).concept_id == good


@pytest.mark.parametrize(
    "bad",
    [
        *("a/b", "../x", "", ".hidden", "x" * 129, "a..b", "-lead", "_lead"),
        *("sp ace", "tab\t", "abc\n", "é", "a\\b"),
    ],
)
def test_invalid_concept_ids_raise_value_error_explaining_the_rule(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_concept_id(bad)
    assert CONCEPT_ID_RULE in str(info.value)


@pytest.mark.parametrize("bad", ["a/b", "../x", "", ".hidden", "x" * 129])
def test_models_reject_invalid_concept_ids(bad: str) -> None:
    with pytest.raises(ValidationError, match="allowed are"):
        _HasId(concept_id=bad)


def test_non_string_id_is_rejected() -> None:
    with pytest.raises(ValueError, match="must be a string"):
        validate_concept_id(123)


def test_concept_id_json_schema_carries_the_pattern() -> None:
    prop = _HasId.model_json_schema()["properties"]["concept_id"]
    assert prop["pattern"] == "^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
    assert prop["maxLength"] == 128


@pytest.mark.parametrize(
    ("raw", "norm"),
    [("dress", "dress"), ("  Ankle   Boot ", "ankle boot"), ("T-Shirt", "t-shirt"), ("top2", "top2")],
)
def test_parent_words_are_normalised_to_lowercase_words(raw: str, norm: str) -> None:
    assert validate_parent(raw) == norm
    assert _HasParent(parent=raw).parent == norm


@pytest.mark.parametrize("bad", ["", "   ", "dress!", "2dress", "a--b", "dress/shirt", "robe_de"])
def test_bad_parent_words_are_rejected(bad: str) -> None:
    with pytest.raises(ValidationError, match="lowercase words"):
        _HasParent(parent=bad)


def test_naive_datetimes_are_rejected() -> None:
    with pytest.raises(ValidationError, match="timezone-aware"):
        _HasTime(at=datetime(2026, 1, 1, 12, 0))


def test_aware_datetimes_are_converted_to_utc() -> None:
    paris = timezone(timedelta(hours=1))
    at = _HasTime(at=datetime(2026, 1, 1, 13, 0, tzinfo=paris)).at
    assert at == datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    assert at.tzinfo is timezone.utc
