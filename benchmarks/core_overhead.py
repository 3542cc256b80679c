"""What one request costs in regmw's middleware, against the bare app, measured side by side.

Both sides are called in-process through a WSGI call loop (no sockets), so the
difference is the middleware alone: route parsing, the request context, the
admit hook (one in-memory rate-limit rule) and the response wrapper, with the
embedded defaults (``[regmw] plugins = []``, memory rate limiter, filesystem
storage); the other decision hooks have no implementation there, so the
middleware skips them. Rounds alternate bare and regmw (and their
order) so drift in CPU speed hits both alike.

    python benchmarks/core_overhead.py [--rounds 20] [--requests 2000] [--json] [--profile] [--dispatch]

``--dispatch`` also measures one decision hook (``regmw_admit``) implemented by
1, 5 and 20 plugins that all answer None: pluggy's hook call against the call
plan the middleware makes at start-up (``regmw.middleware._call_plan``),
interleaved, and adds ``"dispatch": {"1": {"pluggy_us", "plan_us"}, ...}`` to the JSON.

``--limiter`` also measures the rate limiter alone (two rules, per client and
per repository) per hit: the embedded ``MemoryRateLimiter`` fed 1,000 keys and
1,000,000 repositories with 100,000 clients (32 MiB cap, so the large run
evicts), and ``limits``' ``FixedWindowRateLimiter`` on ``MemoryStorage`` (the
previous default) at 1,000 keys, for the choice of a table of our own. It adds
``"limiter": {...}`` to the JSON.

With ``--json`` the last line is
``{"bare": {"rps": x, "p50_ms": x}, "regmw": {"rps": x, "p50_ms": x}, "overhead_us_p50": x}``.
"""
from __future__ import annotations

import argparse
import cProfile
import functools
import io
import json
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

from regmw import RegistryMiddleware

MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "config": {}, "layers": []}).encode()
HEADERS = [("Content-Type", "application/vnd.oci.image.manifest.v1+json"), ("Content-Length", str(len(MANIFEST))),
           ("Docker-Content-Digest", "sha256:" + "0" * 64)]


def trivial_registry(environ: dict, start_response: Callable) -> list[bytes]:
    """The cheapest possible registry: every request gets the same manifest."""
    start_response("200 OK", HEADERS)
    return [MANIFEST]


def make_environ(path: str) -> dict:
    return {
        "REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "SCRIPT_NAME": "",
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "5000", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "10.1.2.3", "HTTP_HOST": "registry.example", "HTTP_ACCEPT": HEADERS[0][1],
        "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b""), "wsgi.errors": sys.stderr,
    }


def _start_response(status, headers, exc_info=None):
    return None


def run_round(app: Callable, template: dict, count: int) -> tuple[list[int], int]:
    """``count`` requests; returns per-request nanoseconds and the round's wall time."""
    latencies = []
    clock = time.perf_counter_ns
    begin = clock()
    for _ in range(count):
        environ = dict(template)
        start = clock()
        body = app(environ, _start_response)
        for _chunk in body:
            pass
        close = getattr(body, "close", None)
        if close is not None:
            close()
        latencies.append(clock() - start)
    return latencies, clock() - begin


def build_middleware(root: str) -> RegistryMiddleware:
    config = {
        "regmw": {"plugins": [], "entry_points": False},
        "storage": {"root": root},
        "ratelimit": {"rules": [{"by": "client", "limit": "1000000000/minute", "name": "bench"}]},
    }
    return RegistryMiddleware(trivial_registry, config, environ={})


def measure(rounds: int, requests: int, path: str) -> dict:
    with tempfile.TemporaryDirectory() as root:
        apps = {"bare": trivial_registry, "regmw": build_middleware(root)}
        template = make_environ(path)
        for app in apps.values():  # warm-up: imports, caches, first-call paths
            run_round(app, template, min(500, requests))
        samples: dict[str, list[int]] = {name: [] for name in apps}
        wall: dict[str, int] = dict.fromkeys(apps, 0)
        for index in range(rounds):
            order = list(apps) if index % 2 == 0 else list(reversed(apps))
            for name in order:
                latencies, elapsed = run_round(apps[name], template, requests)
                samples[name].extend(latencies)
                wall[name] += elapsed
    result = {
        name: {"rps": round(len(samples[name]) / (wall[name] / 1e9), 1),
               "p50_ms": round(statistics.median(samples[name]) / 1e6, 6)}
        for name in apps
    }
    overhead = (statistics.median(samples["regmw"]) - statistics.median(samples["bare"])) / 1e3
    return {**result, "overhead_us_p50": round(overhead, 2)}


def dispatch(plugin_counts: tuple[int, ...] = (1, 5, 20), calls: int = 20000, rounds: int = 5) -> dict:
    """Microseconds per ``regmw_admit`` call: pluggy's caller against the start-up call plan."""
    import pluggy

    from regmw import hookspecs
    from regmw.middleware import _call_plan
    from regmw.plugins import hookimpl

    class Silent:
        @hookimpl
        def regmw_admit(self, context):
            return None

    result = {}
    for count in plugin_counts:
        pm = pluggy.PluginManager("regmw")
        pm.add_hookspecs(hookspecs)
        for index in range(count):
            pm.register(Silent(), name=f"silent{index}")
        # pluggy is called by keyword, a plan positionally (in the spec's order)
        sides = {"pluggy_us": functools.partial(pm.hook.regmw_admit, context=None),
                 "plan_us": functools.partial(_call_plan(pm.hook.regmw_admit), None)}
        best = dict.fromkeys(sides, float("inf"))
        for index in range(rounds):
            for name in (sides if index % 2 == 0 else reversed(list(sides))):
                call = sides[name]
                start = time.perf_counter_ns()
                for _ in range(calls):
                    call()
                best[name] = min(best[name], (time.perf_counter_ns() - start) / calls / 1e3)
        result[str(count)] = {name: round(value, 3) for name, value in best.items()}
    return result


