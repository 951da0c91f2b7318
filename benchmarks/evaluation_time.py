"""How long the full evaluation of a 30-product catalog takes on this machine (the issue's 15-minute target).

    python benchmarks/evaluation_time.py --runs 2 --out build/evaluation_time.json

Builds the catalog, registry and index once, as a user does (`tokenfactory world --seed 4 --products 30
--contexts 3 --groups-per-parent 2` -> `onboard --steps 150 --concepts-per-step 6` -> `index`; the commands
of `evaluation_seeds.py`), then times ``--runs`` runs of `tokenfactory evaluate --ray-ablations` on them,
each a fresh process (a local Ray cluster started and stopped by it), one after another so they do not
share the cores. Per run: the process's wall time and the evaluation's own `stage_seconds` (GAIR, the
composition images, the ablations from start to ready and their summed task time, what the overlap did
not hide). ``--threads-while-learning`` is passed through, so the driver-thread setting can be compared on
the same registry. Prints a table, writes JSON (``evaluate_seconds``: each run's wall time; ``target_met``:
the median under ``target_seconds``).

Seed 4 is neither the tuning seed (0) nor a reported one (1-3): this measures time, not quality.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evaluation_seeds import CLI, ROOT, add_pipeline_arguments, pipeline  # noqa: E402

TARGET_SECONDS = 15 * 60


def build(args) -> None:
    """world -> onboard -> index once (kept: a rerun reuses them)."""
    if not os.path.exists(os.path.join(args.work, "index")):
        for step in pipeline(args.work, args.seed, args)[:-1]:
            t0 = time.perf_counter()
            with open(os.path.join(args.work, f"{step[0]}.log"), "w") as log:
                subprocess.run(CLI + step, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            print(f"{step[0]:9s} {time.perf_counter() - t0:7.0f} s", flush=True)


def time_run(i: int, args) -> dict:
    out = f"{args.work}/eval-run{i}"
    cmd = pipeline(args.work, args.seed, args, out=f"eval-run{i}")[-1]
    cmd += ["--threads-while-learning", str(args.threads_while_learning)]
    t0 = time.perf_counter()
    with open(os.path.join(args.work, f"evaluate-run{i}.log"), "w") as log:
        subprocess.run(CLI + cmd, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "metrics.json")) as f:
        stages = json.load(f)["stage_seconds"]
    task = sum(v for k, v in stages.items() if k.startswith("learn_") and k != "learn_ablations")
    return {"wall_seconds": wall, "stage_seconds": stages, "ablation_task_seconds": task}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=2, help="timed evaluate runs (default: 2)")
    p.add_argument("--seed", type=int, default=4, help="world seed (default: 4, neither tuning nor reported)")
    add_pipeline_arguments(p, products=30)
    p.add_argument(
        "--threads-while-learning",
        type=int,
        default=1,
        help="evaluate's --threads-while-learning (default: 1, its default; 0: torch's default)",
    )
    p.add_argument("--work", default="build/eval-time", help="working folder (catalog, registry, index, runs, logs)")
    p.add_argument("--out", default="build/evaluation_time.json", help="JSON output path")
    args = p.parse_args(argv)
    print("config: " + json.dumps(vars(args), sort_keys=True), flush=True)
    os.makedirs(args.work, exist_ok=True)
    build(args)
    runs = []
    for i in range(args.runs):
        runs.append(time_run(i, args))
        r, s = runs[-1], runs[-1]["stage_seconds"]
        if i == 0:
            print(
                f"{'run':>3} {'wall s':>7} {'total':>7} {'ablations':>9} {'task s':>7} {'GAIR':>6} "
                f"{'compose':>7} {'wait':>6}"
            )
        print(
            f"{i:3d} {r['wall_seconds']:7.0f} {s['total']:7.0f} {s['learn_ablations']:9.0f} "
            f"{r['ablation_task_seconds']:7.0f} {s['retrieval_generation']:6.0f} {s['composition']:7.0f} "
            f"{s['ablations_wait']:6.0f}",
            flush=True,
        )
    walls = [r["wall_seconds"] for r in runs]
    median = statistics.median(walls)
    print(
        f"evaluate wall: min {min(walls):.0f} s, median {median:.0f} s, max {max(walls):.0f} s; "
        f"target {TARGET_SECONDS} s {'met' if median < TARGET_SECONDS else 'MISSED'}"
    )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "config": vars(args),
                "evaluate_seconds": walls,
                "median_seconds": median,
                "target_seconds": TARGET_SECONDS,
                "target_met": median < TARGET_SECONDS,
                "runs": runs,
                "cpus": os.cpu_count(),
            },
            f,
            indent=2,
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
