"""Naive Stat vs the one-request own-entries check, against the GCS emulator paging like GCS, side by side.

For repositories of 0, 100, 1,000 and 10,000 objects (laid out like a registry:
``_layers/``, ``_manifests/revisions/``, ``_manifests/tags/``), it measures

* the **naive Stat** the Go registry used to answer "does this repository
  exist?": an object GET with full metadata, then an undelimited,
  full-metadata list of everything under ``repositories/<name>/`` (its first
  page, as Go's ``it.Next()`` read it);
* the **own-entries check** the ``migration`` plugin asks the ``gcs`` plugin:
  ONE ``objects.list`` of ``repositories/<name>/_`` with ``delimiter=/``,
  ``maxResults=1`` and a names/prefixes-only partial response;
* the gcs plugin's own **compound Stat** (``GCSStorage.stat``): a metadata GET,
  then the same one-item list of ``<name>/``;

interleaved check by check, counting the real HTTP requests the
google-cloud-storage client sends and the bytes it receives, and the median
latency. It does so twice, both times through a TCP proxy on loopback
(:class:`DelayProxy`): once forwarding at once (rtt 0), once adding a 20 ms
round trip to every request (``--rtt-ms``), where "2 requests against 1" shows
its real cost. Only the delay differs between the two runs. It then runs
the classification plugin through the middleware with a warm cache and reports
storage requests per classification (target 0).

The emulator (PyPI ``gcp-storage-emulator``) runs in-process and stands in for
real GCS. It ignores ``maxResults``, ``pageToken`` and ``fields`` and never
paginates, which would hand the naive side one 11.7 MB page at 10,000 objects
where GCS sends 1,000 objects. So the benchmark replaces the emulator's list
handler with one that pages as GCS does (:func:`paged_ls`: at most
``maxResults`` entries, default and ceiling 1,000, items and prefixes counted
together in name order, a ``nextPageToken`` when more remain, ``fields``
applied to the one shape the check asks for). Objects are put into the
emulator's in-memory store directly (uploading 10,000 objects over HTTP would
take minutes); every measured request goes over HTTP.

    python benchmarks/stat_bench.py [--iterations 31] [--rtt-ms 20] [--json]

With ``--json`` the last line is
``{"sizes": [...], "naive": {"<size>": {"requests": n, "bytes": n, "median_ms": x}}, "prefix": {...},
"speedup_at_10000": x, "warm_cache_requests_per_classification": n, "paged_like_gcs": true,
"rtt_ms": {"0": {"naive": {...}, "prefix": {...}, "compound": {...}, "speedup": {"<size>": x},
"speedup_at_10000": x}, "20": {...}}}``
(the top-level ``naive``, ``prefix`` and ``speedup_at_10000`` are the rtt 0 run).
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from http import HTTPStatus
from typing import Any, Callable

import gcp_storage_emulator.server as emulator_server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects as emulator_objects
from gcp_storage_emulator.handlers.objects import _checksums, _make_object_resource
from gcp_storage_emulator.server import create_server
from regmw_gcs import GCSStorage, naive_stat
from regmw_gcs.client import make_client
from regmw_migration.classifier import own_entries
from werkzeug.test import Client

from regmw import RegistryMiddleware
from _common import free_port

SIZES = (0, 100, 1000, 10000)
BUCKET = "registry"
OLD_ROOT = "docker/registry/v2"
NEW_ROOT = "gitlab/docker/registry/v2"
GCS_PAGE = 1000  # objects.list: default and largest maxResults


class Counter:
    """Counts the HTTP requests a google-cloud-storage client sends and the bytes it receives."""

    def __init__(self, client: Any) -> None:
        self.requests = 0
        self.bytes = 0
        http = client._http
        original = http.request

        def request(method, url, *args, **kwargs):
            response = original(method, url, *args, **kwargs)
            self.requests += 1
            self.bytes += len(response.content)
            return response

        http.request = request


def object_names(repository: str, count: int) -> list[str]:
    """``count`` object names under a repository, in the distribution registry's layout."""
    base = f"{OLD_ROOT}/repositories/{repository}"
    names = []
    for index in range(count):
        digest = hashlib.sha256(f"{repository}/{index}".encode()).hexdigest()
        kind = index % 10
        if kind < 7:
            names.append(f"{base}/_layers/sha256/{digest}/link")
        elif kind < 9:
            names.append(f"{base}/_manifests/revisions/sha256/{digest}/link")
        else:
            names.append(f"{base}/_manifests/tags/v{index}/current/link")
    return names


