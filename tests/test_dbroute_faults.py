"""Database routing under faults, the way production runs it (issue 14).

gunicorn (3 workers, 4 threads each, with and without ``--preload``) serves a
small Flask app behind regmw + dbroute (:mod:`tests.servers.dbroute_app`); a
real PostgreSQL primary + streaming replica; the position store on a
throwaway Redis with ``appendonly yes`` in its own temp dir and port. Every
read answers the ``inet_server_port()`` that served it, so the tests see the
truth, not what the router claims. State changes are awaited by polling with
a deadline, never by sleeping.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .servers._util import free_port, need_binary, stop, wait_for_port

pytestmark = [pytest.mark.services, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parent.parent
INTERFACES = ("execute", "connect", "session", "flask")


class AofRedis:
    """A redis-server with ``appendonly yes`` on a free port; SIGKILL it and restart it from its own files."""

    def __init__(self, root: Path) -> None:
        self.binary = need_binary("redis-server")
        self.dir = root / "redis"
        self.dir.mkdir()
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, proc=self.proc)
        import redis

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:  # answering PING once the AOF is loaded
            try:
                client.ping()
                break
            except redis.exceptions.BusyLoadingError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def snapshot(self) -> Path:
        """A copy of the AOF files as they are now (to restart from older data later)."""
        copy = self.dir.parent / f"aof-{time.monotonic_ns()}"
        shutil.copytree(self.dir, copy)
        return copy

    def restore(self, snapshot: Path) -> None:
        shutil.rmtree(self.dir)
        shutil.copytree(snapshot, self.dir)

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc)


@pytest.fixture(scope="module")
def aof_redis(tmp_path_factory):
    """One appendonly Redis for the module (the tests kill and restart it; it is running after each)."""
    server = AofRedis(tmp_path_factory.mktemp("aof"))
    server.start()
    yield server
    server.close()


@pytest.fixture
def cluster(pg_cluster):
    pg_cluster.sql("primary", "CREATE TABLE IF NOT EXISTS kv (repo text PRIMARY KEY, value bigint NOT NULL)")
    pg_cluster.wait_replica_caught_up()
    return pg_cluster


def app_config(cluster, redis_url: str) -> dict:
    return {
        "regmw": {"plugins": ["dbroute"], "entry_points": False},
        "database": {
            "primary": cluster.primary_url,
            "replicas": [cluster.replica_url],
            # 0.5 s: a worker flushes positions it could not store at its next check, so the
            # window the store tests probe (store back, position still pending) is not tiny.
            "health_interval": 0.5,
            "max_replay_lag": 5.0,
            "failure_threshold": 2,
            "reintegrate_after": 2,
            "connect_timeout": 2,
            "lsn_ttl": 60.0,
            "replay_position_max_age": 0.02,
            "store": "redis",
            "store_url": redis_url,
            "store_retry": 0.2,
        },
    }


class Gunicorn:
    """``gunicorn -w 3 --threads 8 'tests.servers.dbroute_app:create_app()'`` on a free port.

    8 threads: the mid-query test starts 7 slow reads at once and waits until
    all 7 run on the replica together; the kernel may hand all of them to one
    worker, and a worker with fewer threads queued the rest behind 1.5 s
    sleeps, so they never ran together (a flaky timeout, not a routing fault).
    """

    def __init__(self, config: dict, log: Path, preload: bool) -> None:
        self.port = free_port()
        env = dict(os.environ, REGMW_TEST_CONFIG=json.dumps(config), PYTHONPATH=str(ROOT))
        args = [sys.executable, "-m", "gunicorn", "-w", "3", "--threads", "8", "-b", f"127.0.0.1:{self.port}",
                "--graceful-timeout", "5", "--log-level", "warning"]
        if preload:
            args.append("--preload")
        self.log = open(log, "wb")
        self.proc = subprocess.Popen([*args, "tests.servers.dbroute_app:create_app()"], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, timeout=30, proc=self.proc)

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 30) -> tuple[int, dict]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else {}
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                return error.code, json.loads(raw)
            except ValueError:
                return error.code, {"raw": raw.decode(errors="replace")}

    def read(self, repo: str, **query) -> tuple[int, dict]:
        qs = "&".join(f"{key}={value}" for key, value in query.items())
        return self.request("GET", f"/v2/{repo}/manifests/latest?{qs}")

    def write(self, repo: str, value: int) -> int:
        return self.request("PUT", f"/v2/{repo}/manifests/latest", str(value).encode())[0]

    def workers_ready(self, count: int = 3, timeout: float = 30) -> set[int]:
        """Poll ``/status`` until ``count`` distinct workers run their checker and see the replica eligible."""
        ready: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(ready) < count:
            assert time.monotonic() < deadline, f"only workers {ready} ready"
            with ThreadPoolExecutor(6) as pool:
                for status, body in pool.map(lambda _: self.request("GET", "/status"), range(6)):
                    if status == 200 and body["checker"] and all(r["eligible"] for r in body["replicas"]):
                        ready.add(body["pid"])
        return ready

    def close(self) -> None:
        stop(self.proc, timeout=15)
        self.log.close()


@pytest.fixture(scope="module", params=["fork", "preload"])
def gunicorn(request, pg_replication, aof_redis, tmp_path_factory):
    """gunicorn, 3 workers, with or without ``--preload``; shared by the module's tests of that mode."""
    server = Gunicorn(app_config(pg_replication, aof_redis.url), tmp_path_factory.mktemp("gunicorn") / "log",
                      preload=request.param == "preload")
    yield server
    server.close()


