"""Repository migration: throughput, bytes through regmw, and how long writes are refused, by size.

Side by side in one run, the same repositories (half small, half large) are
migrated old → new by the real migration job on two storages:

1. **GCS** (the in-process ``gcp-storage-emulator``, reached by the official
   client): every HTTP request of the storage's client is counted, and
   ``gcs_bytes_downloaded`` is the content bytes of object downloads
   (``alt=media``) — the job copies with ``objects.rewrite``, so it must be 0;
   listing metadata bytes are reported apart;
2. **filesystem** (the embedded storage, copies through a temporary file).

Each job runs from the embedded SQLite queue in this process (one runner:
throughput is per worker thread; N workers scale it until storage saturates).
The **write-refusal window** of a repository is the time its read-only lock
was held (lock → unlock, from the job's state); it is reported for small and
large repositories separately with their ratio next to the ratio of their
sizes: the window is proportional to what is copied, plus a fixed cost.
``[migration_job] drain`` is set to 0 here (production adds it to every window).

Usage: ``python benchmarks/migrate_bench.py [--repositories N] [--small KB] [--large KB] [--json]``
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import tempfile
import threading
import time
from typing import Any
from _common import free_port

from regmw import build

OLD, NEW = "old/docker/registry/v2", "new/docker/registry/v2"
JOB = "migrate-repository"


def layout_objects(name: str, layer_size: int) -> dict[str, bytes]:
    """One repository in distribution's layout: a layer, a config, a manifest, their links and a tag."""
    layer = os.urandom(layer_size)
    config = b'{"architecture":"amd64","os":"linux","repository":"' + name.encode() + b'"}'
    manifest = b'{"schemaVersion":2,"layers":["' + hashlib.sha256(layer).hexdigest().encode() + b'"]}'
    objects: dict[str, bytes] = {}
    for data, kind in ((layer, "_layers"), (config, "_layers"), (manifest, "_manifests/revisions")):
        hex_ = hashlib.sha256(data).hexdigest()
        objects[f"{OLD}/blobs/sha256/{hex_[:2]}/{hex_}/data"] = data
        objects[f"{OLD}/repositories/{name}/{kind}/sha256/{hex_}/link"] = f"sha256:{hex_}".encode()
    hex_ = hashlib.sha256(manifest).hexdigest()
    objects[f"{OLD}/repositories/{name}/_manifests/tags/v1/current/link"] = f"sha256:{hex_}".encode()
    objects[f"{OLD}/repositories/{name}/_manifests/tags/v1/index/sha256/{hex_}/link"] = f"sha256:{hex_}".encode()
    return objects


def plan(repositories: int, small: int, large: int) -> dict[str, int]:
    return {f"bench/{'small' if i % 2 else 'large'}{i}": (small if i % 2 else large) for i in range(repositories)}


class Counter:
    """Every HTTP request of a google-cloud-storage client: downloads (alt=media) and other response bytes."""

    def __init__(self, client: Any) -> None:
        self.requests = 0
        self.downloaded = 0
        self.metadata = 0
        self.rewrites = 0
        original = client._http.request

        def request(method, url, *args, **kwargs):
            response = original(method, url, *args, **kwargs)
            self.requests += 1
            if "alt=media" in url or "/download/" in url:
                self.downloaded += len(response.content)
            else:
                self.metadata += len(response.content)
            self.rewrites += "/rewriteTo/" in url
            return response

        client._http.request = request


def run(runtime: Any, names: list[str]) -> tuple[float, dict[str, float]]:
    jobs = runtime.services.jobs
    for name in names:
        jobs.enqueue(JOB, repository=name)
    stop = threading.Event()
    started = time.perf_counter()
    while jobs.run_one(stop):
        pass
    elapsed = time.perf_counter() - started
    failed = [r for r in jobs.status(JOB) if r.state != "done"]
    if failed:
        raise SystemExit(f"migration jobs not done: {failed[:3]}")
    windows = {name: jobs.get_state(f"migration:{name}")["locked_ms"] for name in names}
    return elapsed, windows


