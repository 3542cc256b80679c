"""What does regmw's Redis-backed hot path cost per request, next to Flask-Limiter?

One run, one throwaway redis-server, the same Flask registry stand-in served
four ways, each by a real threaded WSGI server (werkzeug) in its own process,
driven by concurrent HTTP/1.1 keep-alive clients over loopback:

``bare``              the app alone;
``flask_limiter``     the app behind Flask-Limiter with ONE Redis-backed limit (fixed window);
``regmw``             the app behind regmw with a per-client rate limit, the read-only
                      check (on writes) and the REAL classification plugin
                      (``[regmw] plugins = ["migration", "redis"]``) over the embedded
                      filesystem storage, ``[redis] hot_path = "script"`` (one EVALSHA
                      per request, which also prefetches the cached classification);
``regmw_limits_path`` the same through ``limits`` (``hot_path = "limits"``): several round trips;
``regmw_cluster``     ``regmw`` on a throwaway Redis Cluster (3 masters + 3 replicas on loopback,
                      ``redis+cluster://``): a request's keys are in its client's slot and its
                      repository's slot, one script per slot group, sent concurrently.

The storage is a temporary directory holding the benchmarked repositories under
the old layout (``<root>/old/repositories/<name>/_manifests/...``;
``[storage] root = <root>``, ``[migration] old_root = "old"``, ``new_root = "new"``),
so the first request for a repository asks storage and caches "old" in Redis,
and every later one is classified from the value the admission script prefetched.
Before measuring, the driver checks that the regmw servers answer with
``Regmw-Migration-Path: old`` (a misconfiguration fails the run), and during the
measured phase it counts those headers and the storage requests made.

The workload is 4 GETs to 1 PUT of a manifest, spread over the repositories
(one per client connection), the same for every server.
Redis round trips are counted at the connection in each server process
(``redis.connection.Connection.send_packed_command``: one call per command
packet, so a pipeline or a script counts once); storage requests are counted
at ``FilesystemStorage.prefix_exists`` (the whole Storage contract).

    python benchmarks/overhead_bench.py [--requests 3000] [--concurrency 8] [--rounds 2] [--json] [--no-cluster]

With ``--json`` the last line is one JSON object (see the end of this file).
Figures are ratios measured side by side in one run; tests never assert them.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from _common import wait_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("bare", "flask_limiter", "regmw", "regmw_limits_path", "regmw_cluster")
REPOSITORIES = ("team/app", "team/api", "library/alpine", "group/sub/web")
MIGRATION_HEADER = "Regmw-Migration-Path"
LIMIT = "1000000/hour"  # never reached: we measure the cost of counting, not refusals


# --- server side (runs in a child process: --serve KIND) ----------------------------


def _count_round_trips() -> list[int]:
    """Count every command packet any redis-py connection in this process writes."""
    import redis.connection

    counter = [0]
    original = redis.connection.Connection.send_packed_command

    def counting(self, command, check_health=True):
        counter[0] += 1
        return original(self, command, check_health)

    redis.connection.Connection.send_packed_command = counting
    return counter


def _count_storage_requests() -> list[int]:
    """Count every request the embedded filesystem storage answers in this process."""
    from regmw.defaults.filesystem import FilesystemStorage

    counter = [0]
    original = FilesystemStorage.prefix_exists

    def counting(self, key):
        counter[0] += 1
        return original(self, key)

    FilesystemStorage.prefix_exists = counting
    return counter


def make_storage(root: str) -> None:
    """The benchmarked repositories under the OLD layout of a registry's filesystem storage."""
    for repository in REPOSITORIES:
        tags = os.path.join(root, "old", "repositories", repository, "_manifests", "tags", "latest", "current")
        os.makedirs(tags, exist_ok=True)
        with open(os.path.join(tags, "link"), "w") as handle:
            handle.write("sha256:" + "0" * 64)


def _flask_app(counter: list[int], storage_counter: list[int]):
    from flask import Flask, jsonify

    app = Flask("registry")

    @app.route("/v2/<path:rest>", methods=["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE"])
    def registry(rest):
        return jsonify(path=rest), 200

    @app.route("/-/bench/counters")
    def counters():
        from regmw import metrics

        nodes = metrics.REGISTRY.get_sample_value("regmw_redis_cluster_admission_nodes_total") or 0
        return jsonify(redis=counter[0], storage=storage_counter[0], nodes=nodes)

    return app


