"""What a user sees: regmw and Flask-Limiter over real HTTP, behind gunicorn, driven by wrk.

One run measures every side against the same Flask registry stand-in, each
served by its own gunicorn (1 gthread worker, 4 threads) and driven by ``wrk``
(C, so the load generator does not share the server's GIL):

``bare``                         the Flask app alone;
``passthrough``                  the Flask app behind a WSGI middleware that only calls it (the
                                 floor of any middleware: one more Python call and iterable);
``regmw_core``                   regmw with nothing enabled: no plugins, no rules (request id,
                                 route parsing, context, response wrapper, request metrics);
``regmw_embedded``               regmw on embedded defaults: classification (the ``migration``
                                 plugin) on the filesystem storage, one per-client and one
                                 per-repository rate-limit rule (the bounded in-memory limiter),
                                 the read-only check;
``regmw_embedded_absent``        the same, but no repository exists in storage: every request is
                                 a repository never seen, so classification makes its two
                                 filesystem checks (old root, new root) on every request, since
                                 absence is never cached (the worst case);
``regmw_redis``                  the same chain as ``regmw_embedded`` on a throwaway Redis
                                 (``redis`` plugin, one EVALSHA per request);
``flask_limiter_memory``         Flask-Limiter, the same two limits on ``memory://``, headers ON;
``flask_limiter_memory_noheaders`` the same, headers OFF;
``flask_limiter_redis``          Flask-Limiter on the same Redis, headers ON;
``flask_limiter_redis_noheaders``  the same, headers OFF;
``regmw_rules``                  regmw with the two rate-limit rules only (no classification),
                                 on the same traffic, and
``regmw_rules_1k``               the same fed 1,000 repositories and 1,000 clients: the flat-cost
                                 check (CPU per request at 1M/100k keys against 1k/1k). Without
                                 classification, whose first look-up of each new repository
                                 costs two filesystem stats and so grows with the key space by design.

Traffic: GET manifests; repository names drawn from a Zipf distribution
(s = 1.1) over 1,000,000 names, client addresses uniform over 100,000, sent
through a trusted proxy (``X-Forwarded-For``; every side trusts 127.0.0.1).
The app answers 200 for every name, so the storage holds what that claims:
every repository the request list names exists in the filesystem storage
(one in ten under the new root, the rest under the old one, as mid-migration),
except for ``regmw_embedded_absent``, whose storage is empty.
The request list is pregenerated and wrk's Lua script walks it, each side
continuing where its previous round stopped, so later rounds keep bringing new
keys. Limits are never reached (we measure the cost of counting).

Every round runs every side once, in a fresh random order; idle servers are
SIGSTOPped so they do not compete for the 2 cores. Reported per side: requests
per second, p50 and p99 latency (wrk's), CPU microseconds per request of
the gunicorn worker (utime + stime from /proc, Redis's own CPU not included),
and the worker's RSS after all rounds (``rss_mib``: what it holds for the
distinct keys it saw, at the sides' default caps: regmw's 32 MiB of counters
and 10,000 cache entries; Flask-Limiter's ``memory://`` keeps a key until its
window ends, an hour here).

    python benchmarks/http_bench.py [--rounds 5] [--seconds 8] [--connections 8] [--json]

Setup: installs ``wrk`` with apt-get when it is missing; gunicorn and
Flask-Limiter come with ``pip install -e '.[test]'``; Redis is a throwaway
``redis-server`` on a free port.
"""
from __future__ import annotations

import argparse
import bisect
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from _common import children, cpu_seconds, free_port, rss_bytes, wait_port

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LIMIT = "100000000/hour"  # never reached
SIDES = ("bare", "passthrough", "regmw_core", "regmw_embedded", "regmw_embedded_absent", "regmw_redis", "flask_limiter_memory", "flask_limiter_memory_noheaders",
         "flask_limiter_redis", "flask_limiter_redis_noheaders", "regmw_rules", "regmw_rules_1k")
REPOSITORIES, CLIENTS, ZIPF_S = 1_000_000, 100_000, 1.1


# --- server side: gunicorn imports this module and calls application() ----------------------------


