"""Notifications on Redis Sentinel: the master is SIGKILLed while workers deliver and pushes go on.

Events are XADDed through the Sentinel-managed connection (with ``wait_replicas
= 1``), delivered by two ``regmw notifications worker`` processes; after the
promotion both the middleware and the workers follow the new master, and the
receiver gets every event, in order per repository, signatures verifying.
"""
from __future__ import annotations

import signal

import pytest

from .test_notify_cluster import pushes_and_deliveries_across_a_failover

pytestmark = pytest.mark.services


def test_delivery_goes_on_across_a_sentinel_failover(redis_sentinel_group, webhook_receiver, tmp_path):
    group = redis_sentinel_group

    def kill() -> None:
        group.master.send_signal(signal.SIGKILL)
        group.master.wait(10)

    def promoted() -> bool:
        return group.master_address() == ("127.0.0.1", group.replica_port)

    repositories = [f"team{index % 3}/app{index}" for index in range(8)]
    pushes_and_deliveries_across_a_failover(group.url, webhook_receiver(), tmp_path, repositories, kill, promoted)
