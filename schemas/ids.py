"""Identifier and small value types shared by every contract.

Concept ids and run ids end up inside storage keys (``_staging/<run_id>/``), prompt markers
(``<concept:ID>``) and URLs, so they are restricted to a conservative, path-safe alphabet. The rule is
enforced in one function, ``validate_concept_id``, so the message a user sees is the same whether the id
came from a catalog row, an HTTP request or the command line.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Annotated

from pydantic import AfterValidator, WithJsonSchema

CONCEPT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_CONCEPT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

CONCEPT_ID_RULE = (
    "1 to 128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, and never containing '..'"
)


def validate_concept_id(s: object) -> str:
    """Return ``s`` unchanged if it is a valid concept id, else raise ``ValueError`` saying why.

    ``re.fullmatch`` is used instead of the ``$``-anchored pattern because ``$`` also matches before a
    trailing newline, which would let ``"abc\\n"`` through. ``..`` is rejected explicitly: the alphabet
    alone would allow ``a..b``, and no id should ever look like a parent-directory step.
    """
    if not isinstance(s, str):
        raise ValueError(f"an id must be a string, got {type(s).__name__}; allowed: {CONCEPT_ID_RULE}")
    if not _CONCEPT_ID_RE.fullmatch(s) or ".." in s:
        raise ValueError(f"invalid id {s!r}: allowed are {CONCEPT_ID_RULE}")
    return s


# The JSON schema keeps the pattern so that OpenAPI clients see the rule; validation itself goes through
# validate_concept_id so the error message explains the rule instead of quoting a regex.
_ID_JSON_SCHEMA = WithJsonSchema({"type": "string", "pattern": CONCEPT_ID_PATTERN, "minLength": 1, "maxLength": 128})

ConceptId = Annotated[str, AfterValidator(validate_concept_id), _ID_JSON_SCHEMA]
"""A catalog concept's id (a SKU, a print name...). Path-safe, see ``CONCEPT_ID_RULE``."""

RunId = Annotated[str, AfterValidator(validate_concept_id), _ID_JSON_SCHEMA]
"""A job run's id. Same alphabet as concept ids because it names a staging folder in the registry."""


_PARENT_RE = re.compile(r"[a-z][a-z0-9]*(?:[ -][a-z][a-z0-9]*)*")


def validate_parent(s: object) -> str:
    """Normalise and check a parent word ("dress", "ankle boot", "t-shirt").

    The parent word is spliced into prompts ("a photo of a <concept:ID> dress"), so it is lower-cased and
    its whitespace collapsed; anything that is not plain lowercase words is rejected rather than guessed.
    """
    if not isinstance(s, str):
        raise ValueError(f"a parent word must be a string, got {type(s).__name__}")
    norm = " ".join(s.split()).lower()
    if not _PARENT_RE.fullmatch(norm):
        raise ValueError(
            f"invalid parent {s!r}: expected one or more lowercase words (letters, then letters or digits), "
            "separated by single spaces or hyphens, e.g. 'dress', 'ankle boot', 't-shirt'"
        )
    return norm


ParentWord = Annotated[str, AfterValidator(validate_parent)]


def _non_empty(s: str) -> str:
    if not s.strip():
        raise ValueError("must be a non-empty string")
    return s


NonEmptyStr = Annotated[str, AfterValidator(_non_empty)]


def _to_utc(dt: datetime) -> datetime:
    # Naive datetimes are rejected instead of assumed UTC: datetime.now() is local time, and silently
    # shifting it would corrupt run timings. Aware ones are normalised so equality and Arrow agree.
    if dt.tzinfo is None or dt.tzinfo.utcoffset(dt) is None:
        raise ValueError("datetime must be timezone-aware (use datetime.now(timezone.utc))")
    return dt.astimezone(timezone.utc)


UtcDatetime = Annotated[datetime, AfterValidator(_to_utc)]


def utc_now() -> datetime:
    """Now, as an aware UTC datetime (microsecond precision, exactly what Arrow's timestamp('us') keeps)."""
    return datetime.now(timezone.utc)


FLOAT32_MAX = 3.4028234663852886e38


def check_finite_float32(values: list[float], what: str) -> list[float]:
    """Raise if any value is NaN/inf or would overflow to inf once stored as float32."""
    for i, x in enumerate(values):
        if not math.isfinite(x) or abs(x) > FLOAT32_MAX:
            raise ValueError(f"{what}[{i}] = {x!r} is not a finite float32")
    return values
