"""Onboarding at catalog scale: is per-concept time and memory flat as the catalog grows?

    python benchmarks/onboard_scale.py --out build/onboard_scale.json                    # 100 / 500 / 2000
    python benchmarks/onboard_scale.py --out /tmp/os.json --sizes 20 60 --steps 5        # a quick look

One world catalog of ``max(--sizes)`` products is written to an embedded S3 (SeaweedFS), then each size
is onboarded by `jobs.onboard.onboard` (Ray Data streaming into Ray Train, the path `tokenfactory
onboard` takes) in a fresh child process with a fresh local Ray cluster, so each run's driver peak RSS
is its own. The first N concepts of the catalog are listed in a CatalogRow Parquet per size; the
images are the same objects on S3.

Per size the table and the JSON (``runs.<N>``) show:
    wall_s                     the whole run in the child: Ray start, banks, streaming, training, commit
    steady_concepts_per_min    after start-up (`jobs.onboard.steady_rate`): concepts whose chunk ended
                               after the first chunk ended, over the time from that first chunk end to
                               the last (all workers pooled)
    seconds_per_concept        60 / steady_concepts_per_min
    driver_peak_rss_mb         ru_maxrss of the driver process (the child)
    worker_peak_rss_mb         ru_maxrss of each Ray Train worker, from the run report's ``workers``
And the flatness targets (issue 15: within 15 % from 500 to 2,000 concepts):
    per_concept_time_ratio     seconds_per_concept at the largest size / at the second largest
    driver_rss_ratio, worker_rss_ratio   the same for peak memory (worker: the largest worker)
The learner runs few steps (``--steps``): what is measured is how the job scales, not token quality
(the demo and `tokenfactory evaluate` measure that). Every flag is in ``--help``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", default="build/onboard_scale.json", help="JSON output path (default: build/onboard_scale.json)"
    )
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[100, 500, 2000],
        help="catalog sizes in concepts (default: 100 500 2000)",
    )
    p.add_argument("--backbone", default="fashion-mini", help="backbone name (default: fashion-mini)")
    p.add_argument("--steps", type=int, default=10, help="learner steps per chunk (default: 10)")
    p.add_argument("--concepts-per-step", type=int, default=16, help="concepts learned together, C (default: 16)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: 2)")
    p.add_argument("--shots", type=int, default=3, help="few-shot images per concept (default: 3)")
    p.add_argument("--bank-size", type=int, default=1024, help="negative-bank images per parent (default: 1024)")
    p.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one size, print JSON
    return p.parse_args(argv)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> dict:
    """One onboarding run (this process is the driver); prints and returns its measurements."""
    from factory.storage import S3Options
    from jobs.onboard import OnboardConfig, onboard, onboard_learner, steady_rate

    spec = json.loads(args.child)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(num_cpus=os.cpu_count(), logging_level="WARNING", log_to_driver=False, include_dashboard=False)
    t0 = time.perf_counter()
    cfg = OnboardConfig(
        catalog=spec["catalog"],
        registry=spec["registry"],
        backbone=args.backbone,
        learner=onboard_learner(steps=args.steps),
        workers=args.workers,
        concepts_per_step=args.concepts_per_step,
        bank_size=args.bank_size,
        s3=S3Options.from_env(),
        run_id=f"scale-{spec['n']}",
    )
    _, report = onboard(cfg)
    wall = time.perf_counter() - t0
    rate, startup = steady_rate(report.workers)
    out = {
        "concepts": spec["n"],
        "learned": report.concepts_learned,
        "wall_s": wall,
        "steady_concepts_per_min": rate,
        "seconds_per_concept": 60 / rate if rate == rate and rate > 0 else None,
        "startup_s": startup,
        "driver_peak_rss_mb": peak_rss_mb(),
        "worker_peak_rss_mb": [w["peak_rss_mb"] for w in sorted(report.workers, key=lambda w: w["rank"])],
        "stage_seconds": report.stage_seconds,
    }
    print("RESULT " + json.dumps(out), flush=True)
    return out


def write_subset(rows_uri: str, concepts, n: int, s3) -> None:
    from factory import storage
    from schemas import CatalogRow, to_arrow

    rows = [
        CatalogRow(concept_id=c.concept_id, parent=c.parent, image_uri=u, split="fewshot")
        for c in concepts[:n]
        for u in c.image_uris
    ]
    storage.write_parquet(to_arrow(rows, CatalogRow), rows_uri, s3)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    from rich.console import Console
    from rich.table import Table

    from factory.catalogs import read_concepts
    from factory.world import write_catalog
    from jobs.s3server import SeaweedS3

    sizes = sorted(args.sizes)
    runs = {}
    with SeaweedS3() as server:
        bucket = server.create_bucket("onboard-scale")
        s3 = server.s3_options
        t0 = time.perf_counter()
        catalog = f"{bucket}/world"
        write_catalog(
            catalog, seed=args.seed, products=sizes[-1], shots=args.shots, heldout=0, contexts=1, distractors=0, s3=s3
        )
        concepts = sorted(read_concepts(catalog, s3), key=lambda c: c.concept_id)
        print(
            f"[scale] wrote a catalog of {len(concepts)} concepts to {catalog} in {time.perf_counter() - t0:.0f}s",
            flush=True,
        )
        env = {**os.environ, **server.env, "PYTHONPATH": ROOT}
        for n in sizes:
            rows = f"{bucket}/subsets/{n}.parquet"
            write_subset(rows, concepts, n, s3)
            spec = json.dumps({"n": n, "catalog": rows, "registry": f"{bucket}/registry-{n}"})
            cmd = [sys.executable, os.path.abspath(__file__), "--child", spec, *_child_flags(args)]
            print(f"[scale] onboarding {n} concepts ...", flush=True)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not result:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
                raise SystemExit(f"onboarding {n} concepts failed (rc {proc.returncode})")
            runs[n] = json.loads(result[-1][len("RESULT ") :])
            print(
                f"[scale] {n}: {runs[n]['wall_s']:.0f}s, {runs[n]['steady_concepts_per_min']:.1f} concepts/min steady",
                flush=True,
            )
    out = {
        "config": vars(args),
        "machine": f"{os.cpu_count()} cores",
        "runs": {str(n): r for n, r in runs.items()},
        **_ratios(runs, sizes),
    }
    _print(out, sizes, Console(), Table)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")
    return 0


def _child_flags(args) -> list[str]:
    return [
        "--backbone",
        args.backbone,
        "--steps",
        str(args.steps),
        "--concepts-per-step",
        str(args.concepts_per_step),
        "--workers",
        str(args.workers),
        "--bank-size",
        str(args.bank_size),
    ]


def _ratios(runs: dict, sizes: list[int]) -> dict:
    """Largest size over the second largest (issue 15: 2,000 vs 500), each within 15 % to be flat."""
    if len(sizes) < 2:
        return {}
    big, small = runs[sizes[-1]], runs[sizes[-2]]
    ratios = {
        "per_concept_time_ratio": (big["seconds_per_concept"] or float("nan"))
        / (small["seconds_per_concept"] or float("nan")),
        "driver_rss_ratio": big["driver_peak_rss_mb"] / small["driver_peak_rss_mb"],
        "worker_rss_ratio": max(big["worker_peak_rss_mb"]) / max(small["worker_peak_rss_mb"]),
    }
    return {
        **ratios,
        "compared": [sizes[-2], sizes[-1]],
        "flat_within_15pct": {k: abs(v - 1) <= 0.15 for k, v in ratios.items()},
    }


def _print(out: dict, sizes: list[int], console, Table) -> None:
    table = Table(
        title=f"onboarding at scale ({out['machine']}, {out['config']['workers']} workers, "
        f"C={out['config']['concepts_per_step']}, {out['config']['steps']} steps)"
    )
    for col in (
        "concepts",
        "wall s",
        "start-up s",
        "steady concepts/min",
        "s/concept",
        "driver peak MiB",
        "worker peak MiB",
    ):
        table.add_column(col, justify="right")
    for n in sizes:
        r = out["runs"][str(n)]
        table.add_row(
            str(n),
            f"{r['wall_s']:.0f}",
            f"{r['startup_s']:.0f}",
            f"{r['steady_concepts_per_min']:.1f}",
            f"{r['seconds_per_concept']:.2f}",
            f"{r['driver_peak_rss_mb']:.0f}",
            " / ".join(f"{m:.0f}" for m in r["worker_peak_rss_mb"]),
        )
    console.print(table)
    for k in ("per_concept_time_ratio", "driver_rss_ratio", "worker_rss_ratio"):
        if k in out:
            console.print(
                f"{k} ({out['compared'][1]} vs {out['compared'][0]}): {out[k]:.3f}"
                f"  {'flat' if out['flat_within_15pct'][k] else 'NOT flat'} within 15%"
            )


if __name__ == "__main__":
    raise SystemExit(main())
