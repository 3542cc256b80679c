"""A 1 GiB blob GET behind gunicorn, with and without regmw mounted: is the zero-copy path kept?

Three gunicorn servers (1 gthread worker, 4 threads) serve the same file from
a ``wsgi.file_wrapper`` (as Flask's ``send_file`` does):

``bare``         the app alone: gunicorn sees its own FileWrapper and uses sendfile;
``regmw``        the app behind ``RegistryMiddleware`` (embedded defaults, no rules),
                 which hands the wrapper back as is, finish hooked into its close;
``python_copy``  the app with its body wrapped in a generator, which is what any
                 wrapper that hides the type costs (regmw before this change):
                 gunicorn copies the file through Python in 64 KiB reads.

A client on a raw socket reads every byte into one reused buffer. Rounds
alternate the servers in a fresh random order; the median per side is reported,
as throughput (wall clock, which on a shared machine swings with the other
load) and as the gunicorn worker's CPU seconds per GiB sent (utime + stime
from /proc: sendfile's kernel copy included), which is steadier.

    python benchmarks/sendfile_bench.py [--size-mib 1024] [--rounds 3] [--json]

The file is sparse (zeros) and sits in the page cache after the first read:
this measures the copy path, not the disk.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from _common import children, cpu_seconds, free_port, wait_port

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SIDES = ("bare", "regmw", "python_copy")
PATH = "/v2/group/project/blobs/sha256:" + "ab" * 32


def application():
    """The app for ``BENCH_KIND`` (gunicorn ``sendfile_bench:application()``)."""
    kind, blob = os.environ["BENCH_KIND"], os.environ["BENCH_BLOB"]

    def blob_app(environ, start_response):
        handle = open(blob, "rb")  # noqa: SIM115 - closed by the server through the wrapper
        start_response("200 OK", [("Content-Length", str(os.fstat(handle.fileno()).st_size)),
                                  ("Content-Type", "application/octet-stream")])
        body = environ["wsgi.file_wrapper"](handle, 65536)
        if kind == "python_copy":
            return (chunk for chunk in body)
        return body

    if kind == "regmw":
        from regmw import RegistryMiddleware

        return RegistryMiddleware(blob_app, {"regmw": {"plugins": [], "entry_points": False, "log_level": "ERROR"}},
                                  environ={})
    return blob_app


def worker_of(master: int) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        workers = children(master)
        if workers:
            return workers[0]
        time.sleep(0.05)
    raise TimeoutError("no gunicorn worker")


def start(kind: str, blob: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "BENCH_KIND": kind, "BENCH_BLOB": blob, "PYTHONPATH": os.pathsep.join([HERE, ROOT])}
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-k", "gthread", "-w", "1", "--threads", "4",
                             "--timeout", "0", "--log-level", "error", "-b", f"127.0.0.1:{port}",
                             "sendfile_bench:application()"], env=env, stdout=subprocess.DEVNULL)
    wait_port(port, proc, 60.0)
    return proc, port


def fetch(port: int, size: int) -> float:
    """Seconds to GET the blob and read every byte (headers + ``size`` body bytes)."""
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    begin = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"GET {PATH} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        received = sock.recv_into(view)
        head_end = bytes(buffer[:received]).find(b"\r\n\r\n")
        if not bytes(buffer[:12]).endswith(b"200"):
            raise RuntimeError(bytes(buffer[:200]))
        body = received - head_end - 4
        while body < size:
            got = sock.recv_into(view)
            if not got:
                raise RuntimeError(f"connection closed after {body} of {size} bytes")
            body += got
    return time.perf_counter() - begin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    size = args.size_mib * 1024 * 1024
    with tempfile.TemporaryDirectory() as work:
        blob = os.path.join(work, "blob")
        with open(blob, "wb") as handle:
            handle.truncate(size)
        servers = {side: start(side, blob) for side in SIDES}
        workers = {side: worker_of(proc.pid) for side, (proc, _) in servers.items()}
        seconds: dict[str, list[float]] = {side: [] for side in SIDES}
        cpu: dict[str, list[float]] = {side: [] for side in SIDES}
        try:
            for _, port in servers.values():
                fetch(port, size)  # warm-up: page cache, imports
            for number in range(1, args.rounds + 1):
                order = random.sample(SIDES, len(SIDES))
                for side in order:
                    before = cpu_seconds(workers[side])
                    seconds[side].append(fetch(servers[side][1], size))
                    cpu[side].append((cpu_seconds(workers[side]) - before) / (size / 2**30))
                print(f"round {number}: " + ", ".join(
                    f"{side} {size / seconds[side][-1] / 2**30:.2f} GiB/s, {cpu[side][-1]:.2f} CPU s/GiB"
                    for side in SIDES))
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait()
    result = {side: {"seconds": round(statistics.median(values), 3),
                     "gib_per_s": round(size / statistics.median(values) / 2**30, 3),
                     "server_cpu_s_per_gib": round(statistics.median(cpu[side]), 3)} for side, values in seconds.items()}
    result["regmw_vs_bare"] = round(result["regmw"]["gib_per_s"] / result["bare"]["gib_per_s"], 3)
    result["python_copy_vs_bare"] = round(result["python_copy"]["gib_per_s"] / result["bare"]["gib_per_s"], 3)
    result["size_mib"] = args.size_mib
    print(f"median of {args.rounds} rounds, {args.size_mib} MiB: throughput regmw/bare {result['regmw_vs_bare']}, "
          f"python copy/bare {result['python_copy_vs_bare']}; server CPU s/GiB: "
          + ", ".join(f"{side} {result[side]['server_cpu_s_per_gib']}" for side in SIDES))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
