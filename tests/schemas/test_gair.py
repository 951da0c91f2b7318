"""GAIR's one shape: the request checks and prices itself, options and request share their defaults, and the
result meets JSON only when dumped (pixels in memory, PNG files and nulls in JSON)."""

import base64
import dataclasses
import io
import math

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from schemas import DEFAULT_ALPHAS, MAX_REFINE, GairOptions, GairRequest, GairResult, GairStep


def _req(**kw) -> GairRequest:
    return GairRequest(**{"concept_ids": ["sku-1"], "intent": "on the beach", **kw})


def test_a_request_is_its_options_plus_one_query_with_the_same_defaults():
    options = GairOptions()
    req = GairRequest.of(options, concept_ids=["sku-1"], intent="x")
    for f in dataclasses.fields(GairOptions):
        assert getattr(req, f.name) == getattr(options, f.name) == getattr(_req(), f.name), f.name
    assert GairRequest.of(GairOptions(steps=7), concept_ids=["a"], intent="x", steps=3).steps == 3  # per-query override
    assert _req(alphas=None).alphas == DEFAULT_ALPHAS  # null is the default schedule


@pytest.mark.parametrize(
    "bad, error_type, words",
    [
        ({"alphas": [0.5, 1.5]}, "out_of_range", "alphas"),
        ({"alphas": []}, "out_of_range", "alphas"),
        ({"previews": -1}, "out_of_range", "previews"),
        ({"steps": 0}, "out_of_range", "steps"),
        ({"top_k": 0}, "out_of_range", "top_k"),
        ({"intent": "on the <concept:sku-2> beach"}, "malformed_marker", "plain words"),
        ({"intent": "on the < concept: beach"}, "malformed_marker", "plain words"),
        ({"mode": "manual"}, "value_error", "manual mode needs an alpha"),
        ({"refine": MAX_REFINE + 1}, "value_error", "refine"),
        ({"rule": "previews", "previews_for": "chosen"}, "value_error", "previews rule"),
        ({"rule": "previews", "previews": 0}, "value_error", "previews rule"),
        ({"intent_margin": -0.1}, "value_error", "intent_margin"),
        ({"concept_ids": []}, "value_error", "at least one concept"),
        ({"concept_ids": ["../x"]}, "value_error", "invalid id"),
        ({"template": "no slot"}, "value_error", "slot"),
        ({"template": "{concept} and <concept:sku-2>"}, "value_error", "slot"),
        ({"expand_with": []}, "value_error", "expand_with"),
        ({"expand": -1.0}, "greater_than_equal", "expand"),
        ({"alpha": 1.5, "mode": "manual"}, "less_than_equal", "alpha"),
        ({"rule": "vibes"}, "literal_error", "rule"),
        ({"top_k": "5"}, "int_type", "top_k"),  # strict: a string is not a number
        ({"steps": 2.0}, "int_type", "steps"),
        ({"alpha": True, "mode": "manual"}, "float_type", "alpha"),
    ],
)
def test_a_request_refuses_what_cannot_run_and_names_the_kind_of_error(bad, error_type, words):
    with pytest.raises(ValidationError, match=words) as e:
        _req(**bad)
    assert e.value.errors()[0]["type"] == error_type
    assert isinstance(e.value, ValueError)  # callers that catch ValueError keep working


def test_manual_mode_may_use_any_rule_and_ints_are_numbers():
    req = _req(mode="manual", alpha=0, rule="previews", previews_for="chosen")  # manual never decides by rule
    assert req.alpha == 0.0 and isinstance(req.alpha, float)


def test_replace_checks_the_new_request_too():
    req = _req()
    assert dataclasses.replace(req, refine=2).refine == 2
    with pytest.raises(ValidationError, match="alphas"):
        dataclasses.replace(req, alphas=[2.0])


@pytest.mark.parametrize(
    "kw, rendered",
    [
        ({"alphas": [0.0, 0.5, 1.0]}, 3),
        ({"alphas": [0.0, 0.5, 1.0], "refine": 2}, 3 + 2 * 2),  # at most two midpoints a bisection round
        ({"alphas": [0.0, 0.5, 1.0], "refine": 2, "previews_for": "chosen"}, 1),
        ({"mode": "manual", "alpha": 0.2, "refine": 3}, 1),  # manual neither searches nor bisects
    ],
)
def test_unet_passes_count_images_steps_and_guidance(kw, rendered):
    req = _req(previews=2, steps=5, **kw)
    assert req.rendered_alphas() == rendered
    assert req.unet_passes() == 2 * rendered * 5 * 2  # classifier-free guidance: two UNet passes a step
    assert dataclasses.replace(req, guidance=1.0).unet_passes() == 2 * rendered * 5
    assert dataclasses.replace(req, previews=0).unet_passes() == 0


def test_the_result_dumps_to_json_once_pngs_nulls_and_hits():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    rendered = GairStep(
        alpha=1.0,
        fidelity=0.3,
        intent=0.2,
        score=0.5,
        previews=pixels,
        features=np.ones((2, 4)),
        query=np.ones(4),
        retrieved=[("g1", "s3://b/g1.png", np.float32(0.25))],
        retrieved_fidelity=0.1,
        retrieved_intent=0.2,
        retrieved_object=0.05,
    )
    unrendered = GairStep(alpha=0.0, query=np.ones(4))
    res = GairResult(alpha=1.0, steps=[unrendered, rendered], ranking=[("g1", None, 0.5)], query=np.ones(4))
    out = res.model_dump(mode="json")
    assert set(out) == {"alpha", "steps", "ranking"}  # the query stays in memory
    assert out["ranking"] == [{"id": "g1", "uri": None, "score": 0.5}]
    blank, full = out["steps"]
    assert set(full) == {
        "alpha",
        "fidelity",
        "intent",
        "score",
        "admitted",
        "retrieved_fidelity",
        "retrieved_intent",
        "retrieved_object",
        "retrieved",
        "previews",
    }
    assert blank["previews"] == [] and blank["fidelity"] is None and blank["retrieved_object"] is None  # NaN -> null
    assert blank["score"] == 0.0 and blank["admitted"] is True
    assert full["retrieved"] == [{"id": "g1", "uri": "s3://b/g1.png", "score": 0.25}]
    decoded = [np.asarray(Image.open(io.BytesIO(base64.b64decode(p)))) for p in full["previews"]]
    assert all(np.array_equal(d, p) for d, p in zip(decoded, pixels))  # lossless
    # in memory (and in a Python-mode dump) the pixels, hits and NaN stay what the method computed
    assert res.steps[1].previews is pixels and res.ranking[0] == ("g1", None, 0.5)
    assert math.isnan(res.model_dump()["steps"][0]["fidelity"])