@pytest.fixture
def server(gunicorn, cluster, aof_redis):
    """The mode's gunicorn, once its 3 workers run their checker and see the (restored) replica eligible."""
    gunicorn.workers_ready()
    return gunicorn


_seq = iter(range(1, 1_000_000))


def unique(prefix: str) -> str:
    return f"{prefix}/r{next(_seq)}-{os.getpid()}-{time.monotonic_ns() % 100000}"


# --- a replica stopped in the middle of slow reads ---------------------------------------


def replica_reads_in_every_worker(server: Gunicorn, repo: str, workers: int = 3, timeout: float = 20) -> None:
    """Read ``repo`` until each of the ``workers`` gunicorn workers has answered it from the replica."""
    seen: set[int] = set()
    last: dict = {}
    deadline = time.monotonic() + timeout
    while len(seen) < workers:
        assert time.monotonic() < deadline, f"replica reads only in workers {seen}; last answer {last}"
        with ThreadPoolExecutor(6) as pool:
            for status, body in pool.map(lambda _: server.read(repo), range(6)):
                last = body
                if status == 200 and body["role"] == "replica":
                    seen.add(body["pid"])


def test_replica_stopped_mid_query_on_every_interface(cluster, server):
    """One slow read per interface runs on the replica when it is stopped with ``-m immediate``.

    A read that had returned nothing yet is retried on the primary: 200. A read
    whose transaction had already returned a result gets the documented 503
    UNAVAILABLE (ReplicaLost through ``init_app``), never a 500.
    """
    repo = unique("midquery")
    cluster.sql("primary", "INSERT INTO kv (repo, value) VALUES (%s, 7)", repo)  # no position: replica reads
    cluster.wait_replica_caught_up()
    # Each worker's checker must have seen the replica past the store's floor (a Redis
    # restart in an earlier test raises it): until then a worker rightly reads on the
    # primary, and the slow reads below could never all be running on the replica.
    replica_reads_in_every_worker(server, repo)
    reads = [(via, "0") for via in INTERFACES] + [(via, "1") for via in INTERFACES if via != "execute"]
    with ThreadPoolExecutor(len(reads)) as pool:
        futures = {pool.submit(server.read, repo, via=via, sleep=1.5, after=after): (via, after)
                   for via, after in reads}
        # Every slow read is running on the replica before it is stopped.
        cluster.wait_for(lambda: cluster.sql(
            "replica", "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%%' "
                       "AND application_name = 'regmw-replica'")[0][0] == len(reads),
            timeout=20, what="every slow read running on the replica")
        cluster.stop_replica()
        answers = {futures[future]: future.result() for future in futures}
    for (via, after), (status, body) in answers.items():
        if after == "0":
            assert status == 200, (via, status, body)
            assert (body["value"], body["port"], body["role"], body["reason"]) == (
                7, cluster.primary_port, "primary", "replica-failed"), (via, body)
        else:
            assert status == 503, (via, status, body)
            assert body["errors"][0]["code"] == "UNAVAILABLE", (via, body)
            assert "replica" in body["errors"][0]["message"]
    # Later reads: the replica is down, every worker serves them from the primary.
    for via in INTERFACES:
        status, body = server.read(repo, via=via)
        assert status == 200 and body["port"] == cluster.primary_port, (via, status, body)


