"""One Redis command on the request path: redis-py's client call against regmw's lean call, with and without hiredis.

The request path sends one command per request to Redis (the admission's
EVALSHA; a write's event XADD). This measures, side by side and interleaved
call by call, on a throwaway ``redis-server`` (appendonly everysec, as the
notifications bench):

``client``   ``client.xadd(...)`` / ``Script(keys, args)``: redis-py's client layer
             (retry wrapper, observability recorder, event dispatch, response callbacks);
``execute``  ``RedisConnection.execute`` / ``run_script``: the same pool, connection
             and parser, without that layer (plugins/regmw_redis/connection.py).

Each runs once with hiredis (redis-py's C parser, installed with regmw) and
once without it (a child process that hides the ``hiredis`` module), so the
figures show what each choice is worth. Reported per side: p50 and p99 in
microseconds of wall time per call, from ``--calls`` calls each.

Not measured: network latency beyond loopback, a Redis under load, Cluster
(cluster connections route through their client: ``execute`` falls back).

    python benchmarks/redis_call_bench.py [--calls 5000] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from _common import free_port, wait_port

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def measure(url: str, calls: int) -> dict[str, dict[str, float]]:
    """In this process: every side interleaved call by call."""
    sys.path.insert(0, os.path.join(ROOT, "plugins"))
    from regmw_redis.connection import RedisConnection
    from regmw_redis.settings import SECTION

    section = {key: option.default for key, option in SECTION.options.items()} | {"url": url}
    connection = RedisConnection(section)
    client = connection.client
    script = client.register_script("return redis.call('INCR', KEYS[1]) + #ARGV")
    event = json.dumps({"id": "x" * 36, "action": "push", "target": {"repository": "team/app"}}).encode()
    sides = {
        "xadd_client": lambda: client.xadd("bench:s", {"e": event, "r": "team/app"}),
        "xadd_execute": lambda: connection.execute("XADD", "bench:s", "*", "e", event, "r", "team/app"),
        "evalsha_client": lambda: script(keys=["bench:k"], args=[1, 2]),
        "evalsha_execute": lambda: connection.run_script(script, ["bench:k"], [1, 2]),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(200):  # warm: connections dialled, scripts loaded
        for call in sides.values():
            call()
    for _ in range(calls):
        for name, call in sides.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    client.delete("bench:s", "bench:k")
    connection.close()
    out = {}
    for name, values in times.items():
        values.sort()
        out[name] = {"p50_us": round(values[len(values) // 2] * 1e6, 1),
                     "p99_us": round(values[int(len(values) * 0.99)] * 1e6, 1)}
    return out


def child(url: str, calls: int, hiredis: bool) -> dict:
    code = ("import sys; sys.modules['hiredis'] = None\n" if not hiredis else "") + (
        f"import sys, json; sys.path.insert(0, {HERE!r}); import redis_call_bench as b; "
        f"print(json.dumps(b.measure({url!r}, {calls})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        port = free_port()
        proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                                 "127.0.0.1", "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                                 "--dir", work], stdout=subprocess.DEVNULL)
        try:
            wait_port(port, proc, 30.0)
            url = f"redis://127.0.0.1:{port}/0"
            result = {"hiredis": child(url, args.calls, True), "pure_python": child(url, args.calls, False)}
        finally:
            proc.terminate()
            proc.wait()
    for parser_name, sides in result.items():
        for name, figures in sides.items():
            print(f"{parser_name:12s} {name:16s} p50 {figures['p50_us']:7.1f} us  p99 {figures['p99_us']:7.1f} us")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
