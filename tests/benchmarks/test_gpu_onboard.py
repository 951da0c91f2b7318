"""`benchmarks/gpu_onboard.py --tiny`: the unattended GPU benchmark's smoke test on the CPU."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_run_writes_every_row_and_key(tmp_path):
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_onboard.py"), "--tiny", "--concepts", "1", "4",
                    "--out", str(out)], check=True, cwd=ROOT, timeout=240)
    result = json.loads(out.read_text())
    runs = result["runs"]
    # C in {1, 4} x {bf16, fp32} x {plain, checkpointing + TI micro-batches}
    assert {(r["c"], r["precision"], r["checkpointing"]) for r in runs} == {
        (c, p, k) for c in (1, 4) for p in ("bf16", "fp32") for k in (False, True)}
    assert all(r["s_per_step"] > 0 and r["concepts_per_gpu_minute"] > 0 for r in runs)
    assert set(result["encode_images_per_s"]) == {"bf16", "fp32"} and min(result["encode_images_per_s"].values()) > 0


def test_meta_memory_counts_what_checkpointing_and_micro_batches_save(tmp_path):
    out = tmp_path / "meta.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_onboard.py"), "--tiny", "--meta-memory",
                    "--concepts", "4", "--micro", "1", "--out", str(out)], check=True, cwd=ROOT, timeout=240)
    rows = {(r["checkpointing"], r["ti_micro_batch"]): r for r in json.loads(out.read_text())["memory_computed"]}
    peak = {k: r["peak_gib_computed"] for k, r in rows.items()}
    weights = rows[(False, 0)]["weights_gib"]
    assert peak[(False, 0)] > peak[(True, 0)] > weights  # recomputing UNet activations holds fewer of them
    assert peak[(False, 0)] > peak[(False, 1)] > weights  # one UNet sample at a time instead of all 8
    assert peak[(True, 1)] == min(peak.values())