# --- the position store comes back with older data ------------------------------------------


def hammer_reads(server: Gunicorn, repo: str, expected: int, until, threads: int = 6) -> tuple[int, int, set]:
    """Read ``repo`` from several client threads until ``until()`` holds; (reads, stale reads, worker pids)."""
    counts = {"reads": 0, "stale": 0}
    pids: set[int] = set()
    lock = threading.Lock()
    stop_at = time.monotonic() + 20

    def loop():
        while time.monotonic() < stop_at:
            status, body = server.read(repo)
            assert status == 200, body
            with lock:
                counts["reads"] += 1
                counts["stale"] += body["value"] != expected
                pids.add(body["pid"])
                if until() and counts["reads"] >= 30:
                    return

    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(loop) for _ in range(threads)]:
            future.result()
    return counts["reads"], counts["stale"], pids


def replica_value(cluster, repo: str):
    rows = cluster.sql("replica", "SELECT value FROM kv WHERE repo = %s", repo)
    return rows[0][0] if rows else None


def test_store_killed_write_then_restart_with_older_data_never_stale(cluster, aof_redis, server):
    """Redis SIGKILLed → a write answered 201 (its position only in that worker) → Redis restarts
    from its AOF with the older data → reads through every worker: 0 stale, 3 rounds."""
    cluster.set_apply_delay("1s")
    repo = unique("aof")
    assert server.write(repo, 0) == 201  # R has an (older) position in the store
    cluster.wait_replica_caught_up()
    total_reads = 0
    for round_ in range(1, 4):
        aof_redis.kill()
        assert server.write(repo, round_) == 201  # the position cannot be stored
        replayed_when_answered = replica_value(cluster, repo) == round_
        aof_redis.start()  # from the AOF: R's older position, the epoch marker
        reads, stale, _pids = hammer_reads(server, repo, round_,
                                           until=lambda value=round_: replica_value(cluster, repo) == value)
        assert stale == 0, f"round {round_}: {stale} of {reads} reads stale"
        # Why: the worker answered only once the replica had replayed the write, so no worker,
        # whatever the store says when it is back, can find the replica without it.
        assert replayed_when_answered
        total_reads += reads
    assert total_reads >= 90


def test_store_restarted_from_an_older_snapshot_gets_a_new_floor(cluster, aof_redis, server):
    """A write whose position WAS stored, then Redis dies and comes back from older files (an
    AOF copy taken before the write: a lost fsync, a failover to a replica behind). The epoch
    marker's run_id no longer matches the server: a new floor before the store is trusted. 3 rounds."""
    cluster.set_apply_delay("1s")
    repo = unique("older")
    assert server.write(repo, 0) == 201
    cluster.wait_replica_caught_up()
    import redis

    key = f"regmw:{{repository:{repo}}}:lsn"
    for round_ in range(1, 4):
        before = redis.Redis.from_url(aof_redis.url).get(key)
        snapshot = aof_redis.snapshot()
        assert server.write(repo, round_) == 201
        assert redis.Redis.from_url(aof_redis.url).get(key) != before  # stored: no wait for the replica
        aof_redis.kill()
        aof_redis.restore(snapshot)
        aof_redis.start()
        assert redis.Redis.from_url(aof_redis.url).get(key) == before  # the store went back in time
        behind_seen = replica_value(cluster, repo) != round_  # the replica really is behind now
        reads, stale, pids = hammer_reads(server, repo, round_,
                                          until=lambda value=round_: replica_value(cluster, repo) == value)
        assert stale == 0, f"round {round_}: {stale} of {reads} reads stale"
        assert behind_seen, "the replica had replayed the write already: the round proved nothing"
    client = redis.Redis.from_url(aof_redis.url)
    run_id = client.info("server")["run_id"]
    assert client.get("regmw:{dbroute}:epoch").decode() == run_id