def serve(kind: str, port: int, redis_url: str, storage_root: str) -> None:
    import logging

    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log in the measured path
    counter = _count_round_trips()
    storage_counter = _count_storage_requests()
    app = _flask_app(counter, storage_counter)
    wsgi = app
    if kind == "flask_limiter":
        from flask_limiter import Limiter
        from flask_limiter.util import get_remote_address

        limiter = Limiter(get_remote_address, app=app, storage_uri=redis_url, default_limits=[LIMIT],
                          strategy="fixed-window")
        limiter.exempt(app.view_functions["counters"])
    elif kind.startswith("regmw"):
        from regmw import RegistryMiddleware

        sys.path.insert(0, os.path.join(ROOT, "plugins"))
        config = {  # regmw_cluster: the same, its --redis-url is a redis+cluster:// URL
            "regmw": {"plugins": ["migration", "redis"], "entry_points": False, "log_level": "ERROR"},
            "redis": {"url": redis_url, "hot_path": "limits" if kind == "regmw_limits_path" else "script"},
            "ratelimit": {"rules": [{"name": "per-client", "by": "client", "limit": LIMIT}]},
            "storage": {"root": storage_root},
            # "old" answers live a day: the whole run is classified from the cache after the first request
            "migration": {"old_root": "old", "new_root": "new", "old_ttl": 86400},
        }
        middleware = RegistryMiddleware(app.wsgi_app, config, environ={})
        app.wsgi_app = middleware
    server = make_server("127.0.0.1", port, wsgi, threaded=True)
    print("ready", flush=True)
    server.serve_forever()


# --- driver side ------------------------------------------------------------------------


def start_cluster(binary: str, tmp: str, procs: list) -> str:
    """3 masters + 3 replicas on free loopback ports; the ``redis+cluster://`` URL once all slots are ok."""
    import redis

    ports = []
    for index in range(6):
        directory = os.path.join(tmp, f"cluster{index}")
        os.makedirs(directory)
        port, bus = _free_port(below=55536), _free_port(below=55536)
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", directory, "--cluster-enabled", "yes", "--cluster-config-file", os.path.join(directory, "nodes.conf"),
             "--cluster-node-timeout", "1000", "--cluster-port", str(bus)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        wait_port(port, proc, 15.0)
        ports.append(port)
    subprocess.run([shutil.which("redis-cli"), "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
                    "--cluster-replicas", "1", "--cluster-yes"], check=True, capture_output=True, timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        infos = [redis.Redis(port=port, socket_timeout=1).cluster("info") for port in ports]
        if all(info.get("cluster_state") == "ok" and int(info.get("cluster_slots_ok", 0)) == 16384 for info in infos):
            return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in ports[:3])
        time.sleep(0.05)
    raise TimeoutError("redis cluster not ok after 30 s")