def fill(server: Any, endpoint: str, names: list[str]) -> None:
    """Put objects straight into the emulator's in-memory store, with the metadata an upload would get.

    The emulator's own create path rewrites its whole metadata file on every
    object (quadratic); this writes each object once and the file once.
    """
    storage = server._storage
    objects = storage.objects.setdefault(BUCKET, {})
    content = b"sha256:" + b"0" * 64
    for name in names:
        resource = _make_object_resource(endpoint, BUCKET, name, "application/octet-stream", len(content))
        objects[name] = _checksums(content, resource)
        storage._store.write_bytes(storage._object_path(BUCKET, name), content)
    storage._write_config_to_file()


def paged_ls(request: Any, response: Any, storage: Any, *args: Any, **kwargs: Any) -> None:
    """The emulator's ``objects.list``, paged as GCS pages it.

    At most ``maxResults`` entries per page (default and ceiling 1,000), items
    and prefixes counted together in name order, and a ``nextPageToken`` (here
    the last name returned) while more remain; ``pageToken`` resumes after it.
    ``fields`` is applied for the shape the prefix check asks
    (``items(name),prefixes,nextPageToken``): top-level members not named are
    dropped, and items keep only their name.
    """
    def param(name: str) -> str | None:
        values = request.query.get(name)
        return values[0] if values else None

    try:
        files, prefixes = storage.get_file_list(request.params["bucket_name"], param("prefix"), param("delimiter"))
    except NotFound:
        response.status = HTTPStatus.NOT_FOUND
        return
    entries = sorted([(item["name"], item) for item in files] + [(prefix, None) for prefix in prefixes],
                     key=lambda entry: entry[0])
    if param("pageToken"):
        entries = [entry for entry in entries if entry[0] > param("pageToken")]
    size = min(int(param("maxResults") or GCS_PAGE), GCS_PAGE)
    page, rest = entries[:size], entries[size:]
    body: dict[str, Any] = {"kind": "storage#objects"}
    items = [item for _, item in page if item is not None]
    fields = param("fields")
    if fields and "items(name)" in fields:
        items = [{"name": item["name"]} for item in items]
    if items:
        body["items"] = items
    if any(item is None for _, item in page):
        body["prefixes"] = [name for name, item in page if item is None]
    if rest:
        body["nextPageToken"] = page[-1][0]
    if fields:
        named = {part.split("(")[0] for part in fields.split(",")}
        body = {key: value for key, value in body.items() if key in named}
    response.json(body)


def page_like_gcs() -> None:
    """Route the emulator's ``objects.list`` to :func:`paged_ls` (its other handlers stay)."""
    for _, handlers in emulator_server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is emulator_objects.ls:
                handlers[method] = paged_ls


class DelayProxy:
    """A TCP proxy on loopback that adds ``rtt_ms`` to every request's round trip.

    Bytes from the client reach the server ``rtt_ms`` after they arrive (a
    whole round trip, paid once per request; answers flow back undelayed, so
    it adds latency, not a bandwidth limit). It runs as a child process (an
    asyncio loop: :func:`serve_delayed`), so that it shares no GIL with the
    client and the emulator; ``stop()`` ends it by its PID.
    """

    def __init__(self, target_port: int, rtt_ms: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--serve-delayed", str(target_port), str(rtt_ms)],
            stdout=subprocess.PIPE, text=True,
        )
        self.port = int(self.process.stdout.readline())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.process.stdout.close()


