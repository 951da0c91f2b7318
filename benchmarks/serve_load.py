"""Load benchmark of the online service, and exact vs ANN gallery search at 100k and 1M vectors.

    python benchmarks/serve_load.py --out build/serve_load.json
    python benchmarks/serve_load.py --out /tmp/sl.json --duration 4 --sizes 100000     # a quick look

Part 1 (HTTP): builds a small registry and gallery on `fashion-mini` in a temporary folder, starts the
real app (Ray Serve, local cluster) twice — with ``@serve.batch`` batches of up to 32 and with batches of
1 (no batching) — and drives ``/v1/classify`` and ``/v1/retrieve`` with 1, 8 and 32 concurrent HTTP
clients (asyncio + httpx, each sending its next request when the previous one returns) for
``--duration`` seconds per cell: requests/s, p50 and p99 latency, errors. The clients run on the same
machine as the service, so on a small machine they take CPU from it; the table says how many CPUs.

Part 2 (index): `benchmarks/index_bench.py` at ``--sizes`` (synthetic clustered vectors): per-query
latency and recall@10 of the ANN index (FAISS HNSW) against the exact one.

The same runs also call the ImageEncoder deployment through its handle from 32 concurrent callers (no
HTTP, no proxy, no ingress): batching's effect on the model itself.

Each HTTP cell also records ``cpu_ms_per_request``: CPU milliseconds per answered request spent by each
part of the service (proxy, ingress, each deployment, Serve's controller) and by the clients, read from
/proc: where a request's cost goes, and so how much of it batching can amortise.

JSON: ``http.<batched|unbatched>.<endpoint>.<clients>.{rps,p50_ms,p99_ms,errors,cpu_ms_per_request}``,
``encoder_batching_speedup_32`` (the handle-level ratio),
``batching_speedup_32`` (the smaller of the two endpoints' batched/unbatched requests/s at 32 clients;
per endpoint in ``batching_speedup_32_by_endpoint``), and ``ann.N.{recall_at_10,speedup_vs_exact,…}``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

from factory import storage  # noqa: E402

ENDPOINTS = ("classify", "retrieve")


def build_service_data(root: str, seed: int) -> dict[str, Any]:
    """A sample catalog, tokens for its products (CE losses: fast) and its gallery index."""
    from factory.backbones import load_backbone
    from factory.catalogs import read_world_catalog
    from factory.gallery import index_images
    from factory.images import load_rgb
    from factory.learner import LearnerConfig
    from factory.losses import LossWeights
    from factory.onboarding import learn_and_commit
    from factory.registry import TokenRegistry
    from factory.world import write_catalog

    catalog_uri, registry, index = (os.path.join(root, d) for d in ("catalog", "registry", "index"))
    write_catalog(catalog_uri, seed=seed, products=12, shots=4, heldout=2, contexts=3, distractors=40)
    catalog = read_world_catalog(catalog_uri)
    backbone = load_backbone("fashion-mini")
    config = LearnerConfig(steps=80, weights=LossWeights(ti=0.0, ce=1.0, image_ce=1.0), log_every=0)
    learn_and_commit(TokenRegistry(registry), catalog.concepts, "serve-load", backbone, config)
    gallery, _ = index_images(backbone, {r.attributes["item"]: r.image_uri for r in catalog.gallery})
    gallery.save(index)
    uris = [u for s in catalog.concepts for u in s.heldout_uris]
    images = [base64.b64encode(storage.read_bytes(u)).decode() for u in uris]
    pixels = [load_rgb(storage.read_bytes(u), backbone.config.image.size) for u in uris]
    queries = [f"a photo of a <concept:{s.concept_id}> {s.parent} on the beach" for s in catalog.concepts]
    return {"registry": registry, "index": index, "images": images, "queries": queries, "pixels": pixels}


def serve_processes():
    """(pid, part) of every Serve process on this machine, from /proc (Linux): the proxy, each deployment's
    replicas (by deployment name), Serve's controller, and this process ("clients"). Empty without /proc."""
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:  # the process ended while we looked
            continue
        if int(pid) == os.getpid():
            yield pid, "clients"
        elif cmd.startswith("ray::ServeReplica:"):
            yield pid, cmd.split(":")[-1].split(".")[0]  # ray::ServeReplica:<app>:<Deployment>[.<method>]
        elif cmd.startswith(("ray::ProxyActor", "ray::ServeController")):
            yield pid, cmd[5:].split(".")[0]


def _cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by each part of the service (`serve_processes`). Other processes (e.g. a
    training job sharing the machine) are not counted."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out: dict[str, float] = {}
    for pid, part in serve_processes():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[part] = out.get(part, 0.0) + (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run_clients(url: str, clients: int, client, headers: dict | None = None) -> float:
    """Run ``client(k, http)`` for k < ``clients`` concurrently over one pooled AsyncClient; the wall seconds."""
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120.0, limits=limits, headers=headers) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(k, http) for k in range(clients)))
        return time.perf_counter() - t0


