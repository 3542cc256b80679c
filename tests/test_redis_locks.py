"""Read-only locks and cluster slots on Redis, across real processes."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import redis

from regmw import build
from regmw.cli import main as cli
from regmw.errors import BackendUnavailable
from regmw_redis.locks import RedisLockManager, SlotUnavailable
from tests.servers import redis_apps
from tests.servers._util import stop



def _locks(url: str) -> RedisLockManager:
    runtime = build({"regmw": {"plugins": ["redis"], "entry_points": False}, "redis": {"url": url}}, environ={})
    assert isinstance(runtime.services.locks, RedisLockManager)
    return runtime.services.locks


def _poll(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_read_only_owner_semantics_and_fencing(redis_server):
    _, url = redis_server
    locks = _locks(url)
    first = locks.set_read_only("team/app", 30, "alice")
    assert first is not None and first.owner == "alice"
    assert locks.read_only("team/app") and not locks.read_only("team/other")
    assert locks.set_read_only("team/app", 30, "bob") is None  # SET NX: held by alice
    again = locks.set_read_only("team/app", 60, "alice")  # the owner may extend
    assert again is not None and again.token > first.token  # fencing tokens only grow
    assert not locks.clear_read_only("team/app", "bob")  # compare-and-delete: not bob's
    assert locks.read_only("team/app")
    assert locks.clear_read_only("team/app", "alice")
    assert not locks.read_only("team/app")
    third = locks.set_read_only("team/app", 30, "bob")
    assert third is not None and third.token > again.token
    assert locks.clear_read_only("team/app")  # owner None: the operator's override
    raw = redis.Redis.from_url(url)
    assert raw.get("regmw:{repository:team/app}:readonly:fence") == str(third.token).encode()


def test_read_only_expires_and_lists_with_ttl(redis_server):
    _, url = redis_server
    locks = _locks(url)
    locks.set_read_only("a/one", 0.1, "x")
    locks.set_read_only("b/two", 100, "x")
    listed = locks.list_read_only()
    assert set(listed) <= {"a/one", "b/two"} and 99 < listed["b/two"] <= 100
    assert _poll(lambda: not locks.read_only("a/one"))
    assert locks.list_read_only().keys() == {"b/two"}
    assert locks.set_read_only("a/one", 10, "y") is not None  # expired: anyone may take it


def test_cli_readonly_against_redis(redis_server, tmp_path, capsys):
    _, url = redis_server
    config = tmp_path / "regmw.toml"
    config.write_text(f'[regmw]\nplugins = ["redis"]\nentry_points = false\n[redis]\nurl = "{url}"\n')
    assert cli(["-c", str(config), "readonly", "set", "team/app", "--ttl", "3600"]) == 0
    assert "team/app read-only for 3600s" in capsys.readouterr().out
    assert _locks(url).read_only("team/app")
    assert cli(["-c", str(config), "readonly", "set", "team/app", "--owner", "someone-else"]) == 1
    assert cli(["-c", str(config), "readonly", "list"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("team/app\t") and 3590 <= int(line.split("\t")[1].rstrip("s")) <= 3600
    assert cli(["-c", str(config), "readonly", "clear", "team/app"]) == 0
    assert not _locks(url).read_only("team/app")
    assert cli(["-c", str(config), "readonly", "clear", "team/app"]) == 1


def test_no_write_admitted_while_locked_and_lock_expires_after_holder_sigkill(redis_server):
    _, url = redis_server
    raw = redis.Redis.from_url(url)
    with redis_apps.holder_process(redis_apps.readonly_holder, (url, "team/app", 1.5)) as holder:
        statuses = redis_apps.run_workers(redis_apps.writer, (url, "team/app", 40), 4)
        assert holder.is_alive()  # the lock was held (and renewed past its 1.5 s TTL) throughout
        assert statuses == [{503: 40}] * 4
        assert raw.get("test:admitted:PUT") is None  # the app never saw a write

        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        locks = _locks(url)
        assert locks.read_only("team/app")  # not released: the holder died holding it
        assert _poll(lambda: not locks.read_only("team/app"), 10), "lock outlived its TTL"
        assert redis_apps.run_workers(redis_apps.writer, (url, "team/app", 5), 2) == [{201: 5}] * 2
        assert int(raw.get("test:admitted:PUT")) == 10


def test_semaphore_never_exceeds_n_holders_across_8_processes(redis_server):
    _, url = redis_server
    outcomes = redis_apps.run_workers(redis_apps.slot_worker, (url, "gc", 2, 5, 20_000), 8)
    assert sum(o["done"] for o in outcomes) == 40  # every worker got its turns
    assert max(o["peak"] for o in outcomes) == 2  # two at once happened, three never
    assert sum(o["refused"] for o in outcomes) > 0  # and the semaphore did turn workers away
    assert _locks(url).slot_holders("gc") == 0


def test_slot_of_a_sigkilled_holder_frees_after_ttl(redis_server):
    _, url = redis_server
    with redis_apps.holder_process(redis_apps.slot_holder, (url, "compactor", 1.0)) as holder:
        locks = _locks(url)
        with pytest.raises(SlotUnavailable):
            with locks.cluster_slot("compactor", 1, ttl=5):
                pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(10)
        assert _poll(lambda: locks.slot_holders("compactor") == 0, 10)
        with locks.cluster_slot("compactor", 1, ttl=5) as lease:
            assert lease.token >= 2 and not lease.lost.is_set()


def test_lease_is_renewed_while_held_and_loss_is_detected(redis_server):
    proc, url = redis_server
    locks = _locks(url)
    raw = redis.Redis.from_url(url)
    with locks.cluster_slot("gc", 1, ttl=0.3) as lease:
        # renewed: still held after several TTLs (polled, not slept)
        start = time.monotonic()
        assert _poll(lambda: time.monotonic() - start > 1.0 and locks.slot_holders("gc") == 1, 5)
        assert not lease.lost.is_set()
        raw.delete("regmw:{slot:gc}:holders")  # taken away (as an expiry during a long pause would)
        assert lease.lost.wait(5)
    with locks.cluster_slot("gc", 1, ttl=0.3) as lease:
        stop(proc)  # Redis gone: renewal fails until the TTL has passed, then the lease is lost
        assert lease.lost.wait(5)
    with pytest.raises(BackendUnavailable):
        with locks.cluster_slot("gc", 1):
            pass


def test_hold_read_only_python_api(redis_server):
    _, url = redis_server
    locks = _locks(url)
    with locks.hold_read_only("team/app", ttl=0.3) as lease:
        start = time.monotonic()
        assert _poll(lambda: time.monotonic() - start > 1.0 and locks.read_only("team/app"), 5)
        assert not lease.lost.is_set()
        with pytest.raises(SlotUnavailable):
            with locks.hold_read_only("team/app", ttl=5):
                pass
    assert not locks.read_only("team/app")


def test_read_only_check_from_threads_is_consistent(redis_server):
    """Many threads of one process share the pool; every answer is right."""
    _, url = redis_server
    locks = _locks(url)
    locks.set_read_only("team/app", 30, "x")
    answers = []

    def check():
        answers.extend(locks.read_only("team/app") for _ in range(50))

    threads = [threading.Thread(target=check) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert answers == [True] * 400


def _record_renewals(locks: RedisLockManager, url: str, holders_key: str, owner_of) -> list[tuple[float, float]]:
    """Wrap the slot renewal: after each one Redis accepted, record the slot's server-side expiry.

    Each record is ``(lower bound of the expiry on this process's monotonic clock,
    send time of the renewal)``: the expiry score and the server's TIME are read
    together, and a TIME taken after local ``t0`` maps to a local time >= ``t0``.
    """
    raw = redis.Redis.from_url(url, socket_timeout=0.5)
    renew = locks._renew_slot
    records: list[tuple[float, float]] = []

    def recording(keys, args):
        sent = time.monotonic()
        result = renew(keys=keys, args=args)
        if result == 1:
            try:
                t0 = time.monotonic()
                pipe = raw.pipeline(transaction=False)
                pipe.time()
                pipe.zscore(holders_key, owner_of())
                (seconds, micros), score = pipe.execute()
                records.append((t0 + (score - (seconds * 1000 + micros / 1000)) / 1000, sent))
            except redis.RedisError:  # Redis went away between the renewal and the read
                records.append((sent + args[1] / 1000, sent))  # the server ran it no earlier than it was sent
        return result

    locks._renew_slot = recording
    return records


def test_slot_loss_is_declared_before_the_server_could_expire_it(redis_server):
    """Redis stops: ``lease.lost`` is set strictly before the slot's server-side expiry.

    Otherwise another process could take the slot while this one still works: N+1 holders.
    """
    proc, url = redis_server
    locks = _locks(url)
    owner = []
    records = _record_renewals(locks, url, "regmw:{slot:gc}:holders", lambda: owner[0])
    ttl = 1.5
    with locks.cluster_slot("gc", 1, ttl=ttl) as lease:
        owner.append(lease.owner)
        assert _poll(lambda: len(records) >= 2, 10), "the slot was not renewed"
        stop(proc)
        assert not lease.lost.is_set()
        assert lease.lost.wait(10)
        lost_at = time.monotonic()  # no earlier than the moment the event was set
    expiry, sent = records[-1]  # the last renewal Redis accepted before it stopped
    assert sent + ttl <= expiry + 0.05  # the server's expiry is (about) no earlier than send time + ttl
    assert lost_at < expiry, f"lost {lost_at - expiry:+.3f}s after the server-side expiry"
    assert lost_at < sent + ttl


def test_slot_loss_is_declared_in_time_even_when_a_renewal_hangs(redis_server):
    """A Redis that accepts connections but never answers (paused behind a frozen link):

    the renewal blocks for its whole socket timeout, longer than the margin, and
    the loss must still be declared before the slot's expiry.
    """
    _, url = redis_server
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    proxy = _FreezableProxy(port)
    try:
        runtime = build({"regmw": {"plugins": ["redis"], "entry_points": False},
                         "redis": {"url": f"redis://127.0.0.1:{proxy.port}/0", "socket_timeout": 3.0,
                                   "connect_timeout": 3.0}}, environ={})
        locks = runtime.services.locks
        owner = []
        records = _record_renewals(locks, url, "regmw:{slot:gc}:holders", lambda: owner[0])
        ttl = 1.5
        with locks.cluster_slot("gc", 1, ttl=ttl) as lease:
            owner.append(lease.owner)
            assert _poll(lambda: len(records) >= 1, 10), "the slot was not renewed"
            proxy.freeze()  # renewals now hang for their 3 s socket timeout (x2 with the retry)
            assert lease.lost.wait(10)
            lost_at = time.monotonic()
            proxy.close()  # unblock the hung renewal, so leaving the block does not wait for its timeouts
        expiry, sent = records[-1]  # the last renewal Redis accepted (one held by the freeze only extends it)
        assert lost_at < expiry, f"lost {lost_at - expiry:+.3f}s after the server-side expiry"
        assert lost_at < sent + ttl
    finally:
        proxy.close()


class _FreezableProxy:
    """A TCP relay to a real Redis whose traffic can be held (a network partition, in-process)."""

    def __init__(self, target_port: int) -> None:
        import socket

        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = threading.Event()
        self.sockets: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def freeze(self) -> None:
        self.flowing.clear()

    def _accept(self) -> None:
        import socket

        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source, destination) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                return
            while not self.flowing.wait(0.05):  # hold the bytes while frozen
                if self.closed.is_set():
                    return
            try:
                destination.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        self.flowing.set()
        self.listener.close()
        for sock in self.sockets:
            try:
                sock.close()
            except OSError:
                pass