async def serve_delayed(target_port: int, rtt_ms: float) -> None:
    """The proxy's loop: print the port it listens on, then forward (delayed) until killed."""
    delay = rtt_ms / 1000

    running: set[asyncio.Task] = set()  # asyncio keeps only weak references to tasks

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        running.add(task)
        task.add_done_callback(running.discard)
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target_port)
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def receive() -> None:
            while data := await reader.read(65536):
                queue.put_nowait((loop.time() + delay, data))
            queue.put_nowait((loop.time() + delay, b""))

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                if not data:
                    upstream_writer.write_eof()
                    return
                upstream_writer.write(data)
                await upstream_writer.drain()

        async def answer() -> None:
            while data := await upstream_reader.read(65536):
                writer.write(data)
                await writer.drain()

        forwarding = [asyncio.ensure_future(receive()), asyncio.ensure_future(deliver())]
        running.update(forwarding)
        for forwarder in forwarding:
            forwarder.add_done_callback(running.discard)
        try:
            await answer()  # the emulator speaks HTTP/1.0: it closes once it has answered
        except ConnectionError:
            pass
        finally:
            for task in forwarding:
                task.cancel()
            upstream_writer.close()
            writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


def measure_pair(checks: dict[str, tuple[Counter, Callable[[], Any]]], iterations: int) -> dict[str, dict]:
    """Each side's requests, bytes and median ms per check; the sides alternate check by check."""
    for _, check in checks.values():
        check()  # warm
    times: dict[str, list[float]] = {side: [] for side in checks}
    before = {side: (counter.requests, counter.bytes) for side, (counter, _) in checks.items()}
    for _ in range(iterations):
        for side, (_, check) in checks.items():
            start = time.perf_counter()
            check()
            times[side].append((time.perf_counter() - start) * 1000)
    return {
        side: {
            "requests": _number((counter.requests - before[side][0]) / iterations),
            "bytes": round((counter.bytes - before[side][1]) / iterations),
            "median_ms": round(statistics.median(times[side]), 3),
        }
        for side, (counter, _) in checks.items()
    }


def run(port: int, repositories: dict[int, str], iterations: int) -> dict[str, Any]:
    """Both checks on every repository against the GCS API at ``port``; the figures and the speedups."""
    def storage() -> tuple[GCSStorage, Counter]:
        made = GCSStorage(make_client({"endpoint": f"http://127.0.0.1:{port}", "anonymous": True,
                                       "project": "bench"}), BUCKET, timeout=60.0)
        return made, Counter(made.client)

    (naive_storage, naive_counter), (prefix_storage, prefix_counter) = storage(), storage()
    compound_storage, compound_counter = storage()
    naive, prefix, compound = {}, {}, {}
    for size, name in repositories.items():
        path, entries = f"{OLD_ROOT}/repositories/{name}", own_entries(OLD_ROOT, name)
        exists = size > 0
        assert naive_stat(naive_storage, path) == exists
        assert prefix_storage.prefix_exists(entries) == exists
        figures = measure_pair({
            "naive": (naive_counter, lambda path=path: naive_stat(naive_storage, path)),
            "prefix": (prefix_counter, lambda entries=entries: prefix_storage.prefix_exists(entries)),
            "compound": (compound_counter, lambda path=path: compound_storage.stat(path)),
        }, iterations)
        naive[str(size)], prefix[str(size)], compound[str(size)] = (
            figures["naive"], figures["prefix"], figures["compound"])
    speedup = {size: round(naive[size]["median_ms"] / prefix[size]["median_ms"], 1) for size in naive}
    return {"naive": naive, "prefix": prefix, "compound": compound, "speedup": speedup,
            "speedup_at_10000": speedup["10000"]}


def _number(value: float) -> float | int:
    """An int when whole (1, not 1.0), else two decimals."""
    return int(value) if float(value).is_integer() else round(value, 2)


