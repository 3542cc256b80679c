"""Read-your-writes across processes: regmw's database routing vs a time window vs round-robin.

Starts its own PostgreSQL 15 primary + streaming replica and its own
throwaway redis-server on a free port, then, for each replica lag (the
replica's ``recovery_min_apply_delay``, default 0, 200 ms and 1 s), runs the
SAME workload under three routers, side by side in one run, in ``--rounds``
rounds with the sides in a shuffled order in each (the figures cover every
round; each round's read p50 is reported too). Each side runs
in ``--processes`` worker processes (default 3), each with its own
``regmw.RegistryMiddleware`` (its own runtime, pools and checker thread) in
front of a small Flask app, as gunicorn workers would:

* ``regmw``: the ``dbroute`` plugin, its position store on the shared Redis
  (``[database] store_url``, a namespace of its own per run of a side);
  ``--regmw-store memory`` is the control: positions stay in the process
  that wrote, so the other processes' follow-up reads must go stale;
* ``primary_after_write``: what a careful team would write without LSNs:
  after a write to a repository, reads of it go to the primary for
  ``--window`` ms (default 500), tracked in the same Redis (``SET … PX``) so
  every process sees it; other reads go to the replica;
* ``round_robin``: writes to the primary, reads rotate over every server
  (primary, replica), as a load balancer that knows nothing of lag would.

Workload, per process: Poisson arrivals at ``--rate``/processes; 10% writes
over 100 repositories, 90% reads of a random repository. After each write
the client reads the SAME repository twice, both times through the NEXT
process (a ``multiprocessing`` queue, as a load balancer would send the pull
that follows a push to another instance): at once (``immediate``), and again
0..``--later`` ms (default 2000, uniform) after the write (``later``: a
deploy pulling what CI pushed). A follow-up read is **stale** when it returns
an older value than the one the client wrote (values are the writer's
``time.monotonic_ns()``, one clock for every process). Each read reports
``inet_server_port()``, so the replica share is what the servers say, not
what the router claims. Read latency is the time the in-process WSGI call
took (routing, the store or window lookup, and the query), over every read.

Usage::

    python benchmarks/dbroute_bench.py [--duration 3] [--rounds 2] [--rate 150] [--processes 3] [--window 500]
                                       [--lags 0,200ms,1s] [--json]
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import multiprocessing
import queue
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flask import Flask, jsonify, request
from sqlalchemy import create_engine, text
from werkzeug.test import Client

from regmw.middleware import RegistryMiddleware
from regmw.plugins import hookimpl
from tests.servers._util import free_port, wait_for_port
from tests.servers.postgres_replication import ReplicationCluster

REPOSITORIES = [f"bench/repo-{index:03d}" for index in range(100)]
WRITE_SHARE = 0.10
SIDES = ("regmw", "primary_after_write", "round_robin")
# recovery_min_apply_delay as SHOW prints it (what set_apply_delay polls for) -> label
LAGS = {"0": "0ms", "200ms": "200ms", "1s": "1000ms"}

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


class PrimaryAfterWrite:
    """The careful baseline: reads of a repository go to the primary for ``window_ms`` after a write to it.

    The window is a Redis key per repository (``SET … PX window``), set once
    the write is answered (``regmw_response_started``, before the client sees
    the response), so every process honours it; other reads rotate over the
    replicas. A Redis error sends the read to the primary.
    """

    def __init__(self, primary_url: str, replica_urls: list[str], redis_url: str, namespace: str,
                 window_ms: int) -> None:
        import redis

        self.redis = redis.Redis.from_url(redis_url, socket_timeout=0.25)
        self.namespace, self.window_ms = namespace, window_ms
        self.primary = create_engine(primary_url, pool_size=10, max_overflow=10)
        self.replicas = [create_engine(url, pool_size=10, max_overflow=10) for url in replica_urls]
        self._turn = itertools.count()

    def _key(self, repository: str) -> str:
        return f"{self.namespace}:recent:{repository}"

    @hookimpl
    def regmw_route_db(self, context):
        if context.is_write or not self.replicas:
            return NaiveHandle(self.primary, "primary")
        try:
            recent = context.repository and self.redis.exists(self._key(context.repository))
        except Exception:  # noqa: BLE001 - Redis down: the primary is always right
            recent = True
        if recent:
            return NaiveHandle(self.primary, "primary")
        return NaiveHandle(self.replicas[next(self._turn) % len(self.replicas)], "replica")

    @hookimpl
    def regmw_response_started(self, context, status, headers):
        if context.is_write and context.repository and status < 400:
            self.redis.set(self._key(context.repository), 1, px=self.window_ms)

    def close(self) -> None:
        self.primary.dispose()
        for engine in self.replicas:
            engine.dispose()
        self.redis.close()


def percentile(samples: list[float], fraction: float) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# --- one worker process ------------------------------------------------------------


def build_side(side: str, spec: dict):
    """The middleware for one side, built inside the worker process (its own pools, threads, runtime)."""
    regmw_only = {"entry_points": False, "log_level": "ERROR"}
    if side == "regmw":
        config = {
            "regmw": {"plugins": ["dbroute"], **regmw_only},
            "database": {"primary": spec["primary_url"], "replicas": [spec["replica_url"]],
                         "pool_size": 10, "health_interval": 0.5},
        }
        if spec["regmw_store"] == "redis":
            config["database"].update(store="redis", store_url=spec["redis_url"], store_namespace=spec["namespace"])
        else:  # the control: each process keeps its own positions, the others never see them
            config["database"]["store"] = "memory"
        middleware = RegistryMiddleware(make_app(), config, environ={})
        return middleware, middleware.services.db_router.close
    if side == "primary_after_write":
        plugin = PrimaryAfterWrite(spec["primary_url"], [spec["replica_url"]], spec["redis_url"],
                                   spec["namespace"], spec["window_ms"])
    else:
        plugin = NaiveRoundRobin(spec["primary_url"], [spec["replica_url"]])
    middleware = RegistryMiddleware(make_app(), {"regmw": regmw_only}, plugins=[plugin], environ={})
    return middleware, plugin.close


def worker_process(side: str, spec: dict, index: int, inboxes: list, ready, go, results) -> None:
    """Paced clients in this process; follow-up reads of other processes' writes from ``inboxes[index]``."""
    logging.getLogger("regmw").setLevel(logging.ERROR)
    middleware, close = build_side(side, spec)
    inbox, outbox = inboxes[index], inboxes[(index + 1) % len(inboxes)]
    lock = threading.Lock()
    counts: Counter[str] = Counter()
    latencies: list[float] = []
    ready.put(index)
    go.wait()
    deadline = time.monotonic() + spec["duration"]

    def read(client: Client, repo: str) -> tuple[int, bool] | None:
        started = time.perf_counter()
        response = client.get(f"/v2/{repo}/manifests/latest")
        elapsed = (time.perf_counter() - started) * 1000
        with lock:
            if response.status_code != 200:
                counts["errors"] += 1
                return None
            answer = response.get_json()
            latencies.append(elapsed)
            counts["reads"] += 1
            counts["replica_reads"] += answer["port"] == spec["replica_port"]
        return answer["value"] or 0, answer["port"] == spec["replica_port"]

    def client_loop(seed: int) -> None:
        rng = random.Random(seed)
        client = Client(middleware)
        interval = spec["clients"] / spec["rate_per_process"]
        next_at = time.monotonic() + rng.random() * interval
        while True:
            now = time.monotonic()
            if now >= deadline:
                return
            if next_at > now:
                time.sleep(next_at - now)  # load pacing, not a correctness wait
            next_at += rng.expovariate(1.0 / interval)  # Poisson arrivals
            repo = rng.choice(REPOSITORIES)
            if rng.random() < WRITE_SHARE:
                value = time.monotonic_ns()  # one clock for every process: later writes, larger values
                response = client.put(f"/v2/{repo}/manifests/latest", data=str(value))
                with lock:
                    if response.status_code != 201:
                        counts["errors"] += 1
                        continue
                    counts["writes"] += 1
                # the client's next read goes to another process; it reads again later_ms after the write
                outbox.put((repo, value, rng.uniform(0, spec["later_max_ms"])))
            else:
                read(client, repo)

    timers: list[threading.Timer] = []

    def check(client: Client, repo: str, value: int, kind: str) -> None:
        answer = read(client, repo)
        if answer is None:
            return
        seen, on_replica = answer
        with lock:
            counts[f"{kind}_reads"] += 1
            counts[f"{kind}_replica_reads"] += on_replica
            counts[f"stale_{kind}"] += seen < value

    def follow_up_loop() -> None:
        client = Client(middleware)
        while True:
            try:
                repo, value, later_ms = inbox.get(timeout=0.1)
            except queue.Empty:
                if time.monotonic() >= deadline + 1.0:  # a write sent just before the deadline still gets its read
                    return
                continue
            check(client, repo, value, "immediate")
            # the same client reads it again a little later (a deploy pulling what CI pushed)
            timer = threading.Timer(later_ms / 1000, check, args=(Client(middleware), repo, value, "later"))
            timer.start()
            with lock:
                timers.append(timer)

    threads = [threading.Thread(target=client_loop, args=(spec["seed"] * 1000 + index * 100 + n,))
               for n in range(spec["clients"])]
    threads += [threading.Thread(target=follow_up_loop) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for timer in list(timers):
        timer.join()
    close()
    results.put({"counts": dict(counts), "latencies": latencies})


def run_side(side: str, spec: dict, processes: int) -> tuple[Counter, list[float]]:
    """One side at one lag for one round: ``processes`` workers started together; their counts and latencies."""
    context = multiprocessing.get_context("fork")
    inboxes = [context.Queue() for _ in range(processes)]
    ready, results, go = context.Queue(), context.Queue(), context.Event()
    workers = [context.Process(target=worker_process, args=(side, spec, index, inboxes, ready, go, results))
               for index in range(processes)]
    for worker in workers:
        worker.start()
    try:
        for _ in workers:
            ready.get(timeout=60)  # each has built its runtime (start-up is not measured)
        go.set()
        merged: Counter[str] = Counter()
        latencies: list[float] = []
        for _ in workers:
            figures = results.get(timeout=spec["duration"] + 60)
            merged.update(figures["counts"])
            latencies += figures["latencies"]
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
    return merged, latencies


def summarize(merged: Counter, latencies: list[float], round_p50s: list[float]) -> dict:
    """The reported figures of one side at one lag, over every round."""
    reads = merged["reads"]
    follow_ups = merged["immediate_reads"] + merged["later_reads"]
    stale = merged["stale_immediate"] + merged["stale_later"]

    def share(part: int, whole: int) -> float:
        return round(part / whole, 4) if whole else 0.0

    return {
        "reads": reads,
        "replica_read_share": share(merged["replica_reads"], reads),
        "stale_reads": stale,
        "follow_up_reads": follow_ups,
        "stale_share": share(stale, follow_ups),
        "stale_immediate": merged["stale_immediate"],
        "immediate_reads": merged["immediate_reads"],
        "stale_later": merged["stale_later"],
        "later_reads": merged["later_reads"],
        "follow_up_replica_share": share(merged["immediate_replica_reads"] + merged["later_replica_reads"],
                                         follow_ups),
        "writes": merged["writes"],
        "errors": merged["errors"],
        "read_p50_ms": round(statistics.median(latencies), 3) if latencies else 0.0,
        "read_p99_ms": round(percentile(latencies, 0.99), 3),
        "read_p50_ms_per_round": [round(p50, 3) for p50 in round_p50s],
    }


# --- the run -------------------------------------------------------------------------


def reset(cluster: ReplicationCluster) -> None:
    """Same starting point for each side: every repository at 0, on both servers."""
    cluster.sql("primary", "UPDATE kv SET value = 0")
    cluster.wait_replica_caught_up()


def start_redis(workdir: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, proc=proc)
    return proc, port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0,
                        help="seconds per side, lag and round (default 3)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds per lag, sides shuffled in each (default 2)")
    parser.add_argument("--rate", type=float, default=150.0, help="requests per second, all processes (default 150)")
    parser.add_argument("--processes", type=int, default=3, help="worker processes per side (default 3)")
    parser.add_argument("--clients", type=int, default=3, help="client threads per process (default 3)")
    parser.add_argument("--window", type=int, default=500, help="primary_after_write window in ms (default 500)")
    parser.add_argument("--later", type=int, default=2000,
                        help="the second follow-up read comes 0..LATER ms after the write (default 2000)")
    parser.add_argument("--lags", default="0,200ms,1s",
                        help="recovery_min_apply_delay values, comma-separated (default 0,200ms,1s)")
    parser.add_argument("--regmw-store", choices=("redis", "memory"), default="redis",
                        help="regmw's position store; memory (not shared) is the control that must go stale")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON line last")
    args = parser.parse_args(argv)

    logging.getLogger("regmw").setLevel(logging.ERROR)
    lags = [lag.strip() for lag in args.lags.split(",") if lag.strip()]
    cluster = ReplicationCluster(apply_delay=lags[0]).start()
    workdir = tempfile.mkdtemp(prefix="regmw-dbroute-bench-")
    redis_proc, redis_port = start_redis(workdir)
    by_lag: dict[str, dict[str, dict]] = {}
    try:
        cluster.sql("primary", "CREATE TABLE kv (repo text PRIMARY KEY, value bigint NOT NULL)")
        for repo in REPOSITORIES:
            cluster.sql("primary", "INSERT INTO kv (repo, value) VALUES (%s, 0)", repo)
        print(f"primary 127.0.0.1:{cluster.primary_port}, replica 127.0.0.1:{cluster.replica_port}, "
              f"redis 127.0.0.1:{redis_port}; {args.processes} processes x {args.clients} clients, "
              f"{args.rate:g} req/s, {args.rounds} rounds of {args.duration:g} s per side and lag", file=sys.stderr)
        for lag in lags:
            cluster.set_apply_delay(lag)
            label = LAGS.get(lag, lag)
            by_lag[label] = {}
            merged = {side: (Counter(), [], []) for side in SIDES}
            rng = random.Random(args.seed)
            for round_index in range(args.rounds):
                order = list(SIDES)
                rng.shuffle(order)  # no side always runs first (or last) while the shared machine's load drifts
                for side in order:
                    reset(cluster)
                    spec = {
                        "primary_url": cluster.primary_url, "replica_url": cluster.replica_url,
                        "replica_port": cluster.replica_port, "redis_url": f"redis://127.0.0.1:{redis_port}/0",
                        "namespace": f"dbroute-bench-{uuid.uuid4().hex[:8]}", "window_ms": args.window,
                        "duration": args.duration, "rate_per_process": args.rate / args.processes,
                        "clients": args.clients, "seed": args.seed * 100 + round_index,
                        "later_max_ms": args.later, "regmw_store": args.regmw_store,
                    }
                    counts, latencies = run_side(side, spec, args.processes)
                    merged[side][0].update(counts)
                    merged[side][1].extend(latencies)
                    merged[side][2].append(statistics.median(latencies) if latencies else 0.0)
                    print(f"lag {label:7s} round {round_index + 1} {side:20s} reads={counts['reads']:5d} "
                          f"p50={merged[side][2][-1]:.2f} ms", file=sys.stderr)
            for side in SIDES:
                figures = by_lag[label][side] = summarize(*merged[side])
                print(f"lag {label:7s} {side:20s} reads={figures['reads']:5d} "
                      f"replica={figures['replica_read_share']:.3f} "
                      f"stale={figures['stale_immediate']}/{figures['immediate_reads']} immediate "
                      f"{figures['stale_later']}/{figures['later_reads']} later "
                      f"p50={figures['read_p50_ms']:.2f} ms p99={figures['read_p99_ms']:.2f} ms "
                      f"writes={figures['writes']} errors={figures['errors']}", file=sys.stderr)
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
        cluster.close()

    if args.json:
        headline = by_lag.get("200ms") or next(iter(by_lag.values()))
        summary: dict = {side: headline[side] for side in SIDES}
        summary.update({
            "lags": by_lag, "processes": args.processes, "store": args.regmw_store, "window_ms": args.window, "rounds": args.rounds,
            "later_max_ms": args.later,
            "headline_lag": "200ms" if "200ms" in by_lag else next(iter(by_lag)),
        })
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