async def _load(url: str, endpoint: str, payloads: list[dict], clients: int, duration: float) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration

    async def client(k: int, http) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            r = await http.post(f"/v1/{endpoint}", json=payloads[i % len(payloads)])
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1
            i += clients

    wall = await run_clients(url, clients, client)
    lat = np.array(latencies) * 1000
    return {
        "rps": len(latencies) / wall,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "requests": len(latencies),
        "errors": errors,
    }


async def _encoder_load(images: list, clients: int, duration: float) -> dict[str, float]:
    """Requests/s of the ImageEncoder deployment alone, called through its handle by ``clients``
    concurrent callers: the model's side of batching, without HTTP, the proxy and the ingress."""
    from ray import serve

    from serve.app import APP_NAME

    handle = serve.get_deployment_handle("ImageEncoder", app_name=APP_NAME)
    done = 0
    deadline = time.perf_counter() + duration

    async def caller(k: int) -> None:
        nonlocal done
        i = k
        while time.perf_counter() < deadline:
            await handle.encode.remote(images[i % len(images)][None])
            done += 1
            i += clients

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(clients)))
    return {"rps": done / (time.perf_counter() - t0), "requests": done}


def bench_http(data: dict, args: argparse.Namespace) -> dict[str, Any]:
    from serve.app import start, stop
    from serve.settings import ServeSettings

    payloads = {
        "classify": [{"image": im, "top_k": 5} for im in data["images"]],
        "retrieve": [{"query": q, "top_k": 10} for q in data["queries"]],
    }
    out: dict[str, Any] = {}
    for mode, batch in (("batched", args.max_batch_size), ("unbatched", 1)):
        settings = ServeSettings(
            registry=data["registry"],
            index=data["index"],
            poll_s=0,
            max_batch_size=batch,
            batch_wait_s=args.batch_wait_s,
        )
        url = start(settings, port=_free_port())
        try:
            out[mode] = {}
            for endpoint in ENDPOINTS:
                asyncio.run(_load(url, endpoint, payloads[endpoint], 4, 1.0))  # warm-up: every replica hot
                out[mode][endpoint] = {}
                for clients in args.concurrency:
                    before = _cpu_seconds()
                    cell = asyncio.run(_load(url, endpoint, payloads[endpoint], clients, args.duration))
                    after = _cpu_seconds()
                    cell["cpu_ms_per_request"] = {
                        k: round(1000 * (v - before.get(k, 0.0)) / max(cell["requests"], 1), 2)
                        for k, v in sorted(after.items())
                    }
                    cell["cpu_ms_per_request"]["total"] = round(sum(cell["cpu_ms_per_request"].values()), 2)
                    out[mode][endpoint][str(clients)] = cell
                    print(
                        f"{mode:>9} {endpoint:>8} {clients:>7} {cell['rps']:>9.1f} {cell['p50_ms']:>8.1f} "
                        f"{cell['p99_ms']:>8.1f} {cell['errors']:>6}",
                        flush=True,
                    )
                cpu = out[mode][endpoint][str(max(args.concurrency))]["cpu_ms_per_request"]
                print(
                    f"{'':>9} {'':>8} CPU ms per request at {max(args.concurrency)} clients: "
                    + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items() if v >= 0.05),
                    flush=True,
                )
            top = max(args.concurrency)
            cell = asyncio.run(_encoder_load(data["pixels"], top, args.duration))
            out[mode]["image_encoder_handle"] = {str(top): cell}
            print(f"{mode:>9} {'encoder':>8} {top:>7} {cell['rps']:>9.1f}   (ImageEncoder handle, no HTTP)", flush=True)
        finally:
            stop()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON results file (any URI)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of load per (mode, endpoint, clients) cell")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients")
    p.add_argument("--max-batch-size", type=int, default=32, help="batch size of the batched run")
    p.add_argument("--batch-wait-s", type=float, default=0.005, help="@serve.batch wait for a batch to fill")
    p.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000], help="index sizes (none: skip)")
    p.add_argument("--skip-http", action="store_true", help="only the index part")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import index_bench
    import ray

    results: dict[str, Any] = {"config": {**vars(args), "cpu_count": os.cpu_count()}}
    if not args.skip_http:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=os.cpu_count(), logging_level="WARNING", log_to_driver=False)
        with tempfile.TemporaryDirectory() as root:
            data = build_service_data(root, args.seed)
            print(f"{'mode':>9} {'endpoint':>8} {'clients':>7} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
            http = bench_http(data, args)
        ray.shutdown()
        results["http"] = http
        top = str(max(args.concurrency))
        by_endpoint = {e: http["batched"][e][top]["rps"] / http["unbatched"][e][top]["rps"] for e in ENDPOINTS}
        results["batching_speedup_32_by_endpoint"] = by_endpoint
        results["batching_speedup_32"] = min(by_endpoint.values())
        results["encoder_batching_speedup_32"] = (
            http["batched"]["image_encoder_handle"][top]["rps"] / http["unbatched"]["image_encoder_handle"][top]["rps"]
        )
        print(f"batching speed-up at {top} clients: " + ", ".join(f"{e} {v:.2f}x" for e, v in by_endpoint.items()))
    if args.sizes:
        ann_args = index_bench.build_parser().parse_args(["--out", "-", "--sizes", *map(str, args.sizes)])
        results["ann"] = index_bench.run(ann_args)["ann"]
    storage.write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
