"""The gateway against the registry it fronts, side by side in one run.

Starts a throwaway Debian ``docker-registry`` (filesystem storage in a temp
dir) and ``regmw serve`` (gunicorn, ``[serve]`` defaults: 2 workers x 32
threads, JSON access log on, written to a file) as a gateway in front of it,
then measures each figure twice, ``direct`` against the registry and
``gateway`` through regmw, alternating:

* ``push_mib_s``: one blob of ``--size-mib`` (1 GiB) pushed as a registry
  client does: POST, one streamed chunked PATCH (1 MiB chunks), PUT
  ``?digest=``; with ``--pushes N``, the median of N pushes, the sides
  alternating, each to a repository of its own;
* ``push_cpu_s``: CPU seconds the serving processes used per push (direct:
  the registry; gateway: the gunicorn workers), the median too;
* ``pull_mib_s``: that blob pulled (GET, read in 1 MiB pieces); with
  ``--pulls N``, the median of N pulls, the sides alternating (one pull is
  one sample of a machine others share);
* ``pull_cpu_s``: CPU seconds the serving processes used per pull (direct:
  the registry; gateway: the gunicorn workers), the median too: what the
  gateway's hop costs, much less sensitive to other load than the rate;
* ``concurrent_pull_s``: 32 threads each pulling one 10 MiB blob, wall time;
* ``small_p50_ms``, ``small_p99_ms``, ``small_rps``: ``GET`` of a small
  manifest by ``wrk`` (C, so the load generator does not share a GIL with
  anyone; installed from Debian if missing): latency on one connection (the
  per-request cost, without queueing behind other requests), requests/s on
  8 connections with 2 threads;
* ``rss_growth_mb`` (gateway only): the serving processes' summed peak RSS
  during the run minus their RSS after start-up.

``transport`` compares the two proxy transports on the same upstream, from
one Python process (no regmw around them): the standard library's
``http.client`` with the gateway's own pool, and urllib3's pool, each
streaming the big blob and doing ``--small`` small GETs.

``--no-zero-copy`` runs the gateway with ``[gateway] zero_copy = false`` (every
response body copied through Python) to compare with the default splice path.

Usage: ``.venv/bin/python benchmarks/gateway_bench.py [--json] [--size-mib 1024] [--pushes 1] [--pulls 1] [--no-zero-copy]``
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit
from _common import children, cpu_seconds, free_port, wait_port

MIB = 1024 * 1024
ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
REPO = "bench/blob"

REGISTRY_CONFIG = """\
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
"""


def ensure_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        path = shutil.which("wrk")
    if path is None:
        sys.exit("wrk is needed: apt-get install -y wrk")
    return path


def connect(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)


def call(url: str, method: str, path: str, body=None, headers=None, chunked=False):
    conn = connect(url)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def blocks(size: int, block: bytes):
    for _ in range(size // len(block)):
        yield block


def push(url: str, repo: str, size: int, block: bytes, digest: str) -> float:
    """POST, one chunked PATCH streaming ``size`` bytes, PUT ?digest=; seconds taken."""
    start = time.perf_counter()
    status, headers, body = call(url, "POST", f"/v2/{repo}/blobs/uploads/")
    assert status == 202, (status, body)
    location = urlsplit(headers["Location"])
    status, headers, body = call(url, "PATCH", f"{location.path}?{location.query}", body=blocks(size, block),
                                 headers={"Content-Type": "application/octet-stream"}, chunked=True)
    assert status == 202, (status, body)
    location = urlsplit(headers["Location"])
    status, _, body = call(url, "PUT", f"{location.path}?{location.query}&digest={digest}",
                           headers={"Content-Length": "0"})
    assert status == 201, (status, body)
    return time.perf_counter() - start


def pull(url: str, repo: str, digest: str, size: int) -> float:
    start = time.perf_counter()
    conn = connect(url)
    try:
        conn.request("GET", f"/v2/{repo}/blobs/{digest}")
        response = conn.getresponse()
        assert response.status == 200, response.status
        received = 0
        while chunk := response.read(MIB):
            received += len(chunk)
        assert received == size, (received, size)
    finally:
        conn.close()
    return time.perf_counter() - start


def concurrent_pulls(url: str, repo: str, digest: str, size: int, count: int = 32) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(count) as pool:
        list(pool.map(lambda _: pull(url, repo, digest, size), range(count)))
    return time.perf_counter() - start


def put_manifest(url: str, repo: str, config_digest: str, config_size: int) -> None:
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": config_size},
        "layers": [],
    }).encode()
    status, _, body = call(url, "PUT", f"/v2/{repo}/manifests/latest", body=manifest,
                           headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert status == 201, (status, body)


def monolithic(url: str, repo: str, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    status, headers, _ = call(url, "POST", f"/v2/{repo}/blobs/uploads/")
    location = urlsplit(headers["Location"])
    status, _, body = call(url, "PUT", f"{location.path}?{location.query}&digest={digest}", body=data,
                           headers={"Content-Type": "application/octet-stream"})
    assert status == 201, (status, body)
    return digest


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def wrk(binary: str, url: str, seconds: int, connections: int) -> dict:
    out = subprocess.run([binary, f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds}s", "--latency",
                          "-H", f"Accept: {ACCEPT['Accept']}", url],
                         capture_output=True, text=True, check=True, timeout=seconds + 30).stdout

    def latency(percent: str) -> float:
        value, unit = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return round(float(value) * _UNITS[unit], 3)

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"wrk saw {errors.group(1)} error answers from {url}")
    return {"p50": latency("50"), "p99": latency("99"), "rps": round(rps, 1)}


# --- gateway process RSS ------------------------------------------------------------


def tree_rss_mb(pid: int) -> float:
    """Summed RSS of ``pid`` and its children (gunicorn master and workers)."""
    total = 0
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            pids += [int(p) for p in handle.read().split()]
    except OSError:
        pass
    for each in pids:
        try:
            with open(f"/proc/{each}/status") as handle:
                for line in handle:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class PeakRss(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0.0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            self.peak = max(self.peak, tree_rss_mb(self.pid))


# --- transports ---------------------------------------------------------------------------


def transport_figures(upstream: str, digest: str, size: int, small_path: str, small: int) -> dict:
    """http.client + the gateway's pool against urllib3's pool: one big streamed GET, ``small`` small GETs."""
    import urllib3

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from regmw.gateway import CHUNK, ConnectionPool

    parts = urlsplit(upstream)
    pool = ConnectionPool("http", parts.hostname, parts.port, 60.0)
    manager = urllib3.HTTPConnectionPool(parts.hostname, parts.port, maxsize=16, retries=False, timeout=60.0)

    def stdlib(path: str, chunk: int) -> int:
        conn, _ = pool.get()
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.putheader("Accept", ACCEPT["Accept"])
        conn.endheaders()
        response = conn.getresponse()
        received = 0
        while piece := response.read(chunk):
            received += len(piece)
        pool.put(conn)
        return received

    def with_urllib3(path: str, chunk: int) -> int:
        response = manager.urlopen("GET", path, headers=ACCEPT, preload_content=False, decode_content=False)
        received = 0
        for piece in response.stream(chunk, decode_content=False):
            received += len(piece)
        response.release_conn()
        return received

    figures = {}
    for name, get in (("http_client", stdlib), ("urllib3", with_urllib3)):
        get(small_path, 65536)  # warm the pool
        start = time.perf_counter()
        assert get(f"/v2/{REPO}/blobs/{digest}", CHUNK) == size  # the gateway's piece size
        mib_s = size / MIB / (time.perf_counter() - start)
        times = []
        for _ in range(small):
            begin = time.perf_counter()
            get(small_path, 65536)
            times.append((time.perf_counter() - begin) * 1000)
        times.sort()
        figures[name] = {"pull_mib_s": round(mib_s, 1), "small_p50_ms": round(statistics.median(times), 3),
                         "small_p99_ms": round(times[int(len(times) * 0.99) - 1], 3)}
    pool.close()
    manager.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line at the end")
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the push/pull blob (default 1 GiB)")
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per side")
    parser.add_argument("--small", type=int, default=2000, help="small GETs per transport")
    parser.add_argument("--pushes", type=int, default=1, help="pushes of the big blob per side (median reported)")
    parser.add_argument("--pulls", type=int, default=1, help="pulls of the big blob per side (median reported)")
    parser.add_argument("--zero-copy", action=argparse.BooleanOptionalAction, default=True,
                        help="[gateway] zero_copy of the gateway under test (default on)")
    args = parser.parse_args()
    wrk_binary = ensure_wrk()
    registry_binary = shutil.which("docker-registry") or sys.exit("apt-get install -y docker-registry")

    work = tempfile.mkdtemp(prefix="gateway-bench-")
    procs: list[subprocess.Popen] = []
    try:
        port = free_port()
        (root := os.path.join(work, "storage")) and os.mkdir(root)
        config = os.path.join(work, "registry.yml")
        with open(config, "w") as handle:
            handle.write(REGISTRY_CONFIG.format(root=root, port=port))
        registry = subprocess.Popen([registry_binary, "serve", config], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        procs.append(registry)
        wait_port(port, registry, 30.0)
        direct = f"http://127.0.0.1:{port}"

        gport = free_port()
        regmw_config = os.path.join(work, "regmw.toml")
        with open(regmw_config, "w") as handle:
            handle.write(f'[regmw]\nentry_points = false\n[gateway]\nupstream = "{direct}"\n'
                         f'zero_copy = {str(args.zero_copy).lower()}\n'
                         '[[ratelimit.rules]]\nby = "client"\nlimit = "100000000/minute"\n')
        log = open(os.path.join(work, "regmw.log"), "wb")
        gateway_proc = subprocess.Popen([sys.executable, "-m", "regmw.cli", "--config", regmw_config, "serve",
                                         "--port", str(gport)], stdout=log, stderr=log,
                                        env={**os.environ, "REGMW_CONFIG": ""})
        procs.append(gateway_proc)
        wait_port(gport, gateway_proc, 30.0)
        gateway = f"http://127.0.0.1:{gport}"
        sides = {"direct": direct, "gateway": gateway}

        # Small fixtures: a config blob, a manifest, a 10 MiB blob (pushed directly, once).
        config_blob = b'{"architecture":"amd64","os":"linux"}'
        config_digest = monolithic(direct, "bench/small", config_blob)
        put_manifest(direct, "bench/small", config_digest, len(config_blob))
        ten = os.urandom(10 * MIB)
        ten_digest = monolithic(direct, "bench/ten", ten)
        for url in sides.values():  # warm-up, and the gateway's baseline RSS after it
            assert call(url, "GET", "/v2/bench/small/manifests/latest", headers=ACCEPT)[0] == 200
            pull(url, "bench/ten", ten_digest, len(ten))
        baseline_rss = tree_rss_mb(gateway_proc.pid)
        peak = PeakRss(gateway_proc.pid)
        peak.start()

        block = os.urandom(MIB)
        size = args.size_mib * MIB
        hasher = hashlib.sha256()
        for piece in blocks(size, block):
            hasher.update(piece)
        digest = "sha256:" + hasher.hexdigest()

        results: dict[str, dict[str, float]] = {key: {} for key in (
            "push_mib_s", "pull_mib_s", "concurrent_pull_s", "small_p50_ms", "small_p99_ms", "small_rps")}
        servers = {"direct": lambda: [registry.pid], "gateway": lambda: children(gateway_proc.pid)}
        rates: dict[str, list[float]] = {side: [] for side in sides}
        cpu: dict[str, list[float]] = {side: [] for side in sides}
        for number in range(args.pushes):
            for side, url in sides.items():
                pids = servers[side]()
                before = sum(map(cpu_seconds, pids))
                # the first push goes to REPO (pulled below); repeats to their own, so none is a cross-mount
                repo = REPO if number == 0 else f"{REPO}{number}"
                rates[side].append(args.size_mib / push(url, repo, size, block, digest))
                cpu[side].append(sum(map(cpu_seconds, pids)) - before)
        results["push_mib_s"] = {side: round(statistics.median(values), 1) for side, values in rates.items()}
        results["push_cpu_s"] = {side: round(statistics.median(values), 2) for side, values in cpu.items()}
        rates = {side: [] for side in sides}
        cpu = {side: [] for side in sides}
        for _ in range(args.pulls):
            for side, url in sides.items():
                pids = servers[side]()
                before = sum(map(cpu_seconds, pids))
                rates[side].append(args.size_mib / pull(url, REPO, digest, size))
                cpu[side].append(sum(map(cpu_seconds, pids)) - before)
        results["pull_mib_s"] = {side: round(statistics.median(values), 1) for side, values in rates.items()}
        results["pull_cpu_s"] = {side: round(statistics.median(values), 2) for side, values in cpu.items()}
        for side, url in sides.items():
            results["concurrent_pull_s"][side] = round(concurrent_pulls(url, "bench/ten", ten_digest, len(ten)), 2)
        for side, url in sides.items():
            figures = wrk(wrk_binary, f"{url}/v2/bench/small/manifests/latest", args.seconds, 1)
            results["small_p50_ms"][side] = figures["p50"]
            results["small_p99_ms"][side] = figures["p99"]
            loaded = wrk(wrk_binary, f"{url}/v2/bench/small/manifests/latest", args.seconds, 8)
            results["small_rps"][side] = loaded["rps"]
        peak.stopped.set()
        peak.join()
        results["rss_growth_mb"] = {"direct": None, "gateway": round(peak.peak - baseline_rss, 1)}
        results["transport"] = transport_figures(direct, digest, size, "/v2/bench/small/manifests/latest",
                                                 args.small)

        ratios = {
            "push_ratio": round(results["push_mib_s"]["gateway"] / results["push_mib_s"]["direct"], 2),
            "pull_ratio": round(results["pull_mib_s"]["gateway"] / results["pull_mib_s"]["direct"], 2),
            "concurrent_pull_ratio": round(
                results["concurrent_pull_s"]["gateway"] / results["concurrent_pull_s"]["direct"], 2),
            "small_p50_overhead_ms": round(results["small_p50_ms"]["gateway"] - results["small_p50_ms"]["direct"], 3),
        }
        results.update(ratios)
        results["zero_copy"] = args.zero_copy
        print(f"blob of {args.size_mib} MiB; gateway = regmw serve (gunicorn) in front of docker-registry, "
              f"zero_copy {'on' if args.zero_copy else 'off'}")
        print(f"{'':22}{'direct':>12}{'gateway':>12}")
        for key in ("push_mib_s", "push_cpu_s", "pull_mib_s", "pull_cpu_s", "concurrent_pull_s", "small_p50_ms", "small_p99_ms", "small_rps",
                    "rss_growth_mb"):
            row = results[key]
            direct_value = "-" if row["direct"] is None else row["direct"]
            print(f"{key:22}{direct_value:>12}{row['gateway']:>12}")
        print("ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
        print("transports (one Python process, same upstream):")
        for name, row in results["transport"].items():
            print(f"  {name:12} " + ", ".join(f"{k} {v}" for k, v in row.items()))
        if args.json:
            print(json.dumps(results))
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
