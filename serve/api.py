"""The HTTP contract of `/v1`: request and response models and the one error shape.

Requests forbid unknown fields and use strict types, so ``"top_k": "5"`` or a misspelt field is a 422
that names the field, not a silently ignored value. Every error, whatever raised it, is
``{"error": {"code": ..., "message": ...}}`` with a 4xx status (5xx only for timeouts and outages).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, model_validator

from schemas import DEFAULT_INTENT_MARGIN, MAX_REFINE, ConceptId, ParentWord


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


class GairApiRequest(Request):
    concept_ids: list[ConceptId] = Field(min_length=1, max_length=16)
    intent: StrictStr = Field(description="plain words the user adds to the concept(s): 'on the beach'")
    top_k: StrictInt = 10
    mode: Literal["auto", "manual"] = "auto"
    alphas: list[StrictFloat | StrictInt] | None = Field(default=None, max_length=32,
                                                         description="auto: the α schedule to search")
    alpha: StrictFloat | StrictInt | None = Field(default=None, ge=0.0, le=1.0, description="manual: the α to use")
    previews: StrictInt = 2
    steps: StrictInt = 20
    seed: StrictInt = Field(default=0, ge=0, lt=2**31)
    expand: StrictFloat | StrictInt = Field(default=0.0, ge=0.0, le=2.0,
                                           description="weight of accepted previews' image features added to the query")
    expand_with: list[StrictInt] | None = Field(default=None, min_length=1, max_length=8,
                                                description="which previews of the chosen α to add (default: all)")
    rule: Literal["retrieval", "object", "previews"] = Field(
        default="retrieval", description="auto: 'retrieval' keeps the α whose top item looks most like the concept "
        "while matching the intent within intent_margin; 'object' the same, measured against the concept's "
        "look-alikes (same parent) so its scenes cancel; 'previews' balances the previews' scores")
    intent_margin: StrictFloat | StrictInt = Field(default=DEFAULT_INTENT_MARGIN, ge=0.0, le=2.0,
                                                   description="the retrieval rule's intent tolerance (cosine)")
    refine: StrictInt = Field(default=0, ge=0, le=MAX_REFINE,
                              description="auto: bisection rounds around the kept α (each adds up to two α)")
    previews_for: Literal["every", "chosen"] = Field(
        default="every", description="render previews for every α searched, or only the chosen one (the "
        "retrieval rule decides without them)")


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


class GairStepOut(BaseModel):
    alpha: float
    fidelity: float | None = Field(description="previews vs the concepts' reference images (mean cosine); "
                                   "null where this α was not rendered (previews_for)")
    intent: float | None = Field(description="previews vs the words-only query (mean cosine); null: not rendered")
    score: float | None = Field(description="what the rule maximises over the admitted α")
    admitted: bool = Field(description="passed the rule's gate (retrieval rule: the intent margin)")
    retrieved_fidelity: float | None = Field(description="q(α)'s top item vs the concepts' reference images")
    retrieved_intent: float | None = Field(description="q(α)'s top item vs the words-only query")
    retrieved_object: float | None = Field(default=None, description="retrieved_fidelity less the top item's best "
                                           "cosine to a look-alike (same parent) concept's images")
    retrieved: list[Item] = Field(description="q(α)'s top items")
    previews: list[str] = Field(description="PNG files, base64")


class GairResponse(BaseModel):
    alpha: float
    steps: list[GairStepOut]
    ranking: list[Item]
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
