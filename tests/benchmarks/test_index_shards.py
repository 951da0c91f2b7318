"""`benchmarks/index_shards.py` at toy size: the JSON keys the issue names, and the 100M arithmetic."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_small_run_writes_the_measured_and_extrapolated_keys(tmp_path):
    out = tmp_path / "shards.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "index_shards.py"),
            "--n",
            "20000",
            "--dim",
            "64",
            "--m",
            "8",
            "--queries",
            "20",
            "--shards",
            "2",
            "--nprobe",
            "4",
            "8",
            "--train-size",
            "5000",
            "--out",
            str(out),
        ],
        check=True,
        cwd=ROOT,
        timeout=240,
        capture_output=True,
    )
    r = json.loads(out.read_text())
    assert {
        "n_vectors",
        "dim",
        "recall_at_10",
        "ms_per_query",
        "bytes_per_vector",
        "extrapolation_100m",
        "exact_bytes_per_vector",
    } <= set(r)
    assert (r["n_vectors"], r["dim"], r["exact_bytes_per_vector"]) == (20000, 64, 256)
    assert 0 < r["recall_at_10"] <= 1 and r["ms_per_query"] > 0
    assert [row["nprobe"] for row in r["layouts"]["sharded"]["sweep"]] == [4, 8]
    assert sum(r["layouts"]["sharded"]["shard_sizes"]) == 20000
    # 8-byte codes + 8-byte ids: the FAISS index is a fraction of the 256-byte float32 vectors.
    assert r["bytes_per_vector_detail"]["faiss_index"] < r["exact_bytes_per_vector"]
    x = r["extrapolation_100m"]
    assert math.isclose(x["total_gib"], r["bytes_per_vector"] * 1e8 / 2**30)
    assert x["shards_needed"] == max(1, math.ceil(x["total_gib"] / x["replica_budget_gib"]))
    assert x["ms_per_query"] > 0 and "list size" in x["latency_model"] and "GiB" in x["arithmetic"]
