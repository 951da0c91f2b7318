"""`benchmarks/onboard_throughput.py` at toy size: every way's row and the ratio keys the issue names."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_small_run_writes_the_speedup_keys(tmp_path):
    out = tmp_path / "throughput.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "onboard_throughput.py"),
            "--products",
            "4",
            "--naive-concepts",
            "1",
            "--steps",
            "2",
            "--concepts-per-step",
            "4",
            "--skip-ray",
            "--levers",
            "patience=5",
            "all",
            "--out",
            str(out),
        ],
        check=True,
        cwd=ROOT,
        timeout=240,
    )
    result = json.loads(out.read_text())
    assert [w["way"] for w in result["ways"]] == [
        "naive (1 concept, re-encode every step)",
        "learner, precomputed, C=1",
        "learner, precomputed, C=4",
        "learner, C=4, patience=5",
        "learner, C=4, all levers",
    ]
    assert result["ways"][0]["concepts"] == 1 and result["ways"][2]["concepts"] == 4
    assert result["ways"][4]["overrides"]["ti_samples"] == 1 and result["ways"][4]["overrides"]["patience"] == 5
    assert result["speedup_batched_vs_naive"] > 0 and result["speedup_batched_same_work_vs_naive"] > 0
    assert result["speedup_batched_vs_naive_way"] in [w["way"] for w in result["ways"][1:]]
    assert result["ways"][0]["token_max_abs_diff_vs_plain"] < 1e-4  # the naive loop learns the plain learner's tokens
    assert (
        result["ways"][2]["token_max_abs_diff_vs_plain"] == 0.0 and result["ways"][2]["accuracy_diff_vs_plain"] == 0.0
    )
    assert set(result["what_bounds_speedup"]["per_lever"]) == {"learner, C=4, patience=5", "learner, C=4, all levers"}
    lo, hi = result["ways"][3]["accuracy_diff_ci95"]
    assert lo <= result["ways"][3]["accuracy_diff_vs_plain"] <= hi
