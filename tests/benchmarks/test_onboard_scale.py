"""`benchmarks/onboard_scale.py`'s flatness arithmetic (the full run starts S3 and Ray per size: minutes,
so it is a benchmark, not a test; its numbers are in the README)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("onboard_scale", ROOT / "benchmarks" / "onboard_scale.py")
onboard_scale = importlib.util.module_from_spec(spec)
spec.loader.exec_module(onboard_scale)


def _run(s_per_concept, driver, workers):
    return {"seconds_per_concept": s_per_concept, "driver_peak_rss_mb": driver, "worker_peak_rss_mb": workers}


def test_ratios_compare_the_two_largest_sizes():
    runs = {100: _run(9.0, 100, [100]), 500: _run(1.0, 1000, [2000, 1800]), 2000: _run(1.1, 1200, [2100, 2400])}
    out = onboard_scale._ratios(runs, [100, 500, 2000])
    assert out["compared"] == [500, 2000]
    assert abs(out["per_concept_time_ratio"] - 1.1) < 1e-9 and abs(out["driver_rss_ratio"] - 1.2) < 1e-9
    assert abs(out["worker_rss_ratio"] - 1.2) < 1e-9  # the largest worker of each run
    assert out["flat_within_15pct"] == {
        "per_concept_time_ratio": True,
        "driver_rss_ratio": False,
        "worker_rss_ratio": False,
    }
