"""Learned tokens and the registry manifest that makes a set of them an immutable version."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    field_validator,
    model_validator,
)

from schemas.ids import (
    ConceptId,
    NonEmptyStr,
    ParentWord,
    RunId,
    UtcDatetime,
    check_finite_float32,
    utc_now,
)

Parametrization = Literal["projected", "free"]


class TokenRecord(BaseModel):
    """One learned token: the vector that replaces the placeholder's input embedding, plus provenance.

    ``vector`` is stored as float32 in Parquet, so values must be finite *as float32*; after a round trip
    through Arrow they come back rounded to float32 precision. A ``projected`` token (``v = U_p c``) must
    carry its coefficients and the id of its basis so it can be re-derived or fine-tuned later; a ``free``
    token has no coefficients.
    """

    model_config = ConfigDict(extra="forbid")

    concept_id: ConceptId
    parent: ParentWord
    backbone: NonEmptyStr
    backbone_fingerprint: NonEmptyStr = Field(description="hash of the frozen weights the token fits")
    dim: PositiveInt
    vector: list[float]
    parametrization: Parametrization
    coefficients: list[float] | None = None
    basis_id: str | None = None
    prototype: list[float] | None = Field(
        default=None,
        description="mean normalised CLIP image feature of the concept's few-shot images: the reference that "
        "GAIR scores generated previews against",
    )
    thumbnails: list[str] | None = Field(
        default=None,
        max_length=4,
        description="base64 PNGs (at most 4, each at most 64 px a side) of the concept's few-shot images: what a "
        "person sees of the concept in the GAIR studio",
    )
    metrics: dict[str, float] = Field(default_factory=dict)
    run_id: RunId
    created_at: UtcDatetime = Field(default_factory=utc_now)

    @field_validator("vector")
    @classmethod
    def _vector_finite(cls, v: list[float]) -> list[float]:
        return check_finite_float32(v, "vector")

    @field_validator("coefficients")
    @classmethod
    def _coefficients_finite(cls, v: list[float] | None) -> list[float] | None:
        return None if v is None else check_finite_float32(v, "coefficients")

    @field_validator("prototype")
    @classmethod
    def _prototype_finite(cls, v: list[float] | None) -> list[float] | None:
        return None if v is None else check_finite_float32(v, "prototype")

    @field_validator("thumbnails")
    @classmethod
    def _small_pngs(cls, v: list[str] | None) -> list[str] | None:
        for t in v or []:
            if len(t) > 24_000 or not t.startswith("iVBORw0KGgo"):  # base64 of the PNG signature
                raise ValueError("a thumbnail must be a base64 PNG under 18 KB")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TokenRecord:
        if len(self.vector) != self.dim:
            raise ValueError(f"vector has {len(self.vector)} values but dim is {self.dim}")
        if self.parametrization == "projected":
            if not self.coefficients or self.basis_id is None:
                raise ValueError("a projected token needs non-empty coefficients and a basis_id")
            if len(self.coefficients) > self.dim:
                raise ValueError(f"{len(self.coefficients)} coefficients for a {self.dim}-dim space")
        elif self.coefficients is not None:
            raise ValueError("a free token has no coefficients (use parametrization='projected')")
        return self


_SHA256_RE = re.compile(r"[0-9a-f]{64}")


class RegistryFile(BaseModel):
    """A data file of a registry version, as recorded in its manifest."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="relative to the version folder, e.g. tokens-w0.parquet")
    sha256: str
    bytes: NonNegativeInt
    rows: NonNegativeInt

    @field_validator("path")
    @classmethod
    def _relative(cls, p: str) -> str:
        # The manifest is trusted to name files inside its own folder only.
        parts = p.split("/")
        if not p or p.startswith("/") or "://" in p or any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"file path {p!r} must be a plain relative path inside the version folder")
        return p

    @field_validator("sha256")
    @classmethod
    def _hex(cls, h: str) -> str:
        if not _SHA256_RE.fullmatch(h):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {h!r}")
        return h


REGISTRY_FORMAT = "tokenfactory.registry/1"


class RegistryManifest(BaseModel):
    """Written last into a version folder: its presence is what makes the version committed."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["tokenfactory.registry/1"] = REGISTRY_FORMAT
    version: PositiveInt
    run_id: RunId
    created_at: UtcDatetime = Field(default_factory=utc_now)
    backbone: NonEmptyStr
    backbone_fingerprint: NonEmptyStr
    n_tokens: NonNegativeInt
    files: list[RegistryFile]
    config: dict[str, Any] = Field(default_factory=dict)
    report: dict[str, Any] | None = None
    claim: str | None = Field(default=None, description="nonce of the version claim this commit holds")

    @model_validator(mode="after")
    def _counts_agree(self) -> RegistryManifest:
        rows = sum(f.rows for f in self.files)
        if rows != self.n_tokens:
            raise ValueError(f"n_tokens is {self.n_tokens} but the files hold {rows} rows")
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("a file is listed twice in the manifest")
        return self
