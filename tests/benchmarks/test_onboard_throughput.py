"""`benchmarks/onboard_throughput.py` at toy size: every way's row and the ratio keys the issue names."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_small_run_writes_the_speedup_keys(tmp_path):
    out = tmp_path / "throughput.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "onboard_throughput.py"), "--products", "4",
                    "--naive-concepts", "1", "--steps", "2", "--concepts-per-step", "4", "--skip-ray",
                    "--out", str(out)], check=True, cwd=ROOT, timeout=240)
    result = json.loads(out.read_text())
    assert [w["way"] for w in result["ways"]] == [
        "naive (1 concept, re-encode every step)", "learner, precomputed, C=1", "learner, precomputed, C=4"]
    assert result["ways"][0]["concepts"] == 1 and result["ways"][2]["concepts"] == 4
    assert result["speedup_batched_vs_naive"] > 0
