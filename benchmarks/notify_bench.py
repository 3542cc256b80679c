"""Webhook notifications: what an event adds to a write request, and how fast it is delivered, in order.

Starts its own redis-server (free port, appendonly yes, everysec) and a
webhook receiver on loopback, then measures, side by side in one run:

1. **enqueue**: PUT manifest requests through the real middleware
   (plugins redis + notifications) against the same middleware without the
   notifications plugin; the difference of the per-request times is what
   making the event durable (one XADD) adds. Requests are called as WSGI,
   in-process, so the HTTP server's cost is left out of both sides.
2. **delivered_per_s**: N events over 200 repositories queued first, then
   ``regmw notifications worker`` (a separate process, the real CLI) delivers
   them; the receiver checks per-repository order of first deliveries.
3. **end-to-end**: events emitted at half that rate; the receiver records
   arrival time minus emit time (one clock: the receiver is in this process).

Usage: ``python benchmarks/notify_bench.py [--events N] [--batch-max B] [--json]``
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path

from regmw import RegistryMiddleware
from regmw_notify.events import plugin_event


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(directory: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                             "127.0.0.1", "--save", "", "--appendonly", "yes", "--appendfsync", "everysec",
                             "--dir", directory], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("redis-server did not start")


class Receiver(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # listen backlog: the default 5 drops SYNs from many lanes (1 s retransmits)

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.arrivals: list[tuple[float, dict]] = []

    def count(self) -> int:
        with self.lock:
            return len(self.arrivals)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        now = time.time()
        events = json.loads(body)["events"]
        with self.server.lock:
            self.server.arrivals.extend((now, event) for event in events)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def registry_app(environ, start_response):
    start_response("201 Created", [("Content-Type", "application/json"), ("Docker-Content-Digest", "sha256:" + "a" * 64)])
    return [b"{}"]


def time_requests(middleware: RegistryMiddleware, count: int) -> list[float]:
    """Seconds per PUT manifest request through ``middleware`` (WSGI, in-process)."""
    times = []
    for index in range(count):
        environ = {"REQUEST_METHOD": "PUT", "PATH_INFO": f"/v2/team/app{index % 200}/manifests/v{index}",
                   "QUERY_STRING": "", "CONTENT_TYPE": "application/vnd.oci.image.manifest.v1+json",
                   "CONTENT_LENGTH": "2", "wsgi.input": BytesIO(b"{}"), "wsgi.url_scheme": "http",
                   "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "5000", "REMOTE_ADDR": "127.0.0.1",
                   "HTTP_HOST": "127.0.0.1:5000"}
        started = time.perf_counter()
        body = middleware(environ, lambda status, headers, exc_info=None: None)
        for _ in body:
            pass
        body.close()
        times.append(time.perf_counter() - started)
    return times


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def in_order(arrivals: list[tuple[float, dict]]) -> bool:
    seen, last = set(), {}
    for _, event in arrivals:
        if event["id"] in seen:
            continue
        seen.add(event["id"])
        repository, position = event["target"]["repository"], int(event["target"]["tag"])
        if position != last.get(repository, 0) + 1:
            return False
        last[repository] = position
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--batch-max", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="notify-bench-")
    redis_proc, port = start_redis(tmp)
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    url = f"redis://127.0.0.1:{port}/0"
    endpoint = {"name": "bench", "url": f"http://127.0.0.1:{receiver.server_port}/hook",
                "secrets": ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"], "batch_max": args.batch_max}
    notifications = {"endpoints": [endpoint], "allowed_networks": ["127.0.0.0/8"], "shards": args.shards,
                     "spool_dir": os.path.join(tmp, "spool"), "pulls": False}
    base = {"regmw": {"plugins": ["redis"], "entry_points": False}, "redis": {"url": url},
            "readonly": {"fail_closed_writes": False}}
    worker = None
    try:
        # 1. enqueue cost through the middleware, side by side
        plain = RegistryMiddleware(registry_app, base, environ={})
        notifying = RegistryMiddleware(
            registry_app, {**base, "regmw": {"plugins": ["redis", "notifications"], "entry_points": False},
                           "notifications": notifications}, environ={})
        sink = notifying.services.events
        emit_times: list[float] = []
        untimed_emit = sink.emit

        def timed_emit(event: dict) -> None:  # the event's share of each request, timed inside it
            started = time.perf_counter()
            untimed_emit(event)
            emit_times.append(time.perf_counter() - started)

        sink.emit = timed_emit
        time_requests(plain, 300), time_requests(notifying, 300)  # warm both
        emit_times.clear()
        without, with_events = [], []
        for _ in range(5):  # interleaved rounds: machine noise hits both sides alike
            without += time_requests(plain, args.requests // 5)
            with_events += time_requests(notifying, args.requests // 5)
        enqueue_p50 = (statistics.median(with_events) - statistics.median(without)) * 1e6
        enqueue_p99 = pct(emit_times, 0.99) * 1e6  # a difference of two p99s is noise on a shared machine
        emit_p50 = statistics.median(emit_times) * 1e6
        sink.streams.client.delete(*[sink.streams.stream(shard) for shard in range(args.shards)])

        # 2. throughput: queue N events, then let the real worker CLI deliver them
        counters: dict[str, int] = {}
        for index in range(args.events):
            repository = f"team/app{index % 200}"
            counters[repository] = counters.get(repository, 0) + 1
            sink.emit(plugin_event("push", repository, tag=str(counters[repository])))
        config = Path(tmp, "regmw.json")
        worker_config = {**base, "regmw": {"plugins": ["redis", "notifications"], "entry_points": False},
                         "notifications": notifications}
        config.write_text(_toml(worker_config))
        started = time.perf_counter()
        worker = subprocess.Popen([str(Path(sys.executable).with_name("regmw")), "-c", str(config), "notifications", "worker"],
                                  stderr=open(Path(tmp, "worker.log"), "w"))
        deadline = time.monotonic() + 300
        while receiver.count() < args.events and time.monotonic() < deadline:
            if worker.poll() is not None:
                raise SystemExit("worker exited: " + Path(tmp, "worker.log").read_text()[-2000:])
            time.sleep(0.01)
        startup = time.perf_counter() - started
        with receiver.lock:  # from the first delivery to the last: the worker's start-up is left out
            elapsed = receiver.arrivals[-1][0] - receiver.arrivals[0][0]
        delivered_per_s = args.events / elapsed
        ordered = in_order(receiver.arrivals)

        # 3. end to end at half that rate
        with receiver.lock:
            receiver.arrivals.clear()
        rate = delivered_per_s / 2
        emitted: dict[str, float] = {}
        count = int(min(rate * 4, 10000))
        begin = time.time()
        for index in range(count):
            target = begin + index / rate
            while time.time() < target:
                time.sleep(0.0005)
            event = plugin_event("push", f"team/app{index % 200}", tag=str(index))
            emitted[event["id"]] = time.time()
            sink.emit(event)
        deadline = time.monotonic() + 60
        while receiver.count() < count and time.monotonic() < deadline:
            time.sleep(0.01)
        latencies = [arrived - emitted[event["id"]] for arrived, event in receiver.arrivals if event["id"] in emitted]
        e2e_p50, e2e_p99 = statistics.median(latencies) * 1000, pct(latencies, 0.99) * 1000
        if os.environ.get("NOTIFY_BENCH_DEBUG"):
            buckets: dict[int, list[float]] = {}
            for arrived, event in receiver.arrivals:
                if event["id"] in emitted:
                    buckets.setdefault(int((emitted[event["id"]] - begin) * 4), []).append(arrived - emitted[event["id"]])
            for bucket, values in sorted(buckets.items()):
                print(f"  t={bucket / 4:.2f}s n={len(values)} p50={statistics.median(values) * 1000:.1f}ms "
                      f"max={max(values) * 1000:.1f}ms", file=sys.stderr)

        if os.environ.get("NOTIFY_BENCH_DEBUG"):
            print(Path(tmp, "worker.log").read_text()[-3000:], file=sys.stderr)

        # 4. Redis down: requests spool their events to disk
        worker.terminate()
        worker.wait(10)
        worker = None
        redis_proc.terminate()
        redis_proc.wait(10)
        emit_times.clear()
        down = time_requests(notifying, 1000)
        spool_times = list(emit_times)
        sink.close()
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(10)
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"PUT manifest through the middleware: p50 {statistics.median(without) * 1e6:.0f} us without events, "
          f"{statistics.median(with_events) * 1e6:.0f} us with (p99 {pct(without, .99) * 1e6:.0f} / "
          f"{pct(with_events, .99) * 1e6:.0f} us)")
    print(f"enqueue adds: p50 {enqueue_p50:.0f} us (difference of the medians); the emit call inside the "
          f"request: p50 {emit_p50:.0f} us, p99 {enqueue_p99:.0f} us")
    print(f"delivered: {args.events} events over 200 repositories in {elapsed:.2f}s = {delivered_per_s:.0f}/s "
          f"({args.shards} shards, batch_max {args.batch_max}; {startup:.2f}s with the worker's start-up); "
          f"per-repository order kept: {ordered}")
    print(f"end to end at {rate:.0f} events/s: p50 {e2e_p50:.1f} ms, p99 {e2e_p99:.1f} ms ({len(latencies)} events)")
    print(f"Redis down: PUT p50 {statistics.median(down) * 1e3:.2f} ms, p99 {pct(down, .99) * 1e3:.2f} ms, "
          f"max {max(down) * 1e3:.1f} ms; the event's spool append p50 {statistics.median(spool_times) * 1e3:.2f} ms, "
          f"p99 {pct(spool_times, .99) * 1e3:.2f} ms")
    if args.json:
        print(json.dumps({"enqueue_us_p50": round(enqueue_p50, 1), "enqueue_us_p99": round(enqueue_p99, 1),
                          "delivered_per_s": round(delivered_per_s), "end_to_end_ms_p50": round(e2e_p50, 2),
                          "end_to_end_ms_p99": round(e2e_p99, 2)}))


def _toml(config: dict) -> str:
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}" if not isinstance(value, list) or not value
                         or not isinstance(value[0], dict) else f"{key} = [{', '.join(_inline(v) for v in value)}]")
    return "\n".join(lines) + "\n"


def _inline(table: dict) -> str:
    return "{" + ", ".join(f"{key} = {json.dumps(value)}" for key, value in table.items()) + "}"


if __name__ == "__main__":
    main()