def limiter_costs(hits: int = 200_000) -> dict:
    """Microseconds per hit of the embedded limiter at 1k and 1M keys, and of ``limits`` on memory at 1k."""
    import random

    from regmw.defaults.ratelimit import LimitsRateLimiter, MemoryRateLimiter, parse_rules

    rules = parse_rules([{"by": "client", "limit": "1000000000/hour"}, {"by": "repository", "limit": "1000000000/hour"}])

    class Context:
        __slots__ = ("client", "is_write", "repository", "subject")

    def contexts(repositories: int, clients: int) -> list:
        rnd = random.Random(3)
        made = []
        for _ in range(hits):
            context = Context()
            client = rnd.randrange(clients)
            context.client, context.is_write, context.subject = f"10.{client >> 16}.{client >> 8 & 255}.{client & 255}", False, None
            context.repository = f"org/repo-{rnd.randrange(repositories)}"
            made.append(context)
        return made

    def per_hit(limiter, made: list) -> float:
        hit = limiter.hit
        start = time.perf_counter_ns()
        for context in made:
            hit(context)
        return (time.perf_counter_ns() - start) / len(made) / 1e3

    small, large = contexts(1000, 1000), contexts(1_000_000, 100_000)
    result = {}
    embedded_small, embedded_large = MemoryRateLimiter(rules), MemoryRateLimiter(rules)
    per_hit(embedded_small, small)  # warm: every key resident
    # the large run starts from a full table (a previous pass of the same key space), so it evicts throughout
    per_hit(embedded_large, contexts(1_000_000, 100_000))
    result["memory_1k_keys_us"] = round(min(per_hit(embedded_small, small) for _ in range(3)), 3)
    result["memory_1m_keys_us"] = round(min(per_hit(embedded_large, large) for _ in range(3)), 3)
    result["memory_1m_counters_held"] = embedded_large.counters
    result["memory_1m_bytes_charged"] = embedded_large.size_bytes
    limits_small = LimitsRateLimiter(rules, "memory://", "fixed-window")
    per_hit(limits_small, small[: hits // 4])
    result["limits_memory_storage_1k_keys_us"] = round(per_hit(limits_small, small[: hits // 4]), 3)
    return result


def profile(requests: int, path: str, top: int = 25) -> str:
    """cProfile of the middleware path only, sorted by own time."""
    with tempfile.TemporaryDirectory() as root:
        app = build_middleware(root)
        template = make_environ(path)
        run_round(app, template, 500)
        profiler = cProfile.Profile()
        profiler.enable()
        run_round(app, template, requests)
        profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--requests", type=int, default=2000, help="requests per round and side")
    parser.add_argument("--path", default="/v2/group/project/manifests/latest")
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of the middleware path")
    parser.add_argument("--dispatch", action="store_true", help="also measure hook dispatch with 1, 5, 20 plugins")
    parser.add_argument("--limiter", action="store_true", help="also measure the rate limiter alone at 1k and 1M keys")
    args = parser.parse_args(argv)

    result = measure(args.rounds, args.requests, args.path)
    if args.dispatch:
        result["dispatch"] = dispatch()
    if args.limiter:
        result["limiter"] = limiter_costs()
    bare, regmw = result["bare"], result["regmw"]
    print(f"GET {args.path}, {args.rounds} interleaved rounds x {args.requests} requests per side, in-process WSGI")
    print(f"  bare app : {bare['rps']:>10.0f} req/s   p50 {bare['p50_ms'] * 1000:8.2f} us")
    print(f"  regmw    : {regmw['rps']:>10.0f} req/s   p50 {regmw['p50_ms'] * 1000:8.2f} us")
    print(f"  overhead : {result['overhead_us_p50']:.2f} us per request at p50 "
          f"(throughput ratio regmw/bare {regmw['rps'] / bare['rps']:.3f})")
    for count, figures in result.get("dispatch", {}).items():
        print(f"  regmw_admit, {count:>2} plugin(s): pluggy {figures['pluggy_us']:6.2f} us, "
              f"start-up call plan {figures['plan_us']:6.2f} us per call (best of 5 interleaved rounds)")
    if "limiter" in result:
        figures = result["limiter"]
        print(f"  rate limiter, 2 rules, per hit: embedded at 1k keys {figures['memory_1k_keys_us']:.2f} us, "
              f"at 1M repositories / 100k clients {figures['memory_1m_keys_us']:.2f} us "
              f"({figures['memory_1m_counters_held']} counters held, {figures['memory_1m_bytes_charged']} bytes); "
              f"limits MemoryStorage at 1k keys {figures['limits_memory_storage_1k_keys_us']:.2f} us")
    if args.profile:
        print(profile(args.requests * 5, args.path))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
