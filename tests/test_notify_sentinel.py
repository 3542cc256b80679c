"""Notifications on Redis Sentinel: the master is SIGKILLed while workers deliver and pushes go on.

Events are XADDed through the Sentinel-managed connection (with ``wait_replicas
= 1``), delivered by two ``regmw notifications worker`` processes; after the
promotion both the middleware and the workers follow the new master, and the
receiver gets every event, in order per repository, signatures verifying.
"""
from __future__ import annotations

import signal
import time

import pytest
from werkzeug.test import Client

from regmw import RegistryMiddleware

from .servers.redis_apps import registry_app
from .servers._util import stop
from .servers.webhook_receiver import first_deliveries
from .test_notify_cluster import _check_order, _cli_worker, _config, _ns, _push_retrying
from .test_notify_delivery import wait_until

pytestmark = pytest.mark.services


def test_delivery_goes_on_across_a_sentinel_failover(redis_sentinel_group, webhook_receiver, tmp_path):
    group = redis_sentinel_group
    receiver = webhook_receiver()
    namespace = _ns()
    config = _config(group.url, namespace, [], tmp_path / "spool", wait_replicas=1, wait_timeout=0.2,
                     breaker_seconds=0.2)
    middleware = RegistryMiddleware(registry_app, config, environ={})
    client = Client(middleware)
    workers = [_cli_worker(group.url, namespace, receiver, tmp_path / f"worker{index}") for index in range(2)]
    repositories = [f"team{index % 3}/app{index}" for index in range(8)]
    tags = 0
    try:
        deadline = time.monotonic() + 30
        for tags in range(1, 6):
            for repository in repositories:
                _push_retrying(client, repository, tags, deadline)
        wait_until(lambda: len(first_deliveries(receiver.snapshot())) >= 5, 20, "the workers delivering")
        group.master.send_signal(signal.SIGKILL)
        group.master.wait(10)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:  # pushes go on through the failover, and a while after it
            tags += 1
            for repository in repositories:
                _push_retrying(client, repository, tags, deadline)
            if group.master_address() == ("127.0.0.1", group.replica_port) and tags >= 15:
                break
        assert group.master_address() == ("127.0.0.1", group.replica_port), "the sentinels never promoted the replica"
        expected = tags * len(repositories)
        wait_until(lambda: len(first_deliveries(receiver.snapshot())) >= expected, 60,
                   f"{expected} events delivered")
        assert all(worker.poll() is None for worker in workers)
    finally:
        for worker in workers:
            stop(worker)
        middleware.services.events.close()
    _check_order(first_deliveries(receiver.snapshot()), expected)
    assert receiver.bad_signatures == 0
