"""Events made by real requests through the middleware: durable before the response, spooled while Redis is down."""
from __future__ import annotations

import signal
import threading
import time

import pytest
import redis
from werkzeug.test import Client

from regmw import RegistryMiddleware
from regmw_notify import make_worker

from .servers.redis_apps import registry_app
from .servers.webhook_receiver import SECRET, first_deliveries
from .test_notify_delivery import aof_redis, wait_until  # noqa: F401, F811 - the fixture

pytestmark = pytest.mark.services

#: What a request may take while Redis is down: one refused connection (or at most
#: socket_timeout 0.25 s + connect_timeout 0.25 s if Redis hangs) plus one fsynced SQLite commit.
REQUEST_BOUND = 1.0


def notify_config(url: str, receiver, spool_dir, **notifications) -> dict:
    section = {
        "endpoints": [{"name": "hook", "url": receiver.url, "secrets": [SECRET], "timeout": 0.5,
                       "retry_schedule": [0, 0.05, 0.1]}],
        "allowed_networks": ["127.0.0.0/8"], "shards": 4, "spool_dir": str(spool_dir), "lease_ttl": 1.5,
        "breaker_seconds": 0.2,
    }
    section.update(notifications)
    return {
        "regmw": {"plugins": ["redis", "notifications"], "entry_points": False},
        "redis": {"url": url, "socket_timeout": 0.25, "connect_timeout": 0.25},
        "notifications": section,
        # writes must keep flowing while Redis is down, for the spool to have something to keep
        "readonly": {"fail_closed_writes": False},
    }


