"""Process helpers the benchmarks share: free ports, waiting for a server, CPU time from /proc.

Each benchmark is run as a script (``python benchmarks/x_bench.py``), so this directory is
first on ``sys.path`` and ``from _common import ...`` finds this module; the gunicorn-served
benchmarks put the directory on the workers' ``PYTHONPATH`` as well.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time


def free_port() -> int:
    """A port nothing listens on now (bound and released on 127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    """Poll until something accepts on ``port``; fail at once if ``proc`` exits first.

    The error carries the tail of the process's stderr when it was started with ``stderr=PIPE``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            detail = f": {proc.stderr.read().decode()[-2000:]}" if proc.stderr is not None else ""
            raise RuntimeError(f"process exited with {proc.returncode}{detail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing on port {port}")


def children(pid: int) -> list[int]:
    """Child PIDs of ``pid`` (a gunicorn master's workers), from /proc."""
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(child) for child in handle.read().split()]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used so far (/proc/PID/stat utime + stime)."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (/proc/PID/statm)."""
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
