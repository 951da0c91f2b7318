"""The evaluation on several world seeds, with paired bootstrap intervals and the issue's targets.

    python benchmarks/evaluation_seeds.py --seeds 1 2 3 --out build/evaluation_seeds.json

Seed 0 is the tuning seed (defaults and rules are chosen on it: `objective_sweep.py`, the GAIR margin);
report on the others. For each seed the real commands run, each in its own process, exactly as a user runs
them: `tokenfactory world` -> `onboard` (Ray) -> `index` (Ray) -> `evaluate`. A seed whose metrics.json
exists is not run again (delete its folder to redo it).

Intervals: the units of every seed are pooled (a held-out concept for classification, a query for
retrieval and composition) and resampled with replacement, the same draw for every method, so a
difference between two methods is paired: it keeps what the two share (the same hard queries) out of its
interval. 95 % percentile intervals from ``--bootstrap`` draws. The best fixed α of a draw is picked in
that draw (hindsight, as in the single-seed report). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXED = ("fixed_0", "fixed_0.25", "fixed_0.5", "fixed_0.75", "fixed_1")


CLI = [sys.executable, "-m", "cli", "--log-level", "WARNING"]


def pipeline(work: str, seed: int, args, out: str = "out") -> list[list[str]]:
    """The `tokenfactory` commands (arguments after the CLI) of one seed: world, onboard, index, evaluate."""
    return [
        [
            "world",
            "--out",
            f"{work}/catalog",
            "--seed",
            str(seed),
            "--products",
            str(args.products),
            "--contexts",
            str(args.contexts),
            "--groups-per-parent",
            str(args.groups_per_parent),
        ],
        [
            "onboard",
            "--catalog",
            f"{work}/catalog",
            "--registry",
            f"{work}/registry",
            "--workers",
            "2",
            "--concepts-per-step",
            str(args.concepts_per_step),
            "--steps",
            str(args.steps),
            "--run-id",
            f"seed{seed}",
        ],
        ["index", "--gallery", f"{work}/catalog", "--out", f"{work}/index"],
        [
            "evaluate",
            "--catalog",
            f"{work}/catalog",
            "--registry",
            f"{work}/registry",
            "--index",
            f"{work}/index",
            "--out",
            f"{work}/{out}",
            "--generation-queries",
            str(args.generation_queries),
            "--ray-ablations",
        ],
    ]


def add_pipeline_arguments(p: argparse.ArgumentParser, products: int) -> None:
    """The flags `pipeline` reads: the world's and the onboarding run's."""
    p.add_argument("--products", type=int, default=products, help=f"products per world (default: {products})")
    p.add_argument(
        "--contexts", type=int, default=3, help="gallery scenes per product = queries per product (default: 3)"
    )
    p.add_argument("--groups-per-parent", type=int, default=2, help="colourway groups per category (default: 2)")
    p.add_argument("--steps", type=int, default=150, help="onboarding learner steps (default: 150)")
    p.add_argument("--concepts-per-step", type=int, default=6, help="onboarding C (default: 6)")
    p.add_argument("--generation-queries", type=int, default=24, help="composition queries per seed (default: 24)")


def run_seed(seed: int, args) -> dict:
    """world -> onboard -> index -> evaluate for one seed; the evaluation's metrics."""
    work = os.path.join(args.work, f"seed{seed}")
    metrics_path = os.path.join(work, "out", "metrics.json")
    if not os.path.exists(metrics_path):
        for step in pipeline(work, seed, args):
            t0 = time.perf_counter()
            print(f"[seed {seed}] {step[0]} ...", flush=True)
            with open(os.path.join(args.work, f"seed{seed}-{step[0]}.log"), "w") as log:
                subprocess.run(CLI + step, check=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            print(f"[seed {seed}] {step[0]} done in {time.perf_counter() - t0:.0f}s", flush=True)
    with open(metrics_path) as f:
        return json.load(f)


def units(all_metrics: dict[int, dict]) -> dict[str, dict[str, np.ndarray]]:
    """Per family, method -> one value per pooled unit (seed-prefixed ids, the same order for every method)."""
    cls, ret, gen = {}, {}, {}
    for seed, m in sorted(all_metrics.items()):
        concepts = sorted(m["classification"]["ti_ce_proj"]["per_concept"])
        for method, v in m["classification"].items():
            cls.setdefault(method, []).extend(v["per_concept"].get(c, np.nan) for c in concepts)
        for method, rr in m["retrieval_per_query"]["reciprocal_rank"].items():
            ret.setdefault(method, []).extend(rr)
        for method, v in m["generation"].items():
            pq = v.get("per_query")
            if pq:
                for key in ("colour", "fidelity", "intent", "category", "object_fidelity", "identity"):
                    if key in pq:  # object_fidelity / identity: metrics.json of this round on
                        gen.setdefault(f"{method}.{key}", []).extend(np.nan if x is None else x for x in pq[key])
    return {
        "classification": {k: np.array(v, float) for k, v in cls.items()},
        "retrieval": {k: np.array(v, float) for k, v in ret.items()},
        "generation": {k: np.array(v, float) for k, v in gen.items()},
    }


def interval(values: np.ndarray) -> list[float]:
    return [float(np.nanpercentile(values, 2.5)), float(np.nanpercentile(values, 97.5))]


def bootstrap(u: dict, draws: int, seed: int = 0) -> dict:
    """Point estimates and paired 95 % intervals of each method and of the issue's target quantities."""
    rng = np.random.default_rng(seed)
    out: dict = {}
    for family, methods in u.items():
        n = len(next(iter(methods.values())))
        idx = rng.integers(n, size=(draws, n))
        means = {m: np.nanmean(v[idx], axis=1) for m, v in methods.items()}
        out[family] = {
            m: {"mean": float(np.nanmean(v)), "ci95": interval(means[m]), "n_units": int(np.isfinite(v).sum())}
            for m, v in methods.items()
        }
        out[family]["_draws"] = means  # dropped before writing; used for the targets below
    c, r, g = (out[f]["_draws"] for f in ("classification", "retrieval", "generation"))
    pt = {f: {m: v["mean"] for m, v in out[f].items() if m != "_draws"} for f in out}
    best_fixed = np.max(np.stack([r[m] for m in FIXED]), axis=0)
    best_fixed_pt = max(pt["retrieval"][m] for m in FIXED)
    targets = {
        "classification: ti_ce_proj - (ce - 0.02) >= 0": (
            pt["classification"]["ti_ce_proj"] - pt["classification"]["ce"] + 0.02,
            c["ti_ce_proj"] - c["ce"] + 0.02,
        ),
        "classification: ti_ce_proj - (caption + 0.15) >= 0": (
            pt["classification"]["ti_ce_proj"] - pt["classification"]["caption"] - 0.15,
            c["ti_ce_proj"] - c["caption"] - 0.15,
        ),
        "generation: ti_ce_proj colour - 0.8 x caption colour >= 0": (
            pt["generation"]["ti_ce_proj.colour"] - 0.8 * pt["generation"]["caption.colour"],
            g["ti_ce_proj.colour"] - 0.8 * g["caption.colour"],
        ),
        "generation: ti_ce_proj fidelity - ce fidelity > 0": (
            pt["generation"]["ti_ce_proj.fidelity"] - pt["generation"]["ce.fidelity"],
            g["ti_ce_proj.fidelity"] - g["ce.fidelity"],
        ),
        **(
            {
                "generation: ti_ce_proj object fidelity - ce object fidelity > 0": (
                    pt["generation"]["ti_ce_proj.object_fidelity"] - pt["generation"]["ce.object_fidelity"],
                    g["ti_ce_proj.object_fidelity"] - g["ce.object_fidelity"],
                )
            }
            if "ce.object_fidelity" in g
            else {}
        ),
        "generation: ti_ce_proj intent - ti intent > 0": (
            pt["generation"]["ti_ce_proj.intent"] - pt["generation"]["ti.intent"],
            g["ti_ce_proj.intent"] - g["ti.intent"],
        ),
        "retrieval: gair_auto / best fixed_<alpha> >= 1.07": (
            pt["retrieval"]["gair_auto"] / best_fixed_pt,
            r["gair_auto"] / best_fixed,
        ),
    }
    out["targets"] = {}
    for name, (point, draws_) in targets.items():
        threshold = 1.07 if "1.07" in name else 0.0
        met = point >= threshold if ">=" in name else point > threshold
        out["targets"][name] = {
            "value": float(point),
            "ci95": interval(draws_),
            "met": bool(met),
            "ci_clears": bool(interval(draws_)[0] >= threshold),
        }
    for f in ("classification", "retrieval", "generation"):
        out[f].pop("_draws")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[1, 2, 3], help="world seeds (default: 1 2 3; 0 is for tuning)"
    )
    add_pipeline_arguments(p, products=12)
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap draws (default: 2000)")
    p.add_argument("--work", default="build/eval-seeds", help="working folder (catalogs, registries, indexes, logs)")
    p.add_argument("--out", default="build/evaluation_seeds.json", help="JSON output path")
    args = p.parse_args(argv)
    print("config: " + json.dumps(vars(args), sort_keys=True), flush=True)
    os.makedirs(args.work, exist_ok=True)
    t0 = time.perf_counter()
    metrics = {s: run_seed(s, args) for s in args.seeds}
    result = bootstrap(units(metrics), args.bootstrap)
    per_seed = {
        s: {
            "classification": {k: v["accuracy"] for k, v in m["classification"].items()},
            "retrieval_mrr": {k: v["mrr"] for k, v in m["retrieval"].items()},
            "chosen_alpha": m["gair"]["chosen_alpha"],
            "stage_seconds": m["stage_seconds"],
        }
        for s, m in metrics.items()
    }
    for family in ("classification", "retrieval", "generation"):
        print(f"\n{family} (mean [95% CI] over {len(args.seeds)} seeds, paired bootstrap)")
        for m, v in result[family].items():
            print(f"  {m:28s} {v['mean']:.3f}  [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]  n={v['n_units']}")
    print("\ntargets")
    for name, v in result["targets"].items():
        print(
            f"  {name:58s} {v['value']:+.3f}  [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}]  "
            f"{'met' if v['met'] else 'MISSED'}{' (interval clears it)' if v['ci_clears'] else ''}"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "config": vars(args),
                "seeds": args.seeds,
                **result,
                "per_seed": per_seed,
                "seconds": time.perf_counter() - t0,
            },
            f,
            indent=2,
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
