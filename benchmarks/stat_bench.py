"""Naive Stat vs the one-request prefix check, against the GCS emulator, side by side in one run.

For repositories of 0, 100, 1,000 and 10,000 objects (laid out like a registry:
``_layers/``, ``_manifests/revisions/``, ``_manifests/tags/``), it measures

* the **naive Stat** the Go registry used to answer "does this repository
  exist?": an object GET with full metadata, then an undelimited,
  full-metadata list of everything under ``repositories/<name>/``;
* the **prefix check** of the ``gcs`` plugin: ONE ``objects.list`` with
  ``delimiter=/``, ``maxResults=1`` and a names/prefixes-only partial response;

counting the real HTTP requests the google-cloud-storage client sends and the
bytes it receives, and the median latency. It then runs the classification
plugin through the middleware with a warm cache and reports storage requests
per classification (target 0).

The emulator (PyPI ``gcp-storage-emulator``) runs in-process and stands in for
real GCS: it honours ``prefix`` and ``delimiter`` but ignores ``maxResults``,
``fields`` and pagination, so the naive list here returns all objects in one
page where GCS would page at 1,000, and latencies are local-loopback ones.
Objects are put into the emulator's in-memory store directly (uploading
10,000 objects over HTTP would take minutes); every measured request goes over
HTTP.

    python benchmarks/stat_bench.py [--iterations 31] [--json]

With ``--json`` the last line is
``{"sizes": [...], "naive": {"<size>": {"requests": n, "bytes": n, "median_ms": x}}, "prefix": {...},
"speedup_at_10000": x, "warm_cache_requests_per_classification": n}``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import socket
import statistics
import sys
import time
from typing import Any, Callable

from gcp_storage_emulator.handlers.objects import _checksums, _make_object_resource
from gcp_storage_emulator.server import create_server
from regmw_gcs import GCSStorage, naive_stat
from regmw_gcs.client import make_client
from werkzeug.test import Client

from regmw import RegistryMiddleware

SIZES = (0, 100, 1000, 10000)
BUCKET = "registry"
OLD_ROOT = "docker/registry/v2"
NEW_ROOT = "gitlab/docker/registry/v2"


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def measure(counter: Counter, check: Callable[[], Any], iterations: int) -> dict[str, Any]:
    check()  # warm: connection opened
    times, requests, received = [], counter.requests, counter.bytes
    for _ in range(iterations):
        start = time.perf_counter()
        check()
        times.append((time.perf_counter() - start) * 1000)
    return {
        "requests": _number((counter.requests - requests) / iterations),
        "bytes": round((counter.bytes - received) / iterations),
        "median_ms": round(statistics.median(times), 3),
    }


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=31, help="measured checks per size and method")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line at the end")
    args = parser.parse_args(argv)

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

        storage = GCSStorage(
            make_client({"endpoint": endpoint, "anonymous": True, "project": "bench"}), BUCKET, timeout=60.0
        )
        counter = Counter(storage.client)
        naive, prefix, compound = {}, {}, {}
        for size, name in repositories.items():
            path = f"{OLD_ROOT}/repositories/{name}"
            exists = size > 0
            assert (naive_stat(storage, path) is not None) == exists
            assert storage.prefix_exists(path + "/") == exists
            naive[str(size)] = measure(counter, lambda path=path: naive_stat(storage, path), args.iterations)
            prefix[str(size)] = measure(counter, lambda path=path: storage.prefix_exists(path + "/"), args.iterations)
            compound[str(size)] = measure(counter, lambda path=path: storage.stat(path), args.iterations)
        warm = warm_classification(endpoint, [name for size, name in repositories.items() if size], 20)
    finally:
        server.stop()

    speedup = naive["10000"]["median_ms"] / prefix["10000"]["median_ms"]
    print(f"GCS emulator (in-process, loopback), {args.iterations} checks per cell; "
          f"{sum(SIZES)} objects filled in {fill_seconds:.1f}s")
    print(f"{'objects':>8} | {'naive Stat':^32} | {'prefix check':^32} | {'compound Stat':^22} | ratio")
    print(f"{'':>8} | {'req':>5} {'bytes':>12} {'median ms':>12} | {'req':>5} {'bytes':>12} {'median ms':>12} "
          f"| {'req':>5} {'median ms':>14} | latency, bytes")
    for size in SIZES:
        n, p, c = naive[str(size)], prefix[str(size)], compound[str(size)]
        print(f"{size:>8} | {n['requests']:>5} {n['bytes']:>12,} {n['median_ms']:>12.2f} | "
              f"{p['requests']:>5} {p['bytes']:>12,} {p['median_ms']:>12.2f} | "
              f"{c['requests']:>5} {c['median_ms']:>14.2f} | "
              f"{n['median_ms'] / p['median_ms']:.1f}x, {n['bytes'] / max(1, p['bytes']):.0f}x")
    print(f"speedup at 10,000 objects: {speedup:.1f}x; warm-cache storage requests per classification: {warm}")
    if args.json:
        print(json.dumps({
            "sizes": list(SIZES),
            "naive": naive,
            "prefix": prefix,
            "speedup_at_10000": round(speedup, 1),
            "warm_cache_requests_per_classification": warm,
        }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
