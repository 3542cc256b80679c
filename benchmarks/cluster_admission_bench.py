"""The Redis admission in process, single node next to Redis Cluster: what the second node costs.

``overhead_bench.py`` measures whole HTTP requests, where the server's own
work dilutes the cost of the admission. Here the middleware is called in
process (werkzeug's test client, one thread, no HTTP), so a request is well
under a millisecond and the second node's ``sendall``/``recv`` is a visible
share of it: the worst case for the Cluster ratio.

Same middleware and rules on both sides (a per-client rate limit, the
classification prefetch of 4 repositories), alternating rounds of
``--requests`` requests; throwaway redis-server and 3+3 Redis Cluster on
loopback.

    python benchmarks/cluster_admission_bench.py [--requests 2000] [--rounds 4] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "plugins")]


def measure(url: str, requests: int) -> dict:
    from werkzeug.test import Client

    from regmw_redis.connection import ROUND_TRIPS
    from tests.servers.redis_apps import make_middleware

    client = Client(make_middleware(url, ratelimit={"rules": [{"name": "c", "by": "client", "limit": "100000000/hour"}]}))
    for index in range(200):  # warm: connections, slot map, scripts
        client.get(f"/v2/team/app{index % 4}/manifests/latest")
    latencies = []
    before = ROUND_TRIPS._value.get()
    for index in range(requests):
        start = time.perf_counter()
        status = client.get(f"/v2/team/app{index % 4}/manifests/latest").status_code
        latencies.append(time.perf_counter() - start)
        if status != 200:
            raise RuntimeError(f"{url}: status {status}")
    latencies.sort()
    return {"p50_ms": round(statistics.median(latencies) * 1000, 4),
            "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 4),
            "redis_round_trips_per_request": round((ROUND_TRIPS._value.get() - before) / requests, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from tests.servers._util import stop
    from tests.servers.redis_cluster import start_cluster, stop_cluster
    from tests.servers.redis_server import start_redis

    tmp = Path(tempfile.mkdtemp(prefix="regmw-cluster-bench-"))
    (tmp / "single").mkdir()
    proc, port = start_redis(tmp / "single")
    group = start_cluster(tmp / "cluster")
    best: dict[str, dict] = {}
    ratios = []
    try:
        for round_index in range(args.rounds):
            single = measure(f"redis://127.0.0.1:{port}/0", args.requests)
            cluster = measure(group.url, args.requests)
            ratios.append(round(cluster["p50_ms"] / single["p50_ms"], 3))
            for kind, result in (("single", single), ("cluster", cluster)):
                if kind not in best or result["p50_ms"] < best[kind]["p50_ms"]:
                    best[kind] = result
            print(f"round {round_index + 1}: single p50 {single['p50_ms']:.3f} ms, cluster p50 {cluster['p50_ms']:.3f} ms "
                  f"({cluster['redis_round_trips_per_request']:.2f} round trips), ratio {ratios[-1]:.2f}", flush=True)
    finally:
        stop_cluster(group)
        stop(proc)
    ratio = round(best["cluster"]["p50_ms"] / best["single"]["p50_ms"], 3)
    print(f"best p50: single {best['single']['p50_ms']:.3f} ms, cluster {best['cluster']['p50_ms']:.3f} ms, "
          f"ratio {ratio:.2f} (per round {min(ratios):.2f}-{max(ratios):.2f})")
    if args.json:
        print(json.dumps({"single": best["single"], "cluster": best["cluster"], "cluster_vs_single_p50_ratio": ratio,
                          "per_round_ratios": ratios}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