def application():
    """The WSGI app for ``BENCH_KIND`` (gunicorn ``http_bench:application()``)."""
    from flask import Flask, jsonify

    kind, root, redis_url = os.environ["BENCH_KIND"], os.environ["BENCH_ROOT"], os.environ.get("BENCH_REDIS", "")
    app = Flask("registry")

    @app.route("/v2/<path:repository>/manifests/<reference>")
    def manifest(repository, reference):
        return jsonify(schemaVersion=2, repository=repository, reference=reference)

    if kind.startswith("flask_limiter"):
        from flask import request
        from flask_limiter import Limiter
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1)  # the trusted proxy's X-Forwarded-For
        limiter = Limiter(lambda: request.remote_addr, app=app, strategy="fixed-window",
                          storage_uri=redis_url if "redis" in kind else "memory://",
                          headers_enabled=not kind.endswith("noheaders"), key_prefix=f"bench{os.getpid()}")
        view = app.view_functions["manifest"]
        view = limiter.limit(LIMIT)(view)  # per client
        view = limiter.limit(LIMIT, key_func=lambda: request.view_args["repository"], scope="repository")(view)
        app.view_functions["manifest"] = view
        return app
    if kind == "passthrough":
        inner = app.wsgi_app

        def passthrough(environ, start_response):
            return inner(environ, start_response)

        app.wsgi_app = passthrough
        return app
    if kind == "regmw_core":
        from regmw import RegistryMiddleware

        config = {"regmw": {"plugins": [], "entry_points": False, "log_level": "ERROR",
                            "trusted_proxies": ["127.0.0.1/32"]}, "storage": {"root": root}}
        return RegistryMiddleware(app.wsgi_app, config, environ={})
    if kind.startswith("regmw"):
        sys.path.insert(0, os.path.join(ROOT, "plugins"))
        from regmw import RegistryMiddleware

        config = {
            "regmw": {"plugins": [] if kind.startswith("regmw_rules") else
                      ["migration"] + (["redis"] if kind.startswith("regmw_redis") else []),
                      "entry_points": False, "log_level": "ERROR", "trusted_proxies": ["127.0.0.1/32"]},
            "storage": {"root": root},
            "ratelimit": {"rules": [{"name": "per-client", "by": "client", "limit": LIMIT},
                                    {"name": "per-repository", "by": "repository", "limit": LIMIT}]},
        }
        if "migration" in config["regmw"]["plugins"]:
            config["migration"] = {"old_root": "old", "new_root": "new"}
        if kind.startswith("regmw_redis"):
            config["redis"] = {"url": redis_url, "namespace": f"bench{os.getpid()}"}
        return RegistryMiddleware(app.wsgi_app, config, environ={})
    return app


# --- driver side ---------------------------------------------------------------------------------


LUA = r"""
local lines, n, i = {}, 0, 0
function init(args)
  local offset = tonumber(os.getenv("BENCH_OFFSET") or "0")
  for line in io.lines(os.getenv("BENCH_LIST")) do
    n = n + 1
    lines[n] = line
  end
  i = offset % n
end
function request()
  i = i % n + 1
  local path, client = lines[i]:match("([^\t]+)\t([^\t]+)")
  return wrk.format("GET", path, {["X-Forwarded-For"] = client})
end
function done(summary, latency, requests)
  io.write(string.format('{"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "errors": %d, "non2xx": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status))
end
"""


def ensure_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True)
        subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "wrk"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, stdout=subprocess.DEVNULL)
        path = shutil.which("wrk")
    return path


def write_lists(directory: str, length: int, seed: int = 7) -> dict[str, str]:
    """Pregenerated request lists: path TAB client address, one per line."""
    rnd = random.Random(seed)
    cumulative = list(itertools.accumulate(1.0 / (rank ** ZIPF_S) for rank in range(1, REPOSITORIES + 1)))
    total = cumulative[-1]
    names = list(range(REPOSITORIES))
    rnd.shuffle(names)  # popularity rank -> name, so popular names are not neighbours

    def client(index: int) -> str:
        return f"10.{index // 65536}.{index // 256 % 256}.{index % 256}"

    lists = {}
    big = os.path.join(directory, "zipf.tsv")
    with open(big, "w") as handle:
        for _ in range(length):
            rank = bisect.bisect_left(cumulative, rnd.random() * total)
            name = names[min(rank, REPOSITORIES - 1)]
            handle.write(f"/v2/org{name % 1000}/repo-{name}/manifests/latest\t{client(rnd.randrange(CLIENTS))}\n")
    lists["big"] = big
    small = os.path.join(directory, "small.tsv")
    with open(small, "w") as handle:
        for _ in range(20_000):
            name = rnd.randrange(1000)
            handle.write(f"/v2/org{name % 10}/repo-{name}/manifests/latest\t{client(rnd.randrange(1000))}\n")
    lists["small"] = small
    return lists


