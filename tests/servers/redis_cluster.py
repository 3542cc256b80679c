"""A throwaway Redis Cluster: 3 masters + 3 replicas on free loopback ports, optionally TLS-only.

``redis-server --cluster-enabled yes --cluster-config-file DIR/nodes.conf
--cluster-node-timeout 1000`` six times, then ``redis-cli --cluster create ...
--cluster-replicas 1 --cluster-yes``. The fixture returns once all 16384
slots are served, every node agrees the cluster is ``ok`` and every replica
is in sync with its master (so killing a master gets a failover). Every
process is stopped by PID at teardown.

TLS: :func:`make_certificate` writes a self-signed certificate for
``IP:127.0.0.1`` with ``openssl req -x509``; the servers then listen on
``--tls-port`` only, with ``--tls-cluster yes`` and ``--tls-replication yes``.
"""
from __future__ import annotations

import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from ._util import free_port, need_binary, stop, wait_for_port

NODE_TIMEOUT_MS = 1000


def make_certificate(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """(certificate, key) of a fresh self-signed certificate valid for IP 127.0.0.1 (it is its own CA)."""
    openssl = need_binary("openssl")
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def tls_args(cert: Path, key: Path, port: int) -> list[str]:
    """redis-server arguments for a TLS-only server on ``port`` (clients are not asked for certificates)."""
    return ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]


def wait_for_tls(port: int, cert: Path, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    wait_for_port(port, timeout, proc=proc)
    client = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(cert), socket_timeout=1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.ping()
            return
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


@dataclass
class RedisClusterGroup:
    nodes: list[tuple[subprocess.Popen, int]] = field(default_factory=list)
    tls: tuple[Path, Path] | None = None  # (certificate = CA, key)

    @property
    def ports(self) -> list[int]:
        return [port for _, port in self.nodes]

    @property
    def url(self) -> str:
        scheme = "rediss+cluster" if self.tls else "redis+cluster"
        return f"{scheme}://" + ",".join(f"127.0.0.1:{port}" for port in self.ports[:3])

    def node(self, port: int) -> redis.Redis:
        if self.tls:
            return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, ssl=True, ssl_ca_certs=str(self.tls[0]))
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)

    def read_replica(self, port: int, key: str) -> bytes | None:
        """GET ``key`` on the replica at ``port`` (READONLY on its own connection: replicas redirect otherwise)."""
        node = self.node(port)
        node = redis.Redis(connection_pool=node.connection_pool, single_connection_client=True)
        try:
            node.execute_command("READONLY")
            return node.get(key)
        finally:
            node.close()

    def client(self) -> redis.cluster.RedisCluster:
        """A plain redis-py cluster client for the test's own reads (not regmw's)."""
        kwargs = {"ssl": True, "ssl_ca_certs": str(self.tls[0])} if self.tls else {}
        return redis.cluster.RedisCluster(host="127.0.0.1", port=self.ports[0], socket_timeout=2, **kwargs)

    def process(self, port: int) -> subprocess.Popen:
        return next(proc for proc, node_port in self.nodes if node_port == port)

    def alive_ports(self) -> list[int]:
        return [port for proc, port in self.nodes if proc.poll() is None]

    def master_of(self, key: str) -> int:
        """The port of the master serving ``key``'s slot, as a live node sees it."""
        slot = redis.crc.key_slot(key.encode())
        for port in self.alive_ports():
            try:
                for start, end, master, *_ in self.node(port).execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        return int(master[1])
            except redis.RedisError:
                continue
        raise RuntimeError("no live node answers CLUSTER SLOTS")

    def redis_cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        command = [need_binary("redis-cli")]
        if self.tls:
            command += ["--tls", "--cacert", str(self.tls[0])]
        return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, check=True)

    def healthy(self) -> bool:
        """Every live node says ``cluster_state:ok`` with all slots assigned, and every live replica is in sync."""
        for port in self.alive_ports():
            node = self.node(port)
            info = node.cluster("info")
            if info.get("cluster_state") != "ok" or int(info.get("cluster_slots_ok", 0)) != 16384:
                return False
            replication = node.info("replication")
            if replication["role"] == "slave" and replication.get("master_link_status") != "up":
                return False
        return True

    def wait_healthy(self, timeout: float = 30.0) -> None:
        poll(self.healthy, timeout, "cluster healthy (all slots ok, replicas in sync)")


