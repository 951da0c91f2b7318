"""GAIR in one shape: the options, the request and the result of `factory.gair`, which the HTTP API
(`serve.api`) and the evaluation (`factory.evaluation.methods.GairSettings`) derive from instead of
restating.

    GairOptions   the knobs that hold for many queries (schedule, previews, rule, bisection, ...) and
                  their one set of defaults; the evaluation's settings are these
    GairRequest   GairOptions + one query (concept ids, intent, top_k, manual α, template); it checks
                  itself and prices itself (`GairRequest.unet_passes`)
    GairStep      one α of the trace: its scores, what its query retrieved, its previews
    GairResult    the kept α, every step, the ranking

Adding an option to GAIR is one field here (with its check) and its use in `factory.gair`: the API
takes it (unless `serve.api` withholds it) and the evaluation's settings have it.

The request and the options are pydantic *dataclasses*: callers build and change them as dataclasses
(``dataclasses.replace``, ``asdict`` into metrics.json) and pydantic checks every construction. The
field types are strict (``"5"`` is not a number) so the HTTP API needs no types of its own. A check that
a client can fail is a pydantic error whose ``type`` names what went wrong (``out_of_range``,
``malformed_marker``; else ``value_error``): the API answers it with that code.

The result keeps arrays in memory (previews as uint8 pixels, which the evaluation's figures draw;
features and queries, which the evaluation re-ranks with) and meets JSON only at the edge:
``GairResult.model_dump(mode="json")`` writes previews as base64 PNG files, hits as
``{"id", "uri", "score"}``, scores without evidence (NaN) as null, and leaves features and queries out.
Encoding PNGs in the method would cost every evaluation query an encode nobody reads, and decode again
for the figures.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, get_args

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    Strict,
    StrictInt,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from schemas.catalog import CONCEPT_SLOT
from schemas.ids import ConceptId

# Cosine (image vs text) by which the top item of an α's query may match the intent less well than the best
# α's and still be chosen for looking more like the concept (`factory.gair.choose_alpha`, rule
# "retrieval"). 2.0 is no veto at all (cosines differ by at most 2): the α whose top item is most like the
# concept's images wins; the intent still shapes every α's query, on both sides of the balance. Chosen on
# world seed 0 only, by MRR among the margins 0, .01, .02, .03, .05, .1 and none (README "GAIR's rule":
# 0.548 ... 0.845 and 0.859 with none; the oracle α 0.861); checked against GAIR's own fixed balances
# (0.541 ... 0.854, none 0.868, oracle 0.875); reported on seeds 1-3 with intervals.
DEFAULT_INTENT_MARGIN = 2.0

# Most bisection rounds a GAIR request may ask for (`factory.gair.bisection_alphas`): 8 halve the default
# schedule's 0.25 bracket to 0.001, finer than two queries can be told apart.
MAX_REFINE = 8

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
Rule = Literal["retrieval", "object", "previews"]
PreviewsFor = Literal["every", "chosen"]
Mode = Literal["auto", "manual"]
RULES: tuple[str, ...] = get_args(Rule)
PREVIEWS_FOR: tuple[str, ...] = get_args(PreviewsFor)

# A float that takes ints (0 is a fine α) but not strings or booleans.
Real = Annotated[float, Strict()]

# Anything that starts like a `<concept:ID>` marker (`factory.tokens.markers._MARKER_START`, which the
# schemas layer cannot import): intents and templates are plain words around one {concept} slot.
_MARKER_START = re.compile(r"<\s*concept\s*:", re.IGNORECASE)


def _out_of_range(message: str) -> PydanticCustomError:
    return PydanticCustomError("out_of_range", message)


@dataclass(kw_only=True)
class GairOptions:
    """How GAIR searches, renders and decides: everything but the query itself (`factory.gair`)."""

    alphas: Sequence[Real] = Field(default=DEFAULT_ALPHAS, description="auto: the α schedule to search")
    previews: StrictInt = Field(default=2, description="generated images per rendered α")
    steps: StrictInt = Field(default=20, description="DDIM steps per preview")
    guidance: Real = Field(default=4.0, description="classifier-free guidance of the previews (1: none)")
    seed: StrictInt = Field(default=0, description="the previews' noise; every α starts from the same")
    expand: Real = Field(
        default=0.0,
        ge=0.0,
        description="weight of the chosen α's previews' mean image feature added to the query (0: off)",
    )
    rule: Rule = Field(
        default="retrieval",
        description=(
            "auto: 'retrieval' keeps the α whose top item looks most like the concept while matching the intent "
            "within intent_margin; 'object' the same, measured against the concept's look-alikes (same parent) so "
            "its scenes cancel; 'previews' balances the previews' scores"
        ),
    )
    intent_margin: Real = Field(
        default=DEFAULT_INTENT_MARGIN, description="the retrieval rule's intent tolerance (cosine)"
    )
    refine: StrictInt = Field(default=0, description="auto: bisection rounds around the kept α (each adds up to two α)")
    previews_for: PreviewsFor = Field(
        default="every",
        description=(
            "render previews for every α searched, or only the chosen one (the retrieval rule decides without them)"
        ),
    )

    @field_validator("alphas", mode="before")
    @classmethod
    def _default_schedule(cls, v: Any) -> Any:
        return DEFAULT_ALPHAS if v is None else v  # null: the default schedule, as the HTTP API always took it

    @field_validator("alphas")
    @classmethod
    def _alphas_in_unit_interval(cls, v: Sequence[float]) -> Sequence[float]:
        if not v or any(not 0.0 <= a <= 1.0 for a in v):
            raise _out_of_range("alphas must be a non-empty list of values in [0, 1]")
        return v

    @field_validator("previews")
    @classmethod
    def _some_or_no_previews(cls, v: int) -> int:
        if v < 0:
            raise _out_of_range(f"previews must be >= 0, got {v}")
        return v

    @field_validator("steps")
    @classmethod
    def _at_least_one_step(cls, v: int) -> int:
        if v < 1:
            raise _out_of_range(f"steps must be >= 1, got {v}")
        return v

    @field_validator("intent_margin")
    @classmethod
    def _margin(cls, v: float) -> float:
        if not v >= 0:
            raise ValueError(f"intent_margin must be >= 0, got {v}")
        return v

    @field_validator("refine")
    @classmethod
    def _refine(cls, v: int) -> int:
        if not 0 <= v <= MAX_REFINE:
            raise ValueError(f"refine must be in [0, {MAX_REFINE}] bisection rounds, got {v}")
        return v

    @model_validator(mode="after")
    def _previews_rule_sees_every_alpha(self) -> GairOptions:
        if self.rule == "previews" and self._searches() and (self.previews == 0 or self.previews_for != "every"):
            raise ValueError(
                "the previews rule decides on every α's previews: it needs previews >= 1 and previews_for='every'"
            )
        return self

    def _searches(self) -> bool:
        """Whether these options search the schedule (``auto``); a request may instead take one α."""
        return True


@dataclass(kw_only=True)
class GairRequest(GairOptions):
    """One GAIR query: the options and what it asks for. Validated on construction (and by
    ``dataclasses.replace``); see `factory.gair` for what each field does."""

    concept_ids: list[ConceptId] = Field(description="the learned concept(s) the user means")
    intent: str = Field(description="plain words the user adds to the concept(s): 'on the beach'")
    top_k: StrictInt = Field(default=10, description="items in the ranking")
    mode: Mode = Field(default="auto", description="'auto': search the α schedule; 'manual': use alpha")
    alpha: Real | None = Field(default=None, ge=0.0, le=1.0, description="manual: the α to use")
    expand_with: list[StrictInt] | None = Field(
        default=None, description="which previews of the chosen α expand adds (default: all of them)"
    )
    template: str | None = Field(
        default=None, description="the query with one {concept} slot; default 'a photo of {concept} <intent>'"
    )

    @field_validator("concept_ids")
    @classmethod
    def _some_concept(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one concept")
        return v

    @field_validator("intent")
    @classmethod
    def _plain_intent(cls, v: str) -> str:
        if _MARKER_START.search(v):
            raise PydanticCustomError(
                "malformed_marker", "the intent must be plain words: concept markers belong in concept_ids"
            )
        return v

    @field_validator("top_k")
    @classmethod
    def _some_items(cls, v: int) -> int:
        if v < 1:
            raise _out_of_range(f"top_k must be >= 1, got {v}")
        return v

    @field_validator("expand_with")
    @classmethod
    def _some_previews_to_add(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and not v:
            raise ValueError("expand_with names no preview: leave it out to add all of them")
        return v

    @field_validator("template")
    @classmethod
    def _one_slot(cls, v: str | None) -> str | None:
        if v is not None and (v.count(CONCEPT_SLOT) != 1 or _MARKER_START.search(v)):
            raise ValueError(f"template must have exactly one {CONCEPT_SLOT} slot and no concept markers")
        return v

    @model_validator(mode="after")
    def _manual_needs_alpha(self) -> GairRequest:
        if self.mode == "manual" and self.alpha is None:
            raise ValueError("manual mode needs an alpha")
        return self

    def _searches(self) -> bool:
        return self.mode == "auto"

    @classmethod
    def of(cls, options: GairOptions, **query: Any) -> GairRequest:
        """The request ``options`` make for one query (``concept_ids``, ``intent``, …; any option may be
        overridden by name)."""
        fields = {f.name: getattr(options, f.name) for f in dataclasses.fields(GairOptions)}
        return cls(**{**fields, **query})

    def rendered_alphas(self) -> int:
        """How many α this request renders previews for, at most: the chosen one alone, or every α searched
        (the schedule, and at most two midpoints per bisection round, `factory.gair.bisection_alphas`)."""
        if not self._searches():
            return 1
        return 1 if self.previews_for == "chosen" else len(self.alphas) + 2 * self.refine

    def unet_passes(self) -> int:
        """UNet evaluations (per image and step) this request costs at most: what a service prices it by.
        Classifier-free guidance runs the UNet on the prompt and on the empty prompt, hence twice."""
        return self.previews * self.rendered_alphas() * self.steps * (2 if self.guidance != 1.0 else 1)


# ---- the result -------------------------------------------------------------------------------------

Hit = tuple[str, str | None, float]  # (item id, its URI, score) as `factory.index` search returns it


class HitJson(TypedDict):
    id: str
    uri: str | None
    score: float


def _hits_json(hits: Sequence[Hit]) -> list[HitJson]:
    return [{"id": i, "uri": u, "score": float(s)} for i, u, s in hits]


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN: a score with no evidence behind it is null


def png_base64(images: np.ndarray) -> list[str]:
    """uint8 [n, H, W, 3] -> n PNG files, base64: how previews travel in JSON."""
    from PIL import Image  # only where a result is written as JSON

    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(im, dtype=np.uint8)).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


Hits = Annotated[list[Hit], PlainSerializer(_hits_json, return_type=list[HitJson], when_used="json")]
Score = Annotated[float, PlainSerializer(_finite, return_type=float | None, when_used="json")]
Previews = Annotated[
    np.ndarray,
    PlainSerializer(png_base64, return_type=list[str], when_used="json"),
    WithJsonSchema({"type": "array", "items": {"type": "string"}}),
]
Internal = SkipJsonSchema[np.ndarray | None]  # in memory only: never in JSON nor in its schema


def _no_previews() -> np.ndarray:
    return np.zeros((0, 0, 0, 3), np.uint8)


class GairStep(BaseModel):
    """One α of the trace. Scores are NaN (null in JSON) where there is no evidence: no previews
    rendered for this α (`GairOptions.previews_for`), or nothing retrieved (an empty gallery)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    alpha: float
    fidelity: Score = Field(
        default=math.nan,
        description="previews vs the concepts' reference images (mean "
        "cosine); null where this α was not rendered (previews_for)",
    )
    intent: Score = Field(
        default=math.nan, description="previews vs the words-only query (mean cosine); null: not rendered"
    )
    score: Score = Field(default=0.0, description="what the rule maximises over the admitted α")
    admitted: bool = Field(default=True, description="passed the rule's gate (retrieval rule: the intent margin)")
    retrieved_fidelity: Score = Field(default=math.nan, description="q(α)'s top item vs the concepts' reference images")
    retrieved_intent: Score = Field(default=math.nan, description="q(α)'s top item vs the words-only query q(0)")
    retrieved_object: Score = Field(
        default=math.nan,
        description="retrieved_fidelity less the top item's best cosine to a look-alike (same parent) concept's images",
    )
    retrieved: Hits = Field(default_factory=list, description="q(α)'s top items")
    previews: Previews = Field(
        default_factory=_no_previews,
        description="PNG files, base64 (in memory: uint8 [n, H, W, 3]); none where this α was not rendered",
    )
    features: Internal = Field(default=None, exclude=True, repr=False)  # [n, D] normalised CLIP features of previews
    query: Internal = Field(default=None, exclude=True, repr=False)  # [D] q(α), normalised


class GairResult(BaseModel):
    """What a GAIR request answers: the kept α, every step searched (sorted by α) and the ranking."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    alpha: float
    steps: list[GairStep]
    ranking: Hits = Field(default_factory=list, description="what the final query retrieves")
    query: Internal = Field(default=None, exclude=True, repr=False)  # [D] the final normalised query


__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_INTENT_MARGIN",
    "MAX_REFINE",
    "PREVIEWS_FOR",
    "RULES",
    "GairOptions",
    "GairRequest",
    "GairResult",
    "GairStep",
    "Hit",
    "Mode",
    "PreviewsFor",
    "Real",
    "Rule",
    "png_base64",
]
