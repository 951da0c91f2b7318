"""Gallery index benchmark: exact vs ANN (FAISS HNSW or IVF) query latency and recall@10.

    python benchmarks/index_bench.py --out build/index_bench.json                 # 100k and 1M vectors
    python benchmarks/index_bench.py --out /tmp/ib.json --sizes 20000             # a quick look

The vectors are a Gaussian mixture on the unit sphere, not uniform noise: real image features come in
clumps (one product photographed in several contexts, many near-identical garments), and uniform
high-dimensional noise has no near neighbours at all, which makes any ANN look worse than it is in use
and exact search look as good as it ever gets. Queries are fresh draws from the same mixture.

Latency is the median per query, one query per call through the ``VectorIndex.search`` API
(validation and normalisation included), because an online retrieve request is one query. The batched exact time is
reported too, for offline evaluation. Recall@10 is |ANN top-10 ∩ exact top-10| / 10, averaged.

For HNSW, ``--ef-search`` takes several values; each is measured, and the headline numbers
(``ann.N.recall_at_10`` / ``ann.N.speedup_vs_exact``) are those of the smallest value that reaches
``--target-recall`` (or of the best recall if none does). Every value measured is in the JSON ``sweep``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from factory import storage
from factory.index import ExactIndex, create_index
from factory.index.faiss_backend import FaissIndex


def mixture(n: int, args: argparse.Namespace, draw: int, chunk: int = 100_000) -> np.ndarray:
    """``n`` float32 vectors: unit-norm cluster centres plus noise of expected norm ``args.spread``.

    The noise spectrum decays as a power law (std of dimension i ∝ i^-decay), as the spectra of real
    embeddings do; ``--decay 0`` gives isotropic noise, whose full intrinsic dimension is the hardest
    case for any ANN. The centres depend only on ``args.seed``, so the gallery (draw 0) and the queries
    (draw 1) share them. Built in chunks so 1M × d never needs a float64 copy.
    """
    dim = args.dim
    centres = np.random.default_rng(args.seed).standard_normal((args.clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    scale = np.arange(1, dim + 1, dtype=np.float64) ** -args.decay
    scale = (scale * args.spread / np.sqrt(np.sum(scale**2))).astype(np.float32)
    rng = np.random.default_rng((args.seed, draw))
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        out[start : start + m] = centres[rng.integers(args.clusters, size=m)]
        out[start : start + m] += scale * rng.standard_normal((m, dim), dtype=np.float32)
    return out


def per_query_ms(index: Any, queries: np.ndarray, k: int = 10) -> tuple[float, float]:
    """(median, mean) milliseconds of one-query searches. The median is the headline: it is what a
    request sees, and unlike the mean it is not moved by the scheduler pre-empting a few calls."""
    index.search(queries[:1], k)  # warm-up: consolidates the exact matrix, faults pages in
    times = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q, k)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000, float(np.mean(times)) * 1000


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist())]))


def bench_size(n: int, args: argparse.Namespace) -> dict[str, Any]:
    gallery = mixture(n, args, draw=0)
    queries = mixture(args.queries, args, draw=1)
    ids = [f"item-{i}" for i in range(n)]

    exact = ExactIndex(args.dim)
    t0 = time.perf_counter()
    exact.add(gallery, ids)
    exact.vectors  # noqa: B018 - the one-off concatenation belongs to build time
    exact_build = time.perf_counter() - t0
    batched = []
    for _ in range(3):  # best of 3: one long call is easily stretched by other work on the machine
        t0 = time.perf_counter()
        truth = exact.search(queries, 10).indices
        batched.append(time.perf_counter() - t0)
    exact_batched_ms = min(batched) * 1000 / len(queries)
    exact_ms, exact_mean_ms = per_query_ms(exact, queries)
    del exact

    if args.ann == "hnsw":
        ann = create_index("hnsw", args.dim, m=args.m, ef_construction=args.ef_construction)
        sweep_name, sweep_values = "ef_search", args.ef_search
    else:
        ann = create_index("ivf", args.dim, nlist=args.nlist) if args.nlist else create_index("ivf", args.dim)
        sweep_name, sweep_values = "nprobe", args.nprobe
    assert isinstance(ann, FaissIndex)
    t0 = time.perf_counter()
    ann.add(gallery, ids)
    ann_build = time.perf_counter() - t0

    sweep = []
    for value in sorted(sweep_values):
        ann.set_search_params(**{sweep_name: value})
        recall = recall_at_10(ann.search(queries, 10).indices, truth)
        ms, mean_ms = per_query_ms(ann, queries)
        sweep.append(
            {
                sweep_name: value,
                "recall_at_10": recall,
                "ms_per_query": ms,
                "mean_ms_per_query": mean_ms,
                "speedup_vs_exact": exact_ms / ms,
            }
        )
    reaching = [s for s in sweep if s["recall_at_10"] >= args.target_recall]
    chosen = reaching[0] if reaching else max(sweep, key=lambda s: s["recall_at_10"])
    return {
        "backend": args.ann,
        "params": ann.params | {sweep_name: chosen[sweep_name]},
        "recall_at_10": chosen["recall_at_10"],
        "speedup_vs_exact": chosen["speedup_vs_exact"],
        "ann_ms_per_query": chosen["ms_per_query"],
        "exact_ms_per_query": exact_ms,
        "exact_mean_ms_per_query": exact_mean_ms,
        "exact_batched_ms_per_query": exact_batched_ms,
        "build_seconds": ann_build,
        "exact_build_seconds": exact_build,
        "sweep": sweep,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for n in args.sizes:
        results[str(n)] = bench_size(n, args)
        print_row(n, results[str(n)])
    return {
        "config": {k: v for k, v in vars(args).items() if k != "out"}
        | {"cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "ann": results,
    }


def print_row(n: int, r: dict[str, Any]) -> None:
    if not getattr(print_row, "header", False):
        print(
            f"{'N':>9} {'build s':>8} {'exact ms/q':>10} {'(batched)':>9} {'ANN ms/q':>9} {'recall@10':>9} "
            f"{'speedup':>8}  {'params'}"
        )
        print_row.header = True  # type: ignore[attr-defined]
    print(
        f"{n:>9} {r['build_seconds']:>8.2f} {r['exact_ms_per_query']:>10.3f} {r['exact_batched_ms_per_query']:>9.3f} "
        f"{r['ann_ms_per_query']:>9.3f} {r['recall_at_10']:>9.3f} {r['speedup_vs_exact']:>7.1f}x  {r['params']}"
    )
    for s in r["sweep"]:
        knob = next(k for k in s if k in ("ef_search", "nprobe"))
        print(
            f"{'':>9}   {knob}={s[knob]:<5} recall@10 {s['recall_at_10']:.3f}  {s['ms_per_query']:.3f} ms/q  "
            f"{s['speedup_vs_exact']:.1f}x"
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON results file (any URI)")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--clusters", type=int, default=1000, help="mixture components")
    p.add_argument("--spread", type=float, default=0.8, help="expected noise norm around a unit centre")
    p.add_argument("--decay", type=float, default=0.5, help="noise spectrum power law (0: isotropic)")
    p.add_argument("--ann", choices=["hnsw", "ivf"], default="hnsw")
    p.add_argument("--m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=200)
    p.add_argument("--ef-search", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default: from the gallery size)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    results = run(args)
    storage.write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
