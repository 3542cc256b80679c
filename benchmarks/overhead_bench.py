"""What does regmw's Redis-backed hot path cost per request, next to Flask-Limiter?

One run, one throwaway redis-server, the same Flask registry stand-in served
four ways, each by a real threaded WSGI server (werkzeug) in its own process,
driven by concurrent HTTP/1.1 keep-alive clients over loopback:

``bare``              the app alone;
``flask_limiter``     the app behind Flask-Limiter with ONE Redis-backed limit (fixed window);
``regmw``             the app behind regmw with a per-client rate limit, the read-only
                      check (on writes) and a cached classification, all on Redis,
                      ``[redis] hot_path = "script"`` (one EVALSHA per request);
``regmw_limits_path`` the same through ``limits`` (``hot_path = "limits"``): several round trips.

The workload is 4 GETs to 1 PUT of a manifest, the same for every server.
Redis round trips are counted at the connection in each server process
(``redis.connection.Connection.send_packed_command``: one call per command
packet, so a pipeline or a script counts once).

    python benchmarks/overhead_bench.py [--requests 3000] [--concurrency 8] [--rounds 2] [--json]

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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("bare", "flask_limiter", "regmw", "regmw_limits_path")
REPOSITORY = "team/app"
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


def _flask_app(counter: list[int]):
    from flask import Flask, jsonify

    app = Flask("registry")

    @app.route("/v2/<path:rest>", methods=["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE"])
    def registry(rest):
        return jsonify(path=rest), 200

    @app.route("/-/bench/round-trips")
    def round_trips():
        return jsonify(count=counter[0])

    return app


class _StandInClassifier:
    """A cached classification in the style of regmw_migration: prefetched, else cache.get.

    (A stand-in so the benchmark measures the Redis path alone, without a storage backend.)
    """

    def __init__(self):
        from regmw import hookimpl, repository_key

        self.key = lambda context: repository_key(context.repository, "class") if context.repository else None

        @hookimpl
        def regmw_startup(services):
            services.prefetch.append(self.key)
            services.cache.set(repository_key(REPOSITORY, "class"), b"new", ttl=3600)

        @hookimpl
        def regmw_classify(context):
            key = self.key(context)
            value = context.prefetched[key] if key in context.prefetched else context.services.cache.get(key)
            return value.decode() if value else "old"

        self.regmw_startup = regmw_startup
        self.regmw_classify = regmw_classify


def serve(kind: str, port: int, redis_url: str) -> None:
    import logging

    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log in the measured path
    counter = _count_round_trips()
    app = _flask_app(counter)
    wsgi = app
    if kind == "flask_limiter":
        from flask_limiter import Limiter
        from flask_limiter.util import get_remote_address

        limiter = Limiter(get_remote_address, app=app, storage_uri=redis_url, default_limits=[LIMIT],
                          strategy="fixed-window")
        limiter.exempt(app.view_functions["round_trips"])
    elif kind.startswith("regmw"):
        from regmw import RegistryMiddleware

        sys.path.insert(0, os.path.join(ROOT, "plugins"))
        config = {
            "regmw": {"plugins": ["redis"], "entry_points": False, "log_level": "ERROR"},
            "redis": {"url": redis_url, "hot_path": "limits" if kind == "regmw_limits_path" else "script"},
            "ratelimit": {"rules": [{"name": "per-client", "by": "client", "limit": LIMIT}]},
        }
        middleware = RegistryMiddleware(app.wsgi_app, config, plugins=[_StandInClassifier()], environ={})
        app.wsgi_app = middleware
    server = make_server("127.0.0.1", port, wsgi, threaded=True)
    print("ready", flush=True)
    server.serve_forever()


# --- driver side ------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing on port {port}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
    lock = threading.Lock()
    per_worker = requests // concurrency
    stop_at = time.monotonic() + deadline_s
    path = f"/v2/{REPOSITORY}/manifests/latest"

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine, codes = [], {}
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
        conn.close()
        with lock:
            latencies.extend(mine)
            for code, count in codes.items():
                statuses[code] = statuses.get(code, 0) + count

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
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
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="measured requests per server per round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all servers (best round is kept)")
    parser.add_argument("--redis-url", help="use this Redis instead of a throwaway redis-server")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--serve", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.redis_url)
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
            _wait_port(redis_port, redis_proc)
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "plugins"),
                                                             os.environ.get("PYTHONPATH", "")]))
        ports = {}
        for kind in KINDS:
            port = _free_port()
            proc = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--serve", kind, "--port", str(port), "--redis-url", redis_url],
                env=env, stdout=subprocess.DEVNULL,
            )
            procs.append(proc)
            _wait_port(port, proc)
            ports[kind] = port

        best: dict[str, dict] = {}
        for round_index in range(args.rounds):
            for kind in KINDS:
                port = ports[kind]
                drive(port, max(200, args.requests // 10), args.concurrency)  # warm up: connections, scripts
                before = _get_json(port, "/-/bench/round-trips")["count"]
                result = drive(port, args.requests, args.concurrency)
                after = _get_json(port, "/-/bench/round-trips")["count"]
                result["redis_round_trips_per_request"] = round((after - before) / max(1, result["requests"]), 3)
                if kind not in best or result["p50_ms"] < best[kind]["p50_ms"]:
                    best[kind] = result
                print(f"round {round_index + 1} {kind:18s} {result['rps']:8.1f} req/s  p50 {result['p50_ms']:7.3f} ms  "
                      f"p99 {result['p99_ms']:7.3f} ms  redis round trips/request "
                      f"{result['redis_round_trips_per_request']:.2f}  statuses {result['statuses']}", flush=True)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    for kind in KINDS:
        result = best[kind]
        print(f"best  {kind:18s} {result['rps']:8.1f} req/s  p50 {result['p50_ms']:7.3f} ms  p99 {result['p99_ms']:7.3f} ms  "
              f"round trips/request {result['redis_round_trips_per_request']:.2f}")
    ratio = best["regmw"]["p50_ms"] / best["flask_limiter"]["p50_ms"]
    print(f"regmw p50 / flask_limiter p50 = {ratio:.3f}  (target <= 1.0; round trips target 1)")
    if args.json:
        def pick(kind: str, *extra: str) -> dict:
            return {key: best[kind][key] for key in ("rps", "p50_ms", "p99_ms", *extra)}

        print(json.dumps({
            "bare": pick("bare"),
            "flask_limiter": pick("flask_limiter", "redis_round_trips_per_request"),
            "regmw": pick("regmw", "redis_round_trips_per_request"),
            "regmw_vs_flask_limiter_p50_ratio": round(ratio, 3),
            "regmw_limits_path": pick("regmw_limits_path", "redis_round_trips_per_request"),
            "regmw_limits_path_vs_flask_limiter_p50_ratio": round(
                best["regmw_limits_path"]["p50_ms"] / best["flask_limiter"]["p50_ms"], 3),
            "workload": "4 GET : 1 PUT manifest, keep-alive, loopback",
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
