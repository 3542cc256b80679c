"""Helpers for fixtures that own real servers: free ports, waiting, skip-or-fail."""
from __future__ import annotations

import http.client
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

import pytest


def services_required() -> bool:
    return os.environ.get("REGMW_REQUIRE_SERVICES", "") not in ("", "0", "false")


def unavailable(reason: str):
    """Skip the test, or fail it when CI requires every real service."""
    if services_required():
        pytest.fail(f"required service unavailable: {reason}")
    pytest.skip(reason)


def need_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not on PATH")
    return path


def need_module(name: str):
    """Import a real client installed from PyPI by the ``test`` extra (``oras``, ``dxf``), else skip or fail."""
    try:
        return importlib.import_module(name)
    except ImportError:
        unavailable(f"{name} not installed (pip install -e '.[test]')")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1", proc: subprocess.Popen | None = None) -> None:
    """Poll until something accepts on ``port`` (a readiness check, not a timing sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Stop a server we started, by PID."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_until(predicate, timeout: float = 10.0, what: str = "condition"):
    """Poll ``predicate`` until it returns something true (returned), or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"{what} not reached within {timeout}s")


def http_request(url: str, method: str, target: str, body=None, headers: dict | None = None):
    """One request on a fresh connection; ``target`` is sent byte for byte (http.client does not re-encode it).

    Returns ``(status, headers as a dict, body bytes)``. Shared by the end-to-end tests that talk to
    real servers over HTTP, so they all send requests the same way.
    """
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def in_fresh_interpreter(function, *args):
    """``function(*args)``'s JSON-able result, computed in a new Python process.

    For memory measurements: tracemalloc and RSS count every thread's allocations, and in a
    full test run threads left by earlier tests (checkers, pools, workers) allocate meanwhile.
    """
    code = (f"import json, sys; from {function.__module__} import {function.__name__} as f; "
            "print(json.dumps(f(*json.loads(sys.argv[1]))))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True,
                         timeout=300, cwd=root)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def rss(pid: int | str = "self") -> int:
    """Resident set size of ``pid`` (this process by default) in bytes, from /proc."""
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def workers_of(proc: subprocess.Popen) -> set[int]:
    """The gunicorn master's child processes (its workers)."""
    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as handle:
        return {int(pid) for pid in handle.read().split()}