def _free_port(below: int = 65536) -> int:
    import socket

    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port < below:  # a Cluster node's port must be below 55536
            return port
    raise RuntimeError(f"no free port below {below}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def check_classified(port: int, kind: str) -> None:
    """Fail loudly unless a regmw server classifies every benchmarked repository (GET and PUT) as old."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for repository in REPOSITORIES:
            for method, body in (("GET", None), ("PUT", b"{}")):
                conn.request(method, f"/v2/{repository}/manifests/latest", body=body,
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                text = response.read()
                got = response.getheader(MIGRATION_HEADER)
                if response.status != 200 or got != "old":
                    raise RuntimeError(f"{kind}: {method} {repository} answered {response.status} with "
                                       f"{MIGRATION_HEADER}: {got!r}, expected 200 and 'old' ({text[:200]!r}); "
                                       "is the migration plugin configured?")
    finally:
        conn.close()


def _get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    body = conn.getresponse().read()
    conn.close()
    return json.loads(body)


def drive(port: int, requests: int, concurrency: int, deadline_s: float = 30.0) -> dict:
    """Send ``requests`` (4 GET : 1 PUT) over ``concurrency`` keep-alive connections."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    paths: dict[str, int] = {}
    lock = threading.Lock()
    per_worker = requests // concurrency
    stop_at = time.monotonic() + deadline_s

    def worker(number: int) -> None:
        path = f"/v2/{REPOSITORIES[number % len(REPOSITORIES)]}/manifests/latest"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine, codes, seen = [], {}, {}
        for index in range(per_worker):
            if time.monotonic() > stop_at:
                break
            method, body = ("PUT", b"{}") if index % 5 == 4 else ("GET", None)
            start = time.perf_counter()
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            mine.append(time.perf_counter() - start)
            codes[response.status] = codes.get(response.status, 0) + 1
            migration_path = response.getheader(MIGRATION_HEADER)
            if migration_path is not None:
                seen[migration_path] = seen.get(migration_path, 0) + 1
        conn.close()
        with lock:
            latencies.extend(mine)
            for code, count in codes.items():
                statuses[code] = statuses.get(code, 0) + count
            for value, count in seen.items():
                paths[value] = paths.get(value, 0) + count

    threads = [threading.Thread(target=worker, args=(number,)) for number in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 3),
        "p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 3),
        "requests": len(latencies),
        "statuses": statuses,
        "migration_paths": paths,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="measured requests per server per round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all servers (best round is kept)")
    parser.add_argument("--redis-url", help="use this Redis instead of a throwaway redis-server")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--no-cluster", action="store_true", help="leave out the Redis Cluster side")
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--storage-root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.redis_url, args.storage_root)
        return 0

    procs: list[subprocess.Popen] = []
    tmp = tempfile.mkdtemp(prefix="regmw-bench-")
    try:
        redis_url = args.redis_url
        if redis_url is None:
            binary = shutil.which("redis-server")
            if binary is None:
                print("redis-server not on PATH; pass --redis-url", file=sys.stderr)
                return 2
            redis_port = _free_port()
            redis_proc = subprocess.Popen(
                [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            procs.append(redis_proc)
            wait_port(redis_port, redis_proc, 15.0)
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
        kinds = KINDS[:-1] if args.no_cluster else KINDS
        urls = {kind: redis_url for kind in kinds}
        if not args.no_cluster:
            urls["regmw_cluster"] = start_cluster(shutil.which("redis-server"), tmp, procs)
        storage_root = os.path.join(tmp, "storage")
        make_storage(storage_root)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "plugins"),
                                                             os.environ.get("PYTHONPATH", "")]))
        ports = {}
        for kind in kinds:
            port = _free_port()
            proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--serve", kind, "--port", str(port), "--redis-url", urls[kind],
                 "--storage-root", storage_root],
                env=env, stdout=subprocess.DEVNULL,
            )
            procs.append(proc)
            wait_port(port, proc, 15.0)
            ports[kind] = port
            if kind.startswith("regmw"):
                check_classified(port, kind)

        best: dict[str, dict] = {}
        for round_index in range(args.rounds):
            for kind in kinds:
                port = ports[kind]
                drive(port, max(200, args.requests // 10), args.concurrency)  # warm up: connections, scripts
                before = _get_json(port, "/-/bench/counters")
                result = drive(port, args.requests, args.concurrency)
                after = _get_json(port, "/-/bench/counters")
                measured = max(1, result["requests"])
                result["redis_round_trips_per_request"] = round((after["redis"] - before["redis"]) / measured, 3)
                result["storage_requests_per_request"] = round((after["storage"] - before["storage"]) / measured, 3)
                result["nodes_per_request"] = round((after["nodes"] - before["nodes"]) / measured, 3)
                if kind.startswith("regmw") and result["migration_paths"] != {"old": result["requests"]}:
                    raise RuntimeError(f"{kind}: {MIGRATION_HEADER} headers {result['migration_paths']} "
                                       f"for {result['requests']} requests, expected all 'old'")
                if kind not in best or result["p50_ms"] < best[kind]["p50_ms"]:
                    best[kind] = result
                print(f"round {round_index + 1} {kind:18s} {result['rps']:8.1f} req/s  p50 {result['p50_ms']:7.3f} ms  "
                      f"p99 {result['p99_ms']:7.3f} ms  redis round trips/request "
                      f"{result['redis_round_trips_per_request']:.2f}  storage requests/request "
                      f"{result['storage_requests_per_request']:.3f}  statuses {result['statuses']}", flush=True)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    for kind in kinds:
        result = best[kind]
        print(f"best  {kind:18s} {result['rps']:8.1f} req/s  p50 {result['p50_ms']:7.3f} ms  p99 {result['p99_ms']:7.3f} ms  "
              f"round trips/request {result['redis_round_trips_per_request']:.2f}  "
              f"storage requests/request {result['storage_requests_per_request']:.3f}")
    ratio = best["regmw"]["p50_ms"] / best["flask_limiter"]["p50_ms"]
    print(f"regmw p50 / flask_limiter p50 = {ratio:.3f}  (target <= 1.0; round trips target 1)")
    if "regmw_cluster" in best:
        cluster = best["regmw_cluster"]
        print(f"regmw_cluster p50 / regmw p50 = {cluster['p50_ms'] / best['regmw']['p50_ms']:.3f}  (target <= 1.3); "
              f"nodes/request {cluster['nodes_per_request']:.2f}")
    if args.json:
        def pick(kind: str, *extra: str) -> dict:
            return {key: best[kind][key] for key in ("rps", "p50_ms", "p99_ms", *extra)}

        extra = {}
        if "regmw_cluster" in best:
            extra = {
                "regmw_cluster": pick("regmw_cluster", "redis_round_trips_per_request", "nodes_per_request"),
                "regmw_cluster_vs_regmw_p50_ratio": round(best["regmw_cluster"]["p50_ms"] / best["regmw"]["p50_ms"], 3),
            }
        print(json.dumps({
            "bare": pick("bare"),
            "flask_limiter": pick("flask_limiter", "redis_round_trips_per_request"),
            "regmw": pick("regmw", "redis_round_trips_per_request", "storage_requests_per_request"),
            "regmw_vs_flask_limiter_p50_ratio": round(ratio, 3),
            "regmw_limits_path": pick("regmw_limits_path", "redis_round_trips_per_request",
                                      "storage_requests_per_request"),
            "regmw_limits_path_vs_flask_limiter_p50_ratio": round(
                best["regmw_limits_path"]["p50_ms"] / best["flask_limiter"]["p50_ms"], 3),
            **extra,
            "workload": f"4 GET : 1 PUT manifest over {len(REPOSITORIES)} repositories, keep-alive, loopback",
            "classification": "regmw_migration over filesystem storage, cached in Redis (all old)",
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