def summarise(label: str, sizes: dict[str, int], elapsed: float, windows: dict[str, float]) -> dict[str, float]:
    small = [windows[n] for n, s in sizes.items() if s == min(sizes.values())]
    large = [windows[n] for n, s in sizes.items() if s == max(sizes.values())]
    out = {
        "repositories_per_min": len(sizes) / elapsed * 60,
        "window_ms_p50": statistics.median(windows.values()),
        "window_small_ms_p50": statistics.median(small),
        "window_large_ms_p50": statistics.median(large),
    }
    out["window_ratio_large_small"] = out["window_large_ms_p50"] / out["window_small_ms_p50"]
    print(f"{label:10} {out['repositories_per_min']:8.0f} repositories/min  write-refusal window p50 "
          f"{out['window_ms_p50']:.1f} ms (small {out['window_small_ms_p50']:.1f} ms, large "
          f"{out['window_large_ms_p50']:.1f} ms, ratio {out['window_ratio_large_small']:.1f})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repositories", type=int, default=40)
    parser.add_argument("--small", type=int, default=64, help="layer KB of the small repositories")
    parser.add_argument("--large", type=int, default=4096, help="layer KB of the large repositories")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = {name: kb * 1024 for name, kb in plan(args.repositories, args.small, args.large).items()}
    tmp = tempfile.mkdtemp(prefix="regmw-migrate-bench-")
    print(f"{args.repositories} repositories, half with a {args.small} KB layer, half {args.large} KB "
          f"(size ratio {args.large / args.small:.0f})")

    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="bench")
    server.start()
    try:
        gcs = build({
            "regmw": {"plugins": ["gcs", "migration"], "entry_points": False},
            "gcs": {"bucket": "bench", "endpoint": f"http://127.0.0.1:{port}", "anonymous": True,
                    "project": "bench", "timeout": 30.0},
            "migration": {"old_root": OLD, "new_root": NEW},
            "migration_job": {"drain": 0},
            "jobs": {"queue_path": os.path.join(tmp, "gcs-jobs.sqlite3")},
        }, environ={})
        bucket = gcs.services.storage.client.bucket("bench")
        for name, size in sizes.items():
            for key, data in layout_objects(name, size).items():
                bucket.blob(key).upload_from_string(data)
        counter = Counter(gcs.services.storage.client)
        gcs_elapsed, gcs_windows = run(gcs, list(sizes))
    finally:
        server.stop()
    print(f"GCS: {counter.requests} requests ({counter.rewrites} rewrites), {counter.downloaded} content bytes "
          f"downloaded, {counter.metadata} bytes of JSON metadata")
    gcs_figures = summarise("gcs", sizes, gcs_elapsed, gcs_windows)

    root = os.path.join(tmp, "fs")
    for name, size in sizes.items():
        for key, data in layout_objects(name, size).items():
            path = os.path.join(root, key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(data)
    fs = build({
        "regmw": {"plugins": ["migration"], "entry_points": False}, "storage": {"root": root},
        "migration": {"old_root": OLD, "new_root": NEW}, "migration_job": {"drain": 0},
        "jobs": {"queue_path": os.path.join(tmp, "fs-jobs.sqlite3")},
    }, environ={})
    fs_elapsed, fs_windows = run(fs, list(sizes))
    fs_figures = summarise("filesystem", sizes, fs_elapsed, fs_windows)
    print(f"filesystem / gcs-emulator throughput: {fs_figures['repositories_per_min'] / gcs_figures['repositories_per_min']:.1f}x")
    if args.json:
        print(json.dumps({
            "repositories_per_min": round(gcs_figures["repositories_per_min"], 1),
            "gcs_bytes_downloaded": counter.downloaded,
            "write_refusal_window_ms_p50": round(gcs_figures["window_ms_p50"], 1),
            "gcs": gcs_figures, "filesystem": fs_figures, "size_ratio": args.large / args.small,
            "gcs_requests": counter.requests, "gcs_metadata_bytes": counter.metadata,
        }))


if __name__ == "__main__":
    main()
