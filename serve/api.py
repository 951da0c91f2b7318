"""The HTTP contract of `/v1`: request and response models and the one error shape.

Requests forbid unknown fields and use strict types, so ``"top_k": "5"`` or a misspelt field is a 422
that names the field, not a silently ignored value. Every error, whatever raised it, is
``{"error": {"code": ..., "message": ...}}`` with a 4xx status (5xx only for timeouts and outages).
"""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic_core import PydanticCustomError

from schemas import ParentWord
from schemas.gair import GairRequest, GairResult


class ApiError(Exception):
    """An error meant for the client: HTTP status, a stable machine-readable code, a human message."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassifyRequest(Request):
    image: StrictStr | None = Field(default=None, description="the image file (PNG, JPEG, …), base64")
    image_uri: StrictStr | None = Field(default=None, description="s3:// URI of the image")
    parent: ParentWord | None = Field(default=None, description="only rank the concepts of this parent")
    top_k: StrictInt = 5

    @model_validator(mode="after")
    def _one_image(self) -> ClassifyRequest:
        if (self.image is None) == (self.image_uri is None):
            raise ValueError("give exactly one of image (base64) and image_uri")
        return self


class RetrieveRequest(Request):
    query: StrictStr = Field(description="text, with <concept:ID> markers for learned concepts")
    top_k: StrictInt = 10


class GenerateRequest(Request):
    prompt: StrictStr = Field(description="text, with <concept:ID> markers for learned concepts")
    n: StrictInt = 1
    seed: StrictInt = Field(default=0, ge=0, lt=2**31)
    steps: StrictInt = 30
    guidance: StrictFloat | StrictInt = Field(default=4.0, ge=1.0, le=20.0)


# Method checks whose pydantic error type is also one of this API's codes: a request failing only those is
# answered with that code (422 either way), as it was when the ingress checked α ranges and the replica the
# intent's markers; any other failure of the method's checks is an invalid_request, as every schema error.
METHOD_CHECK_CODES = ("out_of_range", "malformed_marker")
# Method options the service sets for its clients: ``guidance`` is part of the UNet price and of the studio's
# look, ``template`` would let a client write the whole prompt around the concept. A client sending them
# gets the answer any unknown field gets.
WITHHELD = ("guidance", "template")
# Sizes a request body may not exceed whatever the deployment's `Limits` (checked in the ingress) say.
MAX_ITEMS = {"concept_ids": 16, "alphas": 32, "expand_with": 8}


def _without_withheld(schema: dict[str, Any]) -> None:
    for name in WITHHELD:
        schema.get("properties", {}).pop(name, None)


@dataclass(kw_only=True, config=ConfigDict(extra="forbid", json_schema_extra=_without_withheld))
class GairApiRequest(GairRequest):
    """`/v1/gair`'s body: the method's request (`schemas.gair.GairRequest`: its fields, defaults, strict
    types and checks, so a new GAIR option is taken here unchanged) with only the service's strictness
    added: no unknown fields, `WITHHELD` options, body-size caps, and bounds the service alone imposes. The
    per-deployment limits (`serve.settings.Limits`) and the price are checked by the ingress."""

    @model_validator(mode="wrap")
    @classmethod
    def _answer_with_the_checks_code(cls, data: Any, handler) -> GairApiRequest:
        try:
            return handler(data)
        except ValidationError as e:
            errors = e.errors()
            if all(err["type"] in METHOD_CHECK_CODES for err in errors):
                # an ApiError is no ValueError: pydantic lets it through, and the app's handler answers it
                raise ApiError(422, errors[0]["type"], errors[0]["msg"]) from None
            raise

    @field_validator(*WITHHELD, mode="before")
    @classmethod
    def _withheld(cls, v: Any) -> Any:
        raise PydanticCustomError("unexpected_keyword_argument", "Unexpected keyword argument")  # as unknown fields

    @field_validator(*MAX_ITEMS)
    @classmethod
    def _capped(cls, v: Any, info: ValidationInfo) -> Any:
        cap = MAX_ITEMS[info.field_name]
        if v is not None and len(v) > cap:
            raise PydanticCustomError(
                "too_long",
                "List should have at most {max_length} items after validation, not {actual_length}",
                {"max_length": cap, "actual_length": len(v)},
            )
        return v

    @field_validator("seed")
    @classmethod
    def _seed_in_31_bits(cls, v: int) -> int:
        if not 0 <= v < 2**31:
            raise PydanticCustomError("seed_range", "seed must be in [0, 2^31), got {seed}", {"seed": v})
        return v

    @field_validator("expand", "intent_margin")
    @classmethod
    def _at_most_two(cls, v: float) -> float:
        # cosines differ by at most 2: a larger weight or margin says nothing more
        if v > 2.0:
            raise PydanticCustomError("less_than_equal", "Input should be less than or equal to 2")
        return v


class ReloadRequest(Request):
    version: StrictInt | None = Field(default=None, ge=1, description="pin a version (default: the newest)")


class ConceptScore(BaseModel):
    concept_id: str
    parent: str
    score: float


class ClassifyResponse(BaseModel):
    concepts: list[ConceptScore]
    registry_version: int


class Item(BaseModel):
    id: str
    uri: str | None
    score: float


class RetrieveResponse(BaseModel):
    items: list[Item]
    registry_version: int


class GenerateResponse(BaseModel):
    images: list[str] = Field(description="PNG files, base64")
    seed: int
    registry_version: int


class GairResponse(GairResult):
    """The method's result (`schemas.gair.GairResult`, written by its own ``model_dump(mode="json")``) and the
    registry version that answered."""

    registry_version: int


class TokenInfo(BaseModel):
    concept_id: str
    parent: str
    parametrization: str
    dim: int
    run_id: str
    created_at: str
    backbone: str
    thumbnails: int = Field(default=0, description="reference thumbnails at /v1/tokens/{id}/thumbnails/{k}")


class TokenDetail(TokenInfo):
    vector: list[float]
    metrics: dict[str, float]
    registry_version: int


class TokensResponse(BaseModel):
    tokens: list[TokenInfo]
    registry_version: int


class ReloadResponse(BaseModel):
    registry_version: int
    previous_version: int