def populate(storage: str, listing: str) -> int:
    """Make every repository ``listing`` names exist in ``storage`` (one own entry each); returns how many.

    One in ten lives under the new root, the rest under the old one. An empty
    ``_manifests`` file is enough for the own-entries check (a name under the
    repository's directory starting with ``_``) and costs no data block.
    """
    names = set()
    with open(listing) as handle:
        for line in handle:
            names.add(line.split("/manifests/", 1)[0][len("/v2/"):])
    for name in names:
        number = int(name.rsplit("-", 1)[1])
        directory = os.path.join(storage, "new" if number % 10 == 0 else "old", "repositories", name)
        os.makedirs(directory, exist_ok=True)
        open(os.path.join(directory, "_manifests"), "w").close()
    return len(names)


class Server:
    def __init__(self, kind: str, root: str, redis_url: str) -> None:
        self.kind, self.port = kind, free_port()
        env = {**os.environ, "BENCH_KIND": kind, "BENCH_ROOT": root, "BENCH_REDIS": redis_url,
               "PYTHONPATH": os.pathsep.join([HERE, ROOT, os.path.join(ROOT, "plugins")])}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-k", "gthread", "-w", "1", "--threads", "4", "--timeout", "0",
             "--log-level", "error", "-b", f"127.0.0.1:{self.port}", "http_bench:application()"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        wait_port(self.port, self.proc, 60.0)
        deadline = time.monotonic() + 30
        while not children(self.proc.pid):  # the master listens before it forks the worker
            if time.monotonic() > deadline:
                raise TimeoutError(f"{kind}: no gunicorn worker")
            time.sleep(0.05)
        self.worker = children(self.proc.pid)[0]
        self.offset = 0

    def pause(self) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_wrk(wrk: str, script: str, server: Server, listing: str, seconds: int, connections: int) -> dict:
    env = {**os.environ, "BENCH_LIST": listing, "BENCH_OFFSET": str(server.offset)}
    before = cpu_seconds(server.worker)
    out = subprocess.run([wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script,
                          f"http://127.0.0.1:{server.port}"], env=env, capture_output=True, text=True, check=True)
    cpu = cpu_seconds(server.worker) - before
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    server.offset += stats["requests"]
    if stats["errors"] or stats["non2xx"]:
        raise RuntimeError(f"{server.kind}: {stats['errors']} socket errors, {stats['non2xx']} non-2xx answers")
    return {"rps": stats["requests"] / (stats["duration_us"] / 1e6), "p50_ms": stats["p50_us"] / 1000,
            "p99_ms": stats["p99_us"] / 1000, "cpu_us_per_request": cpu * 1e6 / max(1, stats["requests"]),
            "requests": stats["requests"]}