def push(client: Client, repository: str, tag: int) -> float:
    started = time.perf_counter()
    response = client.put(f"/v2/{repository}/manifests/{tag}", data=b"{}", buffered=True,
                          headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert response.status_code == 201
    return time.perf_counter() - started


def test_events_spool_while_redis_is_down_and_arrive_in_order_once_it_is_back(
    aof_redis, webhook_receiver, tmp_path  # noqa: F811
):
    receiver = webhook_receiver()
    middleware = RegistryMiddleware(registry_app, notify_config(aof_redis["url"], receiver, tmp_path / "spool"),
                                    environ={})
    client = Client(middleware)
    stop = threading.Event()
    worker = threading.Thread(target=make_worker(middleware.services).run, args=(stop,), daemon=True)
    worker.start()
    repositories = [f"team/app{index}" for index in range(20)]
    tags = {repository: 0 for repository in repositories}
    down_latencies = []

    def push_round(latencies=None) -> None:
        for repository in repositories:
            tags[repository] += 1
            took = push(client, repository, tags[repository])
            if latencies is not None:
                latencies.append(took)

    try:
        for _ in range(5):
            push_round()
        aof_redis["stop"]()
        for _ in range(10):  # 200 pushes while Redis is down: every event goes to the spool
            push_round(down_latencies)
        spooled = list((tmp_path / "spool").glob("spool-*.sqlite3"))
        assert spooled, "nothing was spooled"
        aof_redis["start"]()
        for _ in range(5):
            push_round()
        wait_until(lambda: len(first_deliveries(receiver.snapshot())) >= 400, 30, "all 400 events delivered")
    finally:
        stop.set()
        worker.join(10)
        middleware.services.events.close()
    firsts = first_deliveries(receiver.snapshot())
    assert len(firsts) == 400
    last: dict[str, int] = {}
    for event in firsts:
        repository, tag = event["target"]["repository"], int(event["target"]["tag"])
        assert tag == last.get(repository, 0) + 1, f"{repository}: {tag} after {last.get(repository)}"
        last[repository] = tag
        assert event["action"] == "push" and event["request"]["method"] == "PUT"
        assert event["target"]["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert receiver.bad_signatures == 0
    down_latencies.sort()
    p99 = down_latencies[int(len(down_latencies) * 0.99) - 1]
    assert p99 < REQUEST_BOUND, f"p99 {p99:.3f}s with Redis down"


def test_wait_for_replicas_that_do_not_confirm_keeps_a_spooled_copy(redis_server, tmp_path):
    """``wait_replicas``: an XADD that no replica confirmed counts as not durable, so the spool keeps a copy."""
    from regmw_notify.events import plugin_event
    from regmw_notify.sink import NotifySink
    from regmw_notify.stream import RedisStreams

    from .servers.notify_apps import Connection

    streams = RedisStreams(Connection(redis_server[1]), 2, wait_replicas=1, wait_timeout=0.01)
    sink = NotifySink(streams, tmp_path / "spool")
    sink.emit(plugin_event("push", "team/app", tag="1"))
    assert sum(streams.client.xlen(streams.stream(shard)) for shard in range(2)) == 1  # added...
    assert sink.spool.count() == 1  # ...and, unconfirmed, spooled too: delivered twice at worst, never lost
    assert sink.forward_once() and sink.spool.count() == 0  # the forwarder does not re-add it forever


@pytest.fixture
def master_and_replica(tmp_path):
    """(master process, master url, replica process) of a real redis-server and its replica, in sync."""

    from .servers._util import stop
    from .servers.redis_server import start_redis

    (tmp_path / "master").mkdir()
    (tmp_path / "replica").mkdir()
    master, port = start_redis(tmp_path / "master")
    replica, replica_port = start_redis(tmp_path / "replica", "--replicaof", "127.0.0.1", str(port))
    try:
        link = redis.Redis(port=replica_port)
        wait_until(lambda: link.info("replication").get("master_link_status") == "up", 10, "the replica in sync")
        yield master, f"redis://127.0.0.1:{port}/0", replica
    finally:
        replica.send_signal(signal.SIGCONT)
        stop(replica)
        stop(master)


def _forwarding_behind_a_stopped_replica(url: str, tmp_path, events: int, wait: bool = True):
    """A sink whose spool holds ``events`` unconfirmed events, its forwarder adding them in a thread."""
    from regmw_notify.events import plugin_event
    from regmw_notify.sink import NotifySink
    from regmw_notify.stream import RedisStreams

    from .servers.notify_apps import Connection

    streams = RedisStreams(Connection(url), 2, wait_replicas=1, wait_timeout=0.05)
    sink = NotifySink(streams, tmp_path / "spool")
    for tag in range(events):
        sink.emit(plugin_event("push", "team/app", tag=str(tag)))  # unconfirmed: added and spooled
    assert sink.spool.count() == events
    before = sum(streams.client.xlen(streams.stream(shard)) for shard in range(2))  # the first emit's XADD
    outcome: list = []

    def forward() -> None:
        try:
            outcome.append(sink.forward_once())
        except Exception as exc:  # noqa: BLE001 - the test looks at what it was
            outcome.append(exc)

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    if not wait:
        return sink, streams, thread, outcome, before + events
    wait_until(lambda: sum(streams.client.xlen(streams.stream(shard)) for shard in range(2)) == before + events,
               10, "the forwarder's XADDs on the master")
    return sink, streams, thread, outcome, before + events


def test_the_forwarder_keeps_its_copy_until_a_lagging_replica_has_the_events(master_and_replica, tmp_path):
    """A replica that is connected but behind (here: SIGSTOPped) has not got the forwarded events yet.

    Deleting the spooled copies then would lose them if the master died before
    the replica caught up; the forwarder waits for the replica instead, and
    does not add them again meanwhile.
    """
    _master, url, replica = master_and_replica
    replica.send_signal(signal.SIGSTOP)
    sink, streams, thread, outcome, added = _forwarding_behind_a_stopped_replica(url, tmp_path, 3)
    thread.join(0.5)  # the forwarder is still waiting for the replica (it would have returned at once before)
    assert thread.is_alive() and sink.spool.count() == 3
    replica.send_signal(signal.SIGCONT)
    thread.join(10)
    assert outcome == [True] and sink.spool.count() == 0
    assert sum(streams.client.xlen(streams.stream(shard)) for shard in range(2)) == added  # not added again
    sink.close()


def test_a_master_that_dies_before_its_replica_caught_up_leaves_the_events_spooled(master_and_replica, tmp_path):
    """The master is SIGKILLed while the forwarder waits for its stopped replica: nothing is deleted from the spool."""
    master, url, replica = master_and_replica
    replica.send_signal(signal.SIGSTOP)
    sink, _streams, thread, outcome, _added = _forwarding_behind_a_stopped_replica(url, tmp_path, 3)
    thread.join(0.5)
    assert thread.is_alive()  # waiting for the replica
    master.send_signal(signal.SIGKILL)
    master.wait(10)
    thread.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], redis.RedisError), outcome
    assert sink.spool.count() == 3  # the next forward adds them to whoever serves the slot then
    sink.close()


def test_an_acl_user_who_may_not_ask_role_gets_the_add_once_behaviour(master_and_replica, tmp_path):
    """``ROLE`` is ``@dangerous``: a user refused it cannot tell lagging replicas from none, so it does not wait."""
    _master, url, replica = master_and_replica
    admin = redis.Redis.from_url(url)
    admin.acl_setuser("forwarder", enabled=True, passwords=["+secret"], keys=["*"], channels=["*"],
                      commands=["+@all", "-role"])
    replica.send_signal(signal.SIGSTOP)
    limited = url.replace("redis://", "redis://forwarder:secret@")
    sink, _streams, thread, outcome, _added = _forwarding_behind_a_stopped_replica(limited, tmp_path, 2, wait=False)
    thread.join(10)
    assert outcome == [True] and sink.spool.count() == 0  # forwarded once, unconfirmed, and logged as such
    sink.close()
