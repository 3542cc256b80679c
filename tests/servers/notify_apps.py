"""Processes for the notification tests: a delivery worker to SIGKILL, and a stand-in Redis connection.

``python -m tests.servers.notify_apps '<json settings>'`` runs a delivery
worker until SIGTERM/SIGKILL. Settings: ``url`` (Redis), ``namespace``,
``shards``, ``endpoints`` (tables as in ``[notifications] endpoints``),
``lease_ttl``, ``claim_idle``.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from typing import Any

from regmw import build
from regmw.config import validate
from regmw_notify import make_worker
from regmw_redis.connection import RedisConnection
from regmw_redis.settings import SECTION


def Connection(url: str, namespace: str = "regmw", timeout: float = 0.2) -> Any:  # noqa: N802 - reads as a type
    """The redis plugin's own ``services.redis`` (RedisConnection) for ``url``, as a runtime would build it."""
    section = validate({"redis": {"url": url, "namespace": namespace, "socket_timeout": timeout,
                                  "connect_timeout": timeout}}, {"redis": SECTION})["redis"]
    return RedisConnection(section)


def worker_config(settings: dict[str, Any]) -> dict[str, Any]:
    """A regmw configuration (plugins redis + notifications) from the test's settings."""
    notifications = {"endpoints": settings["endpoints"], "allowed_networks": ["127.0.0.0/8"],
                     "shards": settings.get("shards", 16), "lease_ttl": settings.get("lease_ttl", 2.0),
                     "claim_idle": settings.get("claim_idle", 0.0), "spool_dir": settings.get("spool_dir", "spool")}
    return {
        "regmw": {"plugins": ["redis", "notifications"], "entry_points": False},
        "redis": {"url": settings["url"], "namespace": settings.get("namespace", "regmw"), "socket_timeout": 0.2,
                  "connect_timeout": 0.2},
        "notifications": notifications,
    }


def build_worker(settings: dict[str, Any]) -> Any:
    """The worker ``regmw notifications worker`` runs, from a real runtime."""
    return make_worker(build(worker_config(settings), environ={}).services)


def spawn_worker(settings: dict[str, Any]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.servers.notify_apps", json.dumps(settings)])


def main() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    build_worker(json.loads(sys.argv[1])).run(stop)


if __name__ == "__main__":
    main()