def warm_classification(endpoint: str, repositories: list[str], rounds: int) -> float | int:
    """Storage requests per classification once the cache is warm (through the real middleware)."""
    def app(environ, start_response):
        start_response("200 OK", [])
        return [b""]

    config = {
        "regmw": {"plugins": ["gcs", "migration"], "entry_points": False},
        "gcs": {"bucket": BUCKET, "endpoint": endpoint, "anonymous": True, "retry_deadline": 0},
        "migration": {"old_root": OLD_ROOT, "new_root": NEW_ROOT},
    }
    middleware = RegistryMiddleware(app, config, environ={})
    counter = Counter(middleware.services.storage.client)
    client = Client(middleware)
    for name in repositories:  # cold: fills the cache
        client.get(f"/v2/{name}/manifests/latest")
    before = counter.requests
    for _ in range(rounds):
        for name in repositories:
            response = client.get(f"/v2/{name}/manifests/latest")
            assert response.headers["Regmw-Migration-Path"] == "old", response.headers
    return _number((counter.requests - before) / (rounds * len(repositories)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-delayed"]:  # the child process of DelayProxy
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # stop() ends it: no clean-up to do
        asyncio.run(serve_delayed(int(argv[1]), float(argv[2])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=31, help="measured checks per size and method")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="round trip added by the delaying proxy")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line at the end")
    args = parser.parse_args(argv)

    page_like_gcs()
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    try:
        started = time.perf_counter()
        repositories = {size: f"bench/repo-{size}" for size in SIZES}
        for size, name in repositories.items():
            fill(server, endpoint, object_names(name, size))
        fill_seconds = time.perf_counter() - started

        results = {}
        for rtt_ms in (0.0, args.rtt_ms):  # the same path both times (client → proxy → emulator); only the delay differs
            proxy = DelayProxy(port, rtt_ms)
            try:
                results[f"{rtt_ms:g}"] = run(proxy.port, repositories, args.iterations)
            finally:
                proxy.stop()
        warm = warm_classification(endpoint, [name for size, name in repositories.items() if size], 20)
    finally:
        server.stop()

    print(f"GCS emulator (in-process, loopback), paged like GCS ({GCS_PAGE} per page); "
          f"{args.iterations} checks per cell, the two sides alternating; {sum(SIZES)} objects filled in "
          f"{fill_seconds:.1f}s")
    for rtt, figures in results.items():
        print(f"\nround trip added: {rtt} ms")
        print(f"{'objects':>8} | {'naive Stat':^32} | {'own-entries check':^32} | {'compound Stat':^22} | ratio")
        print(f"{'':>8} | {'req':>5} {'bytes':>12} {'median ms':>12} | {'req':>5} {'bytes':>12} {'median ms':>12} "
              f"| {'req':>5} {'median ms':>14} | latency, bytes")
        for size in SIZES:
            n, p, c = (figures[side][str(size)] for side in ("naive", "prefix", "compound"))
            print(f"{size:>8} | {n['requests']:>5} {n['bytes']:>12,} {n['median_ms']:>12.2f} | "
                  f"{p['requests']:>5} {p['bytes']:>12,} {p['median_ms']:>12.2f} | "
                  f"{c['requests']:>5} {c['median_ms']:>14.2f} | "
                  f"{figures['speedup'][str(size)]:.1f}x, {n['bytes'] / max(1, p['bytes']):.0f}x")
        print(f"speedup at 10,000 objects: {figures['speedup_at_10000']:.1f}x")
    print(f"\nwarm-cache storage requests per classification: {warm}")
    if args.json:
        print(json.dumps({
            "sizes": list(SIZES),
            "naive": results["0"]["naive"],
            "prefix": results["0"]["prefix"],
            "speedup_at_10000": results["0"]["speedup_at_10000"],
            "warm_cache_requests_per_classification": warm,
            "paged_like_gcs": True,
            "rtt_ms": results,
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
