"""A sharded, compressed gallery (FAISS IVF-PQ): measured at 1M vectors, extrapolated to 100M.

Beyond one replica's memory: IVF-PQ codes instead of float32 vectors, unsharded and over ``--shards``.

    python benchmarks/index_shards.py --out build/index_shards.json            # 1M × 512-d (about 10 min, 2 cores)
    python benchmarks/index_shards.py --n 20000 --queries 50 --out /tmp/s.json # a quick look (seconds)

The gallery and queries are the Gaussian mixture on the unit sphere of `benchmarks/index_bench.py` (its
``mixture``, same flags). Ground truth is exact: the queries against the whole gallery, a matrix product
per chunk of gallery rows. Each layout is built through the library (`create_index("ivfpq")`, and
`factory.index.sharded.ShardedIndex` over ``--shards`` IVF-PQ shards that share one trained model, so
their scores compare), then for each ``--nprobe``: recall@10 against the exact top 10, and the median and
p99 milliseconds of one-query searches through the ``search`` API (one query per call, as an online
request is). For the sharded layout, three latencies: the shards searched by the index's thread pool
(the headline), one after the other (``sequential_ms_per_query``), and one shard alone (one serving
replica's share of a query, the basis of the extrapolation).

Memory per vector is measured three ways: the FAISS index's serialized size / n (the compressed codes,
their ids and the coarse centroids: what FAISS holds in memory), the bytes on disk of the saved index
(FAISS file + items.parquet), and the RSS growth of a fresh process that loads the saved index (what a
replica really pays, including the per-item bookkeeping in Python: ids, URIs, the id → position map).
``exact_bytes_per_vector`` is the exact backend's float32 vector (4 × dim, computed) for comparison.

``extrapolation_100m`` shows its arithmetic: bytes/vector × 1e8 → GiB, the shards needed at
``--replica-budget-gib`` each, and ms/query from the per-shard latency measured here scaled by the ratio
of list sizes (nprobe and each shard's nlist fixed, so a query scans that many times more codes), which
over-estimates a little: the coarse search and per-call overhead do not grow with the lists.

Flags (all optional but --out):
    --out URI              JSON results file (any URI factory.storage takes)
    --n N                  gallery vectors (default 1,000,000)
    --dim D                vector dimension (default 512)
    --queries Q            queries, each timed one per call and scored against exact top 10 (default 300)
    --clusters/--spread/--decay/--seed   the mixture, as in index_bench.py (defaults 1000 / 0.8 / 0.5 / 0)
    --shards S             shards of the sharded layout (default 4)
    --nlist L              IVF lists, of the unsharded index and of each shard (one model, shared): default
                           sqrt(n) rounded to a power of two, 1024 at 1M; 0: the library's choice
    --m M                  PQ sub-quantizers, must divide --dim (default 64: 64-byte codes at 512-d)
    --nbits B              bits per sub-quantizer code (default 8)
    --train-size T         vectors (a seeded sample) each layout trains on; the shards train once, together
                           (default 100,000)
    --nprobe P [P ...]     lists visited per query (per shard when sharded), each measured (default 8 16 32 64)
    --target-recall R      headline nprobe: the smallest reaching R, else the smallest within 0.01 of the
                           best recall measured (default 0.9)
    --replica-budget-gib G memory of one serving replica for the 100M extrapolation (default 16)
    --faiss-threads T      FAISS's OpenMP threads (default 1: on this shared 2-core machine its spinning
                           threads made PQ training about 6x slower than one thread, measured)
    --workdir DIR          where the indexes are saved for the disk and RSS measurements (default: a
                           temporary folder, removed at the end)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.index_bench import mixture, recall_at_10  # noqa: E402  (the same gallery generator)
from factory import storage  # noqa: E402
from factory.index import create_index  # noqa: E402
from factory.index.sharded import ShardedIndex  # noqa: E402

TARGET_N = 100_000_000
LATENCY_MODEL = (
    "ms/query at 100M = median ms of one shard searched alone (measured) × the list size ratio "
    "(vectors per shard at 100M / vectors per shard measured): nprobe and each shard's nlist fixed, so "
    "every probed list, and the codes a query scans, grow by that ratio; shards are searched in parallel "
    "on their own replicas, so a query waits for about one shard. An upper bound in this model: the "
    "coarse search and per-call overhead do not grow. Not included: the network hop of the fan-out."
)


def exact_top10(gallery: np.ndarray, queries: np.ndarray, chunk: int = 100_000) -> np.ndarray:
    """Exact top 10 (inner product of normalised rows): one matrix product per chunk of gallery rows, each
    chunk's own top 10 kept, and the best 10 of those candidates at the end."""
    cand_s, cand_i = [], []
    for start in range(0, len(gallery), chunk):
        s = queries @ gallery[start : start + chunk].T
        top = (
            np.argpartition(-s, 10, axis=1)[:, :10]
            if s.shape[1] > 10
            else np.broadcast_to(np.arange(s.shape[1]), s.shape)
        )
        cand_s.append(np.take_along_axis(s, top, axis=1))
        cand_i.append(top + start)
    s, i = np.concatenate(cand_s, axis=1), np.concatenate(cand_i, axis=1)
    order = np.argsort(-s, axis=1, kind="stable")[:, :10]
    return np.take_along_axis(i, order, axis=1)