def check_headers(server: Server) -> None:
    """Fail loudly unless the side really limits (RateLimit headers when on) and classifies (regmw)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/v2/org1/repo-1/manifests/latest", headers={"X-Forwarded-For": "10.9.9.9"})
    response = conn.getresponse()
    response.read()
    conn.close()
    names = {name.lower() for name, _ in response.getheaders()}
    limited = any(name.startswith(("ratelimit", "x-ratelimit")) for name in names)
    expect_limit = server.kind not in ("bare", "passthrough", "regmw_core") and not server.kind.endswith("noheaders")
    if response.status != 200 or limited != expect_limit:
        raise RuntimeError(f"{server.kind}: status {response.status}, rate-limit headers {sorted(names)}")
    if server.kind.startswith("regmw") and server.kind != "regmw_core" and "rules" not in server.kind and "regmw-migration-path" not in names:
        raise RuntimeError(f"{server.kind}: not classified ({sorted(names)})")


def start_redis(directory: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", directory], stdout=subprocess.DEVNULL)
    wait_port(port, proc, 60.0)
    return proc, f"redis://127.0.0.1:{port}/0"


def summarise(rounds: list[dict]) -> dict:
    result = {}
    for side in SIDES:
        runs = [r[side] for r in rounds]
        total = sum(run["requests"] for run in runs)
        result[side] = {
            "rps": round(sorted(run["rps"] for run in runs)[len(runs) // 2], 1),
            "p50_ms": round(sorted(run["p50_ms"] for run in runs)[len(runs) // 2], 3),
            "p99_ms": round(sorted(run["p99_ms"] for run in runs)[len(runs) // 2], 3),
            "cpu_us_per_request": round(sum(run["cpu_us_per_request"] * run["requests"] for run in runs) / total, 1),
        }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    # p99 of one 8 s round rests on its ~60 slowest requests: with 3 rounds one noisy round decided the ratio
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=8, help="wrk duration per side and round")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--list-length", type=int, default=1_000_000, help="pregenerated requests")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    wrk = ensure_wrk()
    with tempfile.TemporaryDirectory() as work:
        lists = write_lists(work, args.list_length)
        script = os.path.join(work, "walk.lua")
        with open(script, "w") as handle:
            handle.write(LUA)
        storage, empty = os.path.join(work, "storage"), os.path.join(work, "empty")
        os.makedirs(os.path.join(empty, "old", "repositories"))
        existing = populate(storage, lists["big"]) + populate(storage, lists["small"])
        print(f"storage: {existing} repositories exist (the names the request lists use)")
        redis_proc, redis_url = start_redis(work)
        servers: dict[str, Server] = {}
        try:
            for side in SIDES:
                servers[side] = Server(side, empty if side.endswith("_absent") else storage, redis_url)
                check_headers(servers[side])
                servers[side].pause()
            rounds = []
            rnd = random.Random()
            for number in range(1, args.rounds + 1):
                order = list(SIDES)
                rnd.shuffle(order)
                measured = {}
                for side in order:
                    server = servers[side]
                    server.resume()
                    listing = lists["small" if side.endswith("_1k") else "big"]
                    measured[side] = run_wrk(wrk, script, server, listing, args.seconds, args.connections)
                    server.pause()
                rounds.append(measured)
                print(f"round {number} (order: {', '.join(order)})")
                for side in SIDES:
                    m = measured[side]
                    print(f"  {side:32s} {m['rps']:8.0f} req/s  p50 {m['p50_ms']:7.2f} ms  p99 {m['p99_ms']:7.2f} ms"
                          f"  cpu {m['cpu_us_per_request']:7.0f} us/req  ({m['requests']} requests)")
            # every side's worker after all rounds (each saw its share of the distinct keys)
            rss_mib = {side: round(rss_bytes(servers[side].worker) / 2**20, 1) for side in SIDES}
        finally:
            for server in servers.values():
                server.stop()
            redis_proc.terminate()
            redis_proc.wait()
        sent = {side: servers[side].offset for side in SIDES}
    result = summarise(rounds)
    for side in SIDES:
        result[side]["rss_mib"] = rss_mib[side]
    bare = result["bare"]
    ratios = {
        "passthrough_vs_bare_rps": round(result["passthrough"]["rps"] / bare["rps"], 3),
        "regmw_core_vs_bare_rps": round(result["regmw_core"]["rps"] / bare["rps"], 3),
        "regmw_embedded_vs_bare_rps": round(result["regmw_embedded"]["rps"] / bare["rps"], 3),
        "regmw_embedded_absent_vs_bare_rps": round(result["regmw_embedded_absent"]["rps"] / bare["rps"], 3),
        "regmw_redis_vs_bare_rps": round(result["regmw_redis"]["rps"] / bare["rps"], 3),
        "regmw_redis_vs_flask_limiter_redis_p99": round(
            result["regmw_redis"]["p99_ms"] / result["flask_limiter_redis"]["p99_ms"], 3),
        "regmw_cpu_1m_vs_1k_keys": round(
            result["regmw_rules"]["cpu_us_per_request"] / result["regmw_rules_1k"]["cpu_us_per_request"], 3),
        "regmw_rules_overhead_cpu_us_1m": round(
            result["regmw_rules"]["cpu_us_per_request"] - bare["cpu_us_per_request"], 1),
        "regmw_rules_overhead_cpu_us_1k": round(
            result["regmw_rules_1k"]["cpu_us_per_request"] - bare["cpu_us_per_request"], 1),
    }
    print(f"medians over {args.rounds} rounds (CPU: request-weighted mean); flask_limiter_* = headers on, "
          "*_noheaders = headers off")
    for name, value in ratios.items():
        print(f"  {name}: {value}")
    print(f"  requests sent per side over all rounds: {sent}")
    print(f"  worker RSS after all rounds, MiB: {rss_mib}")
    if args.json:
        out = {**result, "keys": {"repositories": REPOSITORIES, "clients": CLIENTS, "zipf_s": ZIPF_S},
               "ratios": ratios, "headers": {"flask_limiter_memory": "on", "flask_limiter_redis": "on",
                                              "flask_limiter_memory_noheaders": "off",
                                              "flask_limiter_redis_noheaders": "off"}}
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
