"""Read-your-writes and replica offload: regmw's database routing vs naive round-robin.

Starts its own PostgreSQL 15 primary + streaming replica (replica lagging
200 ms through ``recovery_min_apply_delay``), then runs the SAME mixed
workload twice, side by side in one run, through ``regmw.RegistryMiddleware``
in front of a small Flask app:

* ``regmw``: the ``dbroute`` plugin chooses the database;
* ``round_robin``: a naive plugin sends writes to the primary and rotates
  reads over every server (primary, replica), as a load balancer that knows
  nothing of replication lag would.

Workload: 95% reads, 5% writes over 100 repositories; a worker's read right
after its own write is of the same repository (push, then pull), other reads
pick a repository at random. A read is *stale* when it returns a value older
than the latest write to that repository that had COMPLETED (response
received) before the read started. Each read reports ``inet_server_port()``,
so the replica share is what the servers say, not what the router claims.

Usage::

    python benchmarks/dbroute_bench.py [--duration 40] [--rate 200] [--workers 8] [--json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flask import Flask, jsonify, request
from sqlalchemy import create_engine, text
from werkzeug.test import Client

from regmw.middleware import RegistryMiddleware
from regmw.plugins import hookimpl
from tests.servers.postgres_replication import ReplicationCluster

REPOSITORIES = [f"bench/repo-{index:03d}" for index in range(100)]
WRITE_SHARE = 0.05

UPSERT = text(
    "INSERT INTO kv (repo, value) VALUES (:r, :v) "
    "ON CONFLICT (repo) DO UPDATE SET value = GREATEST(kv.value, EXCLUDED.value)"
)
SELECT = text("SELECT (SELECT value FROM kv WHERE repo = :r), inet_server_port()")


def make_app() -> Flask:
    app = Flask("dbroute-bench")

    @app.route("/v2/<path:name>/manifests/<reference>", methods=["GET", "PUT"])
    def manifest(name, reference):
        handle = request.environ["regmw.db"]
        if request.method == "PUT":
            handle.execute(UPSERT, {"r": name, "v": int(request.get_data())})
            return "", 201
        value, port = handle.execute(SELECT, {"r": name})[0]
        return jsonify(value=value, port=port)

    return app


class NaiveHandle:
    """The same ``execute`` interface as regmw's handle, on a fixed engine."""

    def __init__(self, engine, role: str) -> None:
        self.engine, self.role = engine, role

    def execute(self, statement, parameters=None):
        with self.engine.begin() as conn:
            result = conn.execute(statement, parameters)
            return list(result.all()) if result.returns_rows else []


class NaiveRoundRobin:
    """Writes to the primary; reads rotate over every server, lag ignored."""

    def __init__(self, primary_url: str, replica_urls: list[str]) -> None:
        self.primary = create_engine(primary_url, pool_size=10, max_overflow=10)
        self.nodes = [(self.primary, "primary")] + [
            (create_engine(url, pool_size=10, max_overflow=10), "replica") for url in replica_urls
        ]
        self._turn = itertools.count()

    @hookimpl
    def regmw_route_db(self, context):
        if context.is_write:
            return NaiveHandle(self.primary, "primary")
        engine, role = self.nodes[next(self._turn) % len(self.nodes)]
        return NaiveHandle(engine, role)

    def close(self) -> None:
        for engine, _ in self.nodes:
            engine.dispose()


