"""A throwaway Redis Sentinel group: master, replica (replicaof), three sentinels, quorum 2.

``down-after-milliseconds 1000`` and ``failover-timeout 3000``, all on free
ports on 127.0.0.1, all stopped by PID at teardown. The fixture returns once
the replica is in sync and every sentinel knows the replica and the two
other sentinels, so a test that kills the master gets a failover.
"""
from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field

import pytest
import redis

from ._util import free_port, need_binary, stop, wait_for_port

SERVICE = "regmwmaster"


@dataclass
class SentinelGroup:
    master: subprocess.Popen
    master_port: int
    replica: subprocess.Popen
    replica_port: int
    sentinels: list[tuple[subprocess.Popen, int]] = field(default_factory=list)
    service: str = SERVICE

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for _, port in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def sentinel_client(self, index: int = 0) -> redis.Redis:
        return redis.Redis(port=self.sentinels[index][1], socket_timeout=1)

    def master_address(self) -> tuple[str, int] | None:
        """What the sentinels agree the master is (the first that answers)."""
        for _, port in self.sentinels:
            try:
                host, master_port = redis.Redis(port=port, socket_timeout=1).sentinel_get_master_addr_by_name(self.service)
                return host.decode() if isinstance(host, bytes) else host, int(master_port)
            except (redis.RedisError, TypeError):
                continue
        return None


def _poll(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except redis.RedisError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"sentinel group: {what} not reached in {timeout}s")


def start_sentinel_group(tmp_path) -> SentinelGroup:
    from .redis_server import start_redis  # imported late: pytest loads it as a plugin itself

    binary = need_binary("redis-server")
    for name in ("master", "replica"):
        (tmp_path / name).mkdir()
    master, master_port = start_redis(tmp_path / "master")
    group = SentinelGroup(master, master_port, None, 0)  # type: ignore[arg-type]
    try:
        replica, replica_port = start_redis(tmp_path / "replica", "--replicaof", "127.0.0.1", str(master_port))
        group.replica, group.replica_port = replica, replica_port

        def in_sync() -> bool:
            info = redis.Redis(port=replica_port, socket_timeout=1).info("replication")
            return info.get("master_link_status") == "up"

        _poll(in_sync, 15, "replica in sync")
        for index in range(3):
            port = free_port()
            directory = tmp_path / f"sentinel{index}"
            directory.mkdir()
            conf = directory / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 3000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            proc = subprocess.Popen(
                [binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            group.sentinels.append((proc, port))
            wait_for_port(port, proc=proc)

        def all_known() -> bool:
            for _, port in group.sentinels:
                client = redis.Redis(port=port, socket_timeout=1)
                if len(client.sentinel_slaves(SERVICE)) < 1 or len(client.sentinel_sentinels(SERVICE)) < 2:
                    return False
            return True

        _poll(all_known, 20, "sentinels discovering the replica and each other")
        return group
    except BaseException:
        stop_sentinel_group(group)
        raise


def stop_sentinel_group(group: SentinelGroup) -> None:
    for proc, _ in group.sentinels:
        stop(proc)
    for proc in (group.replica, group.master):
        if proc is not None:
            stop(proc)


@pytest.fixture
def redis_sentinel_group(tmp_path):
    """A :class:`SentinelGroup`; every process is stopped by PID at teardown."""
    group = start_sentinel_group(tmp_path)
    try:
        yield group
    finally:
        stop_sentinel_group(group)
