"""Soak of the online service under a GAIR flood: do cheap routes keep their latency, does memory stay flat?

    python benchmarks/serve_soak.py --out build/serve_soak.json               # 30 s baseline + 3 min soak
    python benchmarks/serve_soak.py --baseline-s 10 --soak-s 30 --out /tmp/s.json   # a quick look

Builds the same small registry and gallery as `serve_load.py` (fashion-mini), starts the real app with
every route behind a key (``--require-key``, as a service bound beyond loopback must be), then

1. baseline: ``--clients`` HTTP clients alternate /v1/classify and /v1/retrieve for ``--baseline-s``;
2. soak: the same clients for ``--soak-s`` while /v1/gair is flooded back to back by ``--flooders``
   threads without a key and as many with it (the keyed ones meet the costly class's rate limit and
   concurrency cap).

All traffic goes to 127.0.0.1, and every loop ends at its deadline. Memory: the RSS of each Serve replica
and of the proxy, sampled every ``--sample-s`` from /proc (Linux).

Prints a table and writes JSON: ``baseline`` / ``soak`` -> ``{classify, retrieve}.{p50_ms, p99_ms, rps,
requests}`` and ``server_errors`` (5xx); ``p99_ratio`` (soak p99 / baseline p99, per route);
``flood.{no_key, with_key}.statuses`` (status -> count); ``memory_mb`` (process -> [[t_s, rss_mb], ...]) and
``memory_growth_mb`` (last minus first sample after warm-up, per process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
from serve_load import _free_port, build_service_data, run_clients, serve_processes  # noqa: E402

CLIENT_KEY, ADMIN_KEY = "soak-client-key-0123456789", "soak-admin-key-0123456789"


def _rss_mb() -> dict[str, float]:
    """RSS (MB) of each Serve replica and the proxy on this machine, by deployment name."""
    out: dict[str, float] = {}
    for pid, part in serve_processes():
        if part in ("clients", "ServeController"):
            continue
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss_pages = int(f.read().split()[1])
        except OSError:
            continue
        out[part] = out.get(part, 0.0) + rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    return out


async def _cheap_clients(url: str, data: dict, clients: int, seconds: float) -> dict:
    lat: dict[str, list[float]] = {"classify": [], "retrieve": []}
    statuses: Counter = Counter()
    deadline = time.perf_counter() + seconds
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}

    async def client(k: int, http) -> None:
        i = k
        while time.perf_counter() < deadline:
            route = "classify" if i % 2 == 0 else "retrieve"
            body = (
                {"image": data["images"][i % len(data["images"])], "top_k": 3}
                if route == "classify"
                else {"query": data["queries"][i % len(data["queries"])], "top_k": 5}
            )
            t0 = time.perf_counter()
            r = await http.post(f"/v1/{route}", json=body, headers=headers)
            statuses[r.status_code] += 1
            if r.status_code == 200:
                lat[route].append((time.perf_counter() - t0) * 1000)
            i += clients

    wall = await run_clients(url, clients, client)
    out = {
        r: {
            "p50_ms": float(np.percentile(v, 50)),
            "p99_ms": float(np.percentile(v, 99)),
            "requests": len(v),
            "rps": len(v) / wall,
        }
        for r, v in lat.items()
        if v
    }
    out["statuses"] = {str(k): v for k, v in sorted(statuses.items())}
    out["server_errors"] = sum(v for k, v in statuses.items() if k >= 500)
    return out


def _flood(url: str, data: dict, key: str | None, stop: threading.Event, statuses: Counter) -> None:
    import httpx

    body = {
        "concept_ids": [data["queries"][0].split("<concept:")[1].split(">")[0]],
        "intent": "on the beach",
        "previews": 2,
        "steps": 10,
    }
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=url, timeout=300.0) as http:
        while not stop.is_set():
            try:
                statuses[http.post("/v1/gair", json=body, headers=headers).status_code] += 1
            except httpx.HTTPError as e:
                statuses[type(e).__name__] += 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=32, help="cheap-route HTTP clients (default: 32)")
    p.add_argument("--baseline-s", type=float, default=30.0, help="seconds without the flood (default: 30)")
    p.add_argument("--soak-s", type=float, default=180.0, help="seconds under the GAIR flood (default: 180)")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between memory samples (default: 5)")
    p.add_argument(
        "--flooders", type=int, default=4, help="GAIR flood threads with and without a key, each (default: 4)"
    )
    p.add_argument("--seed", type=int, default=0, help="world seed of the sample data (default: 0)")
    p.add_argument("--out", default="build/serve_soak.json", help="JSON output (default: build/serve_soak.json)")
    args = p.parse_args(argv)
    print("config: " + json.dumps(vars(args), sort_keys=True), flush=True)

    import ray

    from serve.app import start, stop
    from serve.settings import ServeSettings

    os.environ.update(TF_SOAK_CLIENT_KEY=CLIENT_KEY, TF_SOAK_ADMIN_KEY=ADMIN_KEY, RAY_USAGE_STATS_ENABLED="0")
    with tempfile.TemporaryDirectory() as root:
        data = build_service_data(root, args.seed)
        ray.init(logging_level="WARNING", log_to_driver=False, include_dashboard=True, dashboard_host="127.0.0.1")
        settings = ServeSettings(
            registry=data["registry"],
            index=data["index"],
            api_key_env="TF_SOAK_CLIENT_KEY",
            require_key=True,
            admin_key_env="TF_SOAK_ADMIN_KEY",
            poll_s=0,
            # every soak client connects from 127.0.0.1: one address for 40 clients
            limits={"max_in_flight_per_address": 256},
        )
        url = start(settings, port=_free_port())
        try:
            result = _run(url, data, args)
        finally:
            stop()
            ray.shutdown()
    _report(result)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}", flush=True)
    return 0


def _run(url: str, data: dict, args) -> dict:
    memory: dict[str, list] = {}
    t_start, done = time.monotonic(), threading.Event()

    def sample() -> None:
        while not done.wait(args.sample_s):
            for name, mb in _rss_mb().items():
                memory.setdefault(name, []).append([round(time.monotonic() - t_start, 1), round(mb, 1)])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    print(f"baseline: {args.clients} clients for {args.baseline_s:.0f}s", flush=True)
    baseline = asyncio.run(_cheap_clients(url, data, args.clients, args.baseline_s))
    warm = time.monotonic() - t_start
    flood = {"no_key": Counter(), "with_key": Counter()}
    stop = threading.Event()
    flooders = [
        threading.Thread(target=_flood, args=(url, data, key, stop, flood[name]))
        for name, key in (("no_key", None), ("with_key", CLIENT_KEY))
        for _ in range(args.flooders)
    ]
    for t in flooders:
        t.start()
    print(
        f"soak: the same clients for {args.soak_s:.0f}s under a GAIR flood ({args.flooders} threads without a key, "
        f"{args.flooders} with)",
        flush=True,
    )
    try:
        soak = asyncio.run(_cheap_clients(url, data, args.clients, args.soak_s))
    finally:
        stop.set()
        for t in flooders:
            t.join()
        done.set()
        sampler.join()
    growth = {
        n: (pts[-1][1] - next(mb for t, mb in pts if t >= warm))
        for n, pts in memory.items()
        if any(t >= warm for t, _ in pts)
    }
    return {
        "baseline": baseline,
        "soak": soak,
        "p99_ratio": {
            r: soak[r]["p99_ms"] / baseline[r]["p99_ms"]
            for r in ("classify", "retrieve")
            if r in soak and r in baseline
        },
        "flood": {k: {"statuses": {str(s): n for s, n in sorted(v.items(), key=str)}} for k, v in flood.items()},
        "memory_mb": memory,
        "memory_growth_mb": growth,
        "config": vars(args),
    }


def _report(r: dict) -> None:
    print(f"\n{'route':>9} {'phase':>8} {'rps':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for phase in ("baseline", "soak"):
        for route in ("classify", "retrieve"):
            m = r[phase].get(route)
            if m:
                print(f"{route:>9} {phase:>8} {m['rps']:>7.1f} {m['p50_ms']:>8.0f} {m['p99_ms']:>8.0f}")
    print(f"p99 soak/baseline: {json.dumps({k: round(v, 2) for k, v in r['p99_ratio'].items()})}")
    print(f"5xx: baseline {r['baseline']['server_errors']}, soak {r['soak']['server_errors']}")
    print(f"flood statuses: {json.dumps(r['flood'])}")
    print(f"memory growth after warm-up (MB): {json.dumps({k: round(v, 1) for k, v in r['memory_growth_mb'].items()})}")


if __name__ == "__main__":
    sys.exit(main())