def latencies_ms(index: Any, queries: np.ndarray) -> np.ndarray:
    """Milliseconds of one-query searches (k=10) through the search API, after one warm-up call."""
    index.search(queries[:1], 10)
    out = np.empty(len(queries))
    for j, q in enumerate(queries):
        t0 = time.perf_counter()
        index.search(q, 10)
        out[j] = (time.perf_counter() - t0) * 1000
    return out


def sweep(index: Any, queries: np.ndarray, truth: np.ndarray, nprobes: list[int], set_nprobe) -> list[dict]:
    rows = []
    for p in sorted(nprobes):
        set_nprobe(p)
        # By id, not position: a sharded index numbers its items shard by shard, not in gallery order.
        found = np.array([[int(i.rsplit("-", 1)[1]) for i in row] for row in index.search(queries, 10).ids])
        ms = latencies_ms(index, queries)
        row = {
            "nprobe": p,
            "recall_at_10": recall_at_10(found, truth),
            "ms_per_query": float(np.median(ms)),
            "p99_ms_per_query": float(np.percentile(ms, 99)),
        }
        if isinstance(index, ShardedIndex):
            ms = latencies_ms(ShardedIndex(index.shards, check_routing=False, workers=1), queries)
            row |= {
                "sequential_ms_per_query": float(np.median(ms)),
                "sequential_p99_ms_per_query": float(np.percentile(ms, 99)),
                # one replica's share: a shard searched on its own
                "one_shard_ms_per_query": float(np.median(latencies_ms(index.shards[0], queries))),
            }
        rows.append(row)
    return rows


def headline(rows: list[dict], target: float) -> dict:
    reaching = [r for r in rows if r["recall_at_10"] >= target]
    if reaching:
        return reaching[0]
    best = max(r["recall_at_10"] for r in rows)
    return next(r for r in rows if r["recall_at_10"] >= best - 0.01)


def folder_bytes(path: Path) -> dict[str, int]:
    sizes = {"faiss": 0, "items": 0, "other": 0}
    for f in path.rglob("*"):
        if f.is_file():
            key = "faiss" if f.name == "faiss.index" else "items" if f.name == "items.parquet" else "other"
            sizes[key] += f.stat().st_size
    return sizes


# Run in a fresh interpreter: RSS after imports and after loading a small index of the same layout (so
# the one-off costs of the first load, Parquet reader, FAISS deserializer and thread pools, are paid
# before), then after load_index (Arrow's pool released, garbage collected): the difference is what the
# loaded index itself keeps resident.
_RSS_PROBE = """
import gc, json, os, sys
sys.path.insert(0, sys.argv[2])
import faiss, numpy, pyarrow
from factory.index import load_index
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
warm = load_index(sys.argv[3]); warm.search(numpy.ones((1, warm.dim), numpy.float32), 10)
pyarrow.default_memory_pool().release_unused(); gc.collect(); before = rss()
index = load_index(sys.argv[1])
pyarrow.default_memory_pool().release_unused(); gc.collect()
print(json.dumps({"rss_delta": rss() - before, "items": len(index)}))
"""