def _low_free_port(taken: set[int]) -> int:
    """A free port below 55536 (redis-server refuses higher client ports in cluster mode), not in ``taken``."""
    for _ in range(200):
        port = free_port()
        if port <= 55535 and port not in taken:
            taken.add(port)
            return port
    raise RuntimeError("no free port below 55536")


def poll(condition, timeout: float, what: str) -> None:
    """Poll ``condition`` until true (Redis errors count as not yet); TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (redis.RedisError, redis.exceptions.RedisClusterException):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"redis cluster: {what} not reached in {timeout}s")


def start_cluster(tmp_path: Path, tls: bool = False) -> RedisClusterGroup:
    """Start the cluster; a second attempt in a fresh directory if the first failed (a port taken meanwhile)."""
    try:
        return _start_cluster(tmp_path / "a", tls)
    except (subprocess.CalledProcessError, RuntimeError, TimeoutError) as exc:
        detail = getattr(exc, "stderr", "") or getattr(exc, "stdout", "") or exc
        warnings.warn(f"redis cluster start failed once, retrying: {detail}", stacklevel=2)
        return _start_cluster(tmp_path / "b", tls)


def _start_cluster(tmp_path: Path, tls: bool) -> RedisClusterGroup:
    tmp_path.mkdir(parents=True)
    taken: set[int] = set()
    binary = need_binary("redis-server")
    need_binary("redis-cli")
    group = RedisClusterGroup()
    if tls:
        group.tls = make_certificate(tmp_path)
    try:
        for index in range(6):
            directory = tmp_path / f"node{index}"
            directory.mkdir()
            port, bus = _low_free_port(taken), _low_free_port(taken)  # the bus port: set, not port + 10000
            listen = tls_args(*group.tls, port) + ["--tls-cluster", "yes", "--tls-replication", "yes"] if tls \
                else ["--port", str(port)]
            proc = subprocess.Popen(
                [binary, *listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory),
                 "--cluster-enabled", "yes", "--cluster-config-file", str(directory / "nodes.conf"),
                 "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--cluster-port", str(bus),
                 "--repl-diskless-sync-delay", "0", "--logfile", str(directory / "redis.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            group.nodes.append((proc, port))
        for proc, port in group.nodes:
            if tls:
                wait_for_tls(port, group.tls[0], proc)
            else:
                wait_for_port(port, proc=proc)
        group.redis_cli("--cluster", "create", *[f"127.0.0.1:{port}" for port in group.ports],
                        "--cluster-replicas", "1", "--cluster-yes")
        group.wait_healthy()
        return group
    except BaseException:
        stop_cluster(group)
        raise


def stop_cluster(group: RedisClusterGroup) -> None:
    for proc, _ in group.nodes:
        stop(proc)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    """A :class:`RedisClusterGroup` shared by a module's tests (use a unique namespace per test)."""
    group = start_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield group
    finally:
        stop_cluster(group)


@pytest.fixture
def redis_cluster_fresh(tmp_path):
    """A :class:`RedisClusterGroup` of its own, for tests that kill nodes or move slots."""
    group = start_cluster(tmp_path)
    try:
        yield group
    finally:
        stop_cluster(group)


@pytest.fixture(scope="module")
def redis_cluster_tls(tmp_path_factory):
    """A TLS-only :class:`RedisClusterGroup` (``rediss+cluster://``); ``group.tls[0]`` is the CA to trust."""
    group = start_cluster(tmp_path_factory.mktemp("cluster-tls"), tls=True)
    try:
        yield group
    finally:
        stop_cluster(group)
