"""`benchmarks/evaluation_seeds.py`'s pooling and paired bootstrap, on synthetic per-unit metrics."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("evaluation_seeds", ROOT / "benchmarks" / "evaluation_seeds.py")
evaluation_seeds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evaluation_seeds)

CLS = ("parent_word", "caption", "ti", "ce", "ti_ce_proj")
RET = ("words", "fixed_0", "fixed_0.25", "fixed_0.5", "fixed_0.75", "fixed_1", "gair_auto")
GEN = ("ti", "ce", "ti_ce_proj", "caption")


def fake_metrics(rng, n_concepts=6, n_queries=9):
    concepts = [f"c{i}" for i in range(n_concepts)]
    cls = {m: {"accuracy": 0.0, "per_concept": {c: float(rng.random()) for c in concepts}} for m in CLS}
    cls["ti_ce_proj"]["per_concept"] = dict(cls["ce"]["per_concept"])  # identical to ce: a paired difference of 0
    rr = {m: list(rng.random(n_queries)) for m in RET}
    gen = {
        m: {"per_query": {k: list(rng.random(n_queries)) for k in ("colour", "fidelity", "intent", "category")}}
        for m in GEN
    }
    gen["ti_ce_proj"]["per_query"]["colour"][0] = None  # a query with no colour attribute is left out
    return {
        "classification": cls,
        "retrieval_per_query": {"query_ids": list(range(n_queries)), "reciprocal_rank": rr},
        "generation": gen,
    }


def test_units_pool_every_seed_in_one_order():
    rng = np.random.default_rng(0)
    u = evaluation_seeds.units({1: fake_metrics(rng), 2: fake_metrics(rng)})
    assert len(u["classification"]["ce"]) == 12 and len(u["retrieval"]["gair_auto"]) == 18
    assert np.isnan(u["generation"]["ti_ce_proj.colour"][0]) and np.isnan(u["generation"]["ti_ce_proj.colour"][9])
    assert np.isfinite(u["generation"]["ti_ce_proj.colour"][1:9]).all()


def test_paired_intervals_and_targets():
    rng = np.random.default_rng(1)
    metrics = {1: fake_metrics(rng), 2: fake_metrics(rng)}
    u = evaluation_seeds.units(metrics)
    out = evaluation_seeds.bootstrap(u, draws=300)
    ce = out["classification"]["ce"]
    assert ce["mean"] == pytest.approx(np.mean(u["classification"]["ce"]))
    assert ce["ci95"][0] <= ce["mean"] <= ce["ci95"][1] and ce["ci95"][0] < ce["ci95"][1]
    # ti_ce_proj equals ce unit by unit, so the paired difference is exactly 0.02 in every draw
    t = out["targets"]["classification: ti_ce_proj - (ce - 0.02) >= 0"]
    assert (
        t["value"] == pytest.approx(0.02) and t["ci95"] == pytest.approx([0.02, 0.02]) and t["met"] and t["ci_clears"]
    )
    best = max(np.mean(u["retrieval"][m]) for m in evaluation_seeds.FIXED)
    gair = out["targets"]["retrieval: gair_auto / best fixed_<alpha> >= 1.07"]
    assert gair["value"] == pytest.approx(np.mean(u["retrieval"]["gair_auto"]) / best)
    assert gair["met"] == (gair["value"] >= 1.07)
