"""Memory of a real `regmw serve` worker stays flat however many distinct keys go through it.

The in-process tests bound the limiter's and the cache's own books; this one
bounds everything a worker keeps per repository or client (counters, the
classification cache, metrics, the access log's path, anything added later):
gunicorn with the embedded chain (classification on the filesystem, a
per-client and a per-repository rule, the read-only check), fed distinct
repositories that exist in storage (so each one is classified and cached)
from distinct clients behind the trusted proxy.
"""
from __future__ import annotations

import http.client
import subprocess
import sys
import threading

from .servers._util import free_port, rss, stop, wait_for_port, wait_until, workers_of

LIMITER_CAP = 16 * 1024
CACHE_ENTRIES = 200
# What a worker may grow by once its caps are full: allocator arenas, pools, per-thread state.
SLACK = 4 * 1024 * 1024
THREADS = 4


def repository(index: int) -> str:
    return f"org{index % 97}/repo-{index}"


def drive(port: int, start: int, count: int) -> None:
    """``count`` GETs of distinct repositories from distinct clients, on ``THREADS`` keep-alive connections."""
    failures: list[str] = []

    def worker(offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            for index in range(start + offset, start + count, THREADS):
                client = f"10.{index // 65536 % 256}.{index // 256 % 256}.{index % 256}"
                conn.request("GET", f"/v2/{repository(index)}/manifests/latest",
                             headers={"X-Forwarded-For": client})
                response = conn.getresponse()
                response.read()
                # counted by the rules, and classified as where storage holds it (so it was looked up and cached)
                where = "new" if index % 10 == 0 else "old"
                if (response.status != 200 or response.getheader("RateLimit-Limit") is None
                        or response.getheader("Regmw-Migration-Path") != where):
                    failures.append(f"{index}: {response.status} {response.getheaders()}")
                    return
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(offset,)) for offset in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures


def test_a_serve_worker_stays_under_its_caps_with_ever_new_repositories_and_clients(tmp_path):
    warm, more = 6_000, 18_000
    storage = tmp_path / "storage"
    for index in range(warm + more):
        directory = storage / ("new" if index % 10 == 0 else "old") / "repositories" / repository(index)
        directory.mkdir(parents=True)
        (directory / "_manifests").touch()
    config = tmp_path / "regmw.toml"
    config.write_text(f"""
[regmw]
plugins = ["migration"]
entry_points = false
trusted_proxies = ["127.0.0.1/32"]

[storage]
root = "{storage}"

[migration]
old_root = "old"
new_root = "new"

[cache]
max_entries = {CACHE_ENTRIES}

[ratelimit]
max_bytes = {LIMITER_CAP}
rules = [{{by = "client", limit = "1000000/hour"}}, {{by = "repository", limit = "1000000/hour"}}]

[serve]
workers = 1
threads = {THREADS}
""")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "regmw.cli", "-c", str(config), "serve", "--port", str(port),
         "--app", "tests.servers.plain_app:app"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc=proc, timeout=30)
        [worker] = wait_until(lambda: workers_of(proc), what="a gunicorn worker")
        drive(port, 0, warm)  # fills both caps many times over, and warms pools, threads and arenas
        settled = rss(worker)
        drive(port, warm, more)
        grown = rss(worker) - settled
        assert workers_of(proc) == {worker}  # the same worker throughout (not restarted)
        # Unbounded, the same run grows by about 1 KiB per request (two counters, a cache entry): ~18 MiB.
        assert grown <= LIMITER_CAP + SLACK, f"the worker grew by {grown / 2**20:.1f} MiB over {more} new keys"
    finally:
        stop(proc)