class Workload:
    """Paced workers, per-repository bookkeeping of completed writes, stale-read detection."""

    def __init__(self, middleware, replica_port: int, duration: float, rate: float, workers: int, seed: int):
        self.middleware = middleware
        self.replica_port = replica_port
        self.duration = duration
        self.interval = workers / rate
        self.workers = workers
        self.seed = seed
        self.lock = threading.Lock()
        self.next_value = {repo: 1_000_000 for repo in REPOSITORIES}
        self.completed = {repo: 0 for repo in REPOSITORIES}
        self.counts: Counter[str] = Counter()

    def run(self) -> dict:
        threads = [threading.Thread(target=self._worker, args=(index,)) for index in range(self.workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        reads = self.counts["reads"]
        return {
            "reads": reads,
            "replica_read_share": round(self.counts["replica_reads"] / reads, 4) if reads else 0.0,
            "stale_reads": self.counts["stale_reads"],
            "writes": self.counts["writes"],
            "errors": self.counts["errors"],
            "stale_follow_up_reads": self.counts["stale_follow_up"],
        }

    def _worker(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        client = Client(self.middleware)
        start = time.monotonic()
        deadline = start + self.duration
        next_at = start + rng.random() * self.interval
        just_wrote: str | None = None
        while True:
            now = time.monotonic()
            if now >= deadline:
                return
            if next_at > now:
                time.sleep(next_at - now)  # load pacing, not a correctness wait
            # Poisson arrivals: fixed pacing would put the workers in lockstep with the
            # round-robin turn and hide (or exaggerate) stale reads by parity alone.
            next_at += rng.expovariate(1.0 / self.interval)
            if rng.random() < WRITE_SHARE:
                just_wrote = self._write(client, rng.choice(REPOSITORIES))
            else:
                repo = just_wrote or rng.choice(REPOSITORIES)
                self._read(client, repo, follow_up=just_wrote is not None)
                just_wrote = None

    def _write(self, client: Client, repo: str) -> str | None:
        with self.lock:
            self.next_value[repo] += 1
            value = self.next_value[repo]
        response = client.put(f"/v2/{repo}/manifests/latest", data=str(value))
        with self.lock:
            if response.status_code != 201:
                self.counts["errors"] += 1
                return None
            self.counts["writes"] += 1
            self.completed[repo] = max(self.completed[repo], value)
        return repo

    def _read(self, client: Client, repo: str, follow_up: bool) -> None:
        with self.lock:
            expected = self.completed[repo]
        response = client.get(f"/v2/{repo}/manifests/latest")
        with self.lock:
            if response.status_code != 200:
                self.counts["errors"] += 1
                return
            answer = response.get_json()
            self.counts["reads"] += 1
            self.counts["replica_reads"] += answer["port"] == self.replica_port
            if (answer["value"] or 0) < expected:
                self.counts["stale_reads"] += 1
                self.counts["stale_follow_up"] += follow_up


def reset(cluster: ReplicationCluster) -> None:
    """Same starting point for each mode: every repository at 0, on both servers."""
    cluster.sql("primary", "UPDATE kv SET value = 0")
    cluster.wait_replica_caught_up()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=40.0, help="seconds per mode (default 40)")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second, all workers (default 200)")
    parser.add_argument("--workers", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--lag", default="200ms", help="replica recovery_min_apply_delay (default 200ms)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON line last")
    args = parser.parse_args(argv)

    import logging

    logging.getLogger("regmw").setLevel(logging.ERROR)
    cluster = ReplicationCluster(apply_delay=args.lag).start()
    results: dict[str, dict] = {}
    try:
        cluster.sql("primary", "CREATE TABLE kv (repo text PRIMARY KEY, value bigint NOT NULL)")
        for repo in REPOSITORIES:
            cluster.sql("primary", "INSERT INTO kv (repo, value) VALUES (%s, 0)", repo)
        print(f"primary 127.0.0.1:{cluster.primary_port}, replica 127.0.0.1:{cluster.replica_port} "
              f"(recovery_min_apply_delay {args.lag}); {args.workers} workers, {args.rate:g} req/s, "
              f"{args.duration:g} s per mode", file=sys.stderr)

        config = {
            "regmw": {"plugins": ["dbroute"], "entry_points": False, "log_level": "ERROR"},
            "database": {"primary": cluster.primary_url, "replicas": [cluster.replica_url],
                         "store": "memory", "pool_size": 10, "health_interval": 0.5},
        }
        reset(cluster)
        middleware = RegistryMiddleware(make_app(), config, environ={})
        try:
            results["regmw"] = Workload(middleware, cluster.replica_port, args.duration, args.rate,
                                        args.workers, args.seed).run()
        finally:
            middleware.services.db_router.close()

        reset(cluster)
        naive = NaiveRoundRobin(cluster.primary_url, [cluster.replica_url])
        middleware = RegistryMiddleware(
            make_app(), {"regmw": {"entry_points": False, "log_level": "ERROR"}}, plugins=[naive], environ={}
        )
        try:
            results["round_robin"] = Workload(middleware, cluster.replica_port, args.duration, args.rate,
                                              args.workers, args.seed).run()
        finally:
            naive.close()
    finally:
        cluster.close()

    for mode, figures in results.items():
        print(f"{mode:12s} reads={figures['reads']:6d} writes={figures['writes']:5d} "
              f"replica_read_share={figures['replica_read_share']:.3f} stale_reads={figures['stale_reads']} "
              f"(follow-up reads: {figures['stale_follow_up_reads']}) errors={figures['errors']}")
    if args.json:
        print(json.dumps({
            mode: {key: figures[key] for key in ("reads", "replica_read_share", "stale_reads")}
            for mode, figures in results.items()
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
