"""A throwaway redis-server on a free port, owned by the test run."""
from __future__ import annotations

import subprocess

import pytest

from ._util import free_port, need_binary, stop, wait_for_port


def start_redis(tmp_path, *extra: str) -> tuple[subprocess.Popen, int]:
    binary = need_binary("redis-server")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, proc=proc)
    return proc, port


@pytest.fixture
def redis_server(tmp_path):
    """(process, url) of a fresh redis-server; killed at teardown."""
    proc, port = start_redis(tmp_path)
    try:
        yield proc, f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)
