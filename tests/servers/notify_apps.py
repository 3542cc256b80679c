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

import redis

from regmw_notify.endpoints import parse_endpoints
from regmw_notify.stream import RedisStreams
from regmw_notify.worker import Worker
from regmw_redis.locks import RedisLockManager


class Connection:
    """What ``services.redis`` offers (the contract's RedisConnection): ``client``, ``namespace``, ``key``."""

    def __init__(self, url: str, namespace: str = "regmw", timeout: float = 0.2) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.namespace = namespace
        self.cluster = False

    def key(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    def ping(self) -> None:
        self.client.ping()


def build_worker(settings: dict[str, Any]) -> Worker:
    connection = Connection(settings["url"], settings.get("namespace", "regmw"))
    streams = RedisStreams(connection, settings.get("shards", 16))
    locks = RedisLockManager(connection.client, connection.namespace)
    endpoints = parse_endpoints(settings["endpoints"], _networks())
    return Worker(streams, locks, endpoints, _networks(), settings.get("lease_ttl", 2.0),
                  settings.get("claim_idle", 0.0))


def _networks() -> list:
    import ipaddress
    return [ipaddress.ip_network("127.0.0.0/8")]


def spawn_worker(settings: dict[str, Any]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.servers.notify_apps", json.dumps(settings)])


def main() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    build_worker(json.loads(sys.argv[1])).run(stop)


if __name__ == "__main__":
    main()