def loaded_rss_bytes(path: Path, warm: Path) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(path), str(ROOT), str(warm)],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return int(json.loads(out.stdout.strip().splitlines()[-1])["rss_delta"])


def memory(index: Any, small: Any, path: Path, n: int) -> dict[str, float]:
    """Bytes per vector of ``index`` (see the module docstring); ``small``: a small index of the same
    layout, loaded first by the RSS probe."""
    index.save(str(path))
    small.save(str(path) + "-warmup")
    disk = folder_bytes(path)
    rss = loaded_rss_bytes(path, Path(str(path) + "-warmup"))
    return {
        "faiss_index": disk["faiss"] / n,
        "on_disk": sum(disk.values()) / n,
        "on_disk_items": disk["items"] / n,
        "loaded_rss": rss / n,
        "items_bookkeeping_rss": (rss - disk["faiss"]) / n,
    }


def build(make, gallery: np.ndarray, ids: list[str]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    index = make()
    index.add(gallery, ids)
    return index, time.perf_counter() - t0


def extrapolate(mem: dict[str, float], dim: int, shards_measured: int, n: int, row: dict, budget_gib: float) -> dict:
    gib = 2**30
    total = mem["loaded_rss"] * TARGET_N
    faiss_total = mem["faiss_index"] * TARGET_N
    shards = max(1, math.ceil(total / (budget_gib * gib)))
    per_shard_measured = n / shards_measured
    ratio = (TARGET_N / shards) / per_shard_measured
    ms = row["one_shard_ms_per_query"] * ratio
    return {
        "n_vectors": TARGET_N,
        "bytes_per_vector": mem["loaded_rss"],
        "total_gib": total / gib,
        "faiss_only_bytes_per_vector": mem["faiss_index"],
        "faiss_only_total_gib": faiss_total / gib,
        "exact_total_gib": 4 * dim * TARGET_N / gib,
        "replica_budget_gib": budget_gib,
        "shards_needed": shards,
        "shards_needed_faiss_only": max(1, math.ceil(faiss_total / (budget_gib * gib))),
        "nprobe": row["nprobe"],
        "vectors_per_shard": TARGET_N / shards,
        "list_size_ratio": ratio,
        "one_shard_ms_per_query_measured": row["one_shard_ms_per_query"],
        "ms_per_query": ms,
        "latency_model": LATENCY_MODEL,
        "arithmetic": (
            f"{mem['loaded_rss']:.1f} B/vector (loaded RSS) × 1e8 = {total / gib:.2f} GiB → ceil({total / gib:.2f} / "
            f"{budget_gib:g} GiB per replica) = {shards} shard(s) of {TARGET_N / shards:,.0f} vectors; FAISS codes "
            f"alone: {mem['faiss_index']:.1f} B × 1e8 = {faiss_total / gib:.2f} GiB; exact float32: {4 * dim} B × 1e8 "
            f"= {4 * dim * TARGET_N / gib:.0f} GiB. Latency: {row['one_shard_ms_per_query']:.3f} ms (one shard of "
            f"{per_shard_measured:,.0f}, nprobe {row['nprobe']}) × {ratio:.1f} = {ms:.1f} ms/query"
        ),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import faiss

    faiss.omp_set_num_threads(args.faiss_threads)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    gallery = mixture(args.n, args, draw=0)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)  # in place: no second n × dim copy
    queries = mixture(args.queries, args, draw=1)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    ids = [f"item-{i}" for i in range(args.n)]
    t0 = time.perf_counter()
    truth = exact_top10(gallery, queries)
    truth_s = time.perf_counter() - t0
    exact_ms = []
    for q in queries[:20]:  # the brute force a replica would do without an index (NumPy, not the API)
        t0 = time.perf_counter()
        s = gallery @ q
        np.argpartition(-s, 10)[:10]
        exact_ms.append((time.perf_counter() - t0) * 1000)

    pq = {"m": args.m, "nbits": args.nbits, "train_size": args.train_size}
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="index_shards-"))
    layouts: dict[str, Any] = {}
    n_small = 1000  # per index (per shard) of the RSS probe's warm-up load: enough to train 2**nbits codes
    try:
        single, secs = build(lambda: create_index("ivfpq", args.dim, nlist=args.nlist or None, **pq), gallery, ids)
        rows = sweep(single, queries, truth, args.nprobe, lambda p: single.set_search_params(nprobe=p))
        small = build(lambda: create_index("ivfpq", args.dim, nlist=4, **pq), gallery[:n_small], ids[:n_small])[0]
        layouts["unsharded"] = {
            "params": single.params,
            "build_seconds": secs,
            "sweep": rows,
            "bytes_per_vector": memory(single, small, workdir / "unsharded", args.n),
        }
        single = small = None  # freed before the sharded build
        sharded, secs = build(
            lambda: ShardedIndex.create("ivfpq", args.dim, args.shards, nlist=args.nlist or None, **pq), gallery, ids
        )
        rows = sweep(sharded, queries, truth, args.nprobe, lambda p: sharded.set_search_params(nprobe=p))
        small = build(
            lambda: ShardedIndex.create("ivfpq", args.dim, args.shards, nlist=4, **pq),
            gallery[: n_small * args.shards],
            ids[: n_small * args.shards],
        )[0]
        layouts["sharded"] = {
            "params": sharded.params,
            "workers": sharded.workers,
            "shard_sizes": [len(s) for s in sharded.shards],
            "build_seconds": secs,
            "sweep": rows,
            "bytes_per_vector": memory(sharded, small, workdir / "sharded", args.n),
        }
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    sharded = layouts["sharded"]
    head = headline(sharded["sweep"], args.target_recall)
    return {
        "n_vectors": args.n,
        "dim": args.dim,
        "queries": args.queries,
        "headline": {
            "layout": f"sharded ({args.shards} shards)",
            "nprobe": head["nprobe"],
            "rule": f"smallest nprobe reaching recall@10 {args.target_recall}, else the smallest within "
            "0.01 of the best recall measured",
        },
        "recall_at_10": head["recall_at_10"],
        "ms_per_query": head["ms_per_query"],
        "p99_ms_per_query": head["p99_ms_per_query"],
        "bytes_per_vector": sharded["bytes_per_vector"]["loaded_rss"],
        "bytes_per_vector_detail": sharded["bytes_per_vector"],
        "exact_bytes_per_vector": 4 * args.dim,
        "exact_ms_per_query": float(np.median(exact_ms)),
        "ground_truth_seconds": truth_s,
        "layouts": layouts,
        "extrapolation_100m": extrapolate(
            sharded["bytes_per_vector"], args.dim, args.shards, args.n, head, args.replica_budget_gib
        ),
        "wall_seconds": time.perf_counter() - t_start,
        "config": {k: v for k, v in vars(args).items() if k != "out"}
        | {
            "cpu_count": os.cpu_count(),
            "faiss_threads": faiss.omp_get_max_threads(),
            "faiss": faiss.__version__,
            "load_average_at_start": load_start,
            "load_average_at_end": os.getloadavg(),
        },  # others' work shares the cores
    }


def print_tables(r: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=130)  # the tables' width, terminal or not
    t = Table(title=f"IVF-PQ at {r['n_vectors']:,} × {r['dim']}-d, {r['queries']} queries (one per call)")
    for col in (
        "layout",
        "nprobe",
        "recall@10",
        "median ms/q",
        "p99 ms/q",
        "sequential median (p99)",
        "one shard ms/q",
        "build s",
    ):
        t.add_column(col, justify="left" if col == "layout" else "right")
    for name, lay in r["layouts"].items():
        for row in lay["sweep"]:
            seq = (
                f"{row['sequential_ms_per_query']:.3f} ({row['sequential_p99_ms_per_query']:.1f})"
                if "sequential_ms_per_query" in row
                else ""
            )
            one = f"{row['one_shard_ms_per_query']:.3f}" if "one_shard_ms_per_query" in row else ""
            label = name if name == "unsharded" else f"{name} ({len(lay['shard_sizes'])}, {lay['workers']} threads)"
            t.add_row(
                label,
                str(row["nprobe"]),
                f"{row['recall_at_10']:.3f}",
                f"{row['ms_per_query']:.3f}",
                f"{row['p99_ms_per_query']:.3f}",
                seq,
                one,
                f"{lay['build_seconds']:.0f}",
            )
    console.print(t)
    m = Table(title="bytes per vector")
    for col in ("layout", "FAISS index", "on disk (of which items)", "loaded RSS", "exact float32"):
        m.add_column(col, justify="left" if col == "layout" else "right")
    for name, lay in r["layouts"].items():
        b = lay["bytes_per_vector"]
        m.add_row(
            name,
            f"{b['faiss_index']:.1f}",
            f"{b['on_disk']:.1f} ({b['on_disk_items']:.1f})",
            f"{b['loaded_rss']:.1f}",
            str(r["exact_bytes_per_vector"]),
        )
    console.print(m)
    console.print(f"exact (NumPy brute force) {r['exact_ms_per_query']:.1f} ms/query")
    console.print("100M: " + r["extrapolation_100m"]["arithmetic"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="See the module docstring for the method.")
    p.add_argument("--out", required=True, help="JSON results file (any URI)")
    p.add_argument("--n", type=int, default=1_000_000, help="gallery vectors (default 1,000,000)")
    p.add_argument("--dim", type=int, default=512, help="vector dimension (default 512)")
    p.add_argument("--queries", type=int, default=300, help="queries, timed one per call (default 300)")
    p.add_argument("--clusters", type=int, default=1000, help="mixture components (default 1000)")
    p.add_argument("--spread", type=float, default=0.8, help="expected noise norm around a unit centre (default 0.8)")
    p.add_argument("--decay", type=float, default=0.5, help="noise spectrum power law, 0: isotropic (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="mixture seed (default 0)")
    p.add_argument("--shards", type=int, default=4, help="shards of the sharded layout (default 4)")
    p.add_argument(
        "--nlist",
        type=int,
        default=None,
        help="IVF lists, unsharded and per shard (default: sqrt(n) rounded to a power of two; 0: the library's choice)",
    )
    p.add_argument("--faiss-threads", type=int, default=1, help="FAISS OpenMP threads (default 1)")
    p.add_argument("--m", type=int, default=64, help="PQ sub-quantizers, must divide --dim (default 64)")
    p.add_argument("--nbits", type=int, default=8, help="bits per sub-quantizer code (default 8)")
    p.add_argument("--train-size", type=int, default=100_000, help="training sample per index (default 100,000)")
    p.add_argument(
        "--nprobe",
        type=int,
        nargs="+",
        default=[8, 16, 32, 64],
        help="lists visited per query (per shard), each measured (default 8 16 32 64)",
    )
    p.add_argument("--target-recall", type=float, default=0.9, help="headline nprobe's recall@10 target (default 0.9)")
    p.add_argument(
        "--replica-budget-gib",
        type=float,
        default=16.0,
        help="one serving replica's memory for the 100M extrapolation (default 16)",
    )
    p.add_argument("--workdir", default=None, help="where indexes are saved for disk/RSS (default: a temp folder)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.n < 10 or args.queries < 1 or args.shards < 1 or args.faiss_threads < 1:
        raise SystemExit("--n must be at least 10, --queries, --shards and --faiss-threads at least 1")
    if args.nlist is None:
        args.nlist = 2 ** round(math.log2(math.sqrt(args.n)))
    results = run(args)
    print_tables(results)
    storage.write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
