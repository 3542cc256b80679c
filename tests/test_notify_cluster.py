"""Notifications on a real Redis Cluster (3 masters + 3 replicas on loopback).

Requests through the middleware with ``[redis] url = "redis+cluster://..."``
make events; ``regmw notifications worker`` processes (the same worker, in a
subprocess) deliver them to a real receiver: every event, in order per
repository, signatures verifying. Every notify script call touches one slot
(a shard's stream, fence and dead letters share the ``{notify-shard:N}`` tag),
and ``wait_replicas`` waits on the master that took each XADD.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable

import pytest
import redis
from redis.exceptions import SlotNotCoveredError
from werkzeug.test import Client

from regmw import RegistryMiddleware
from regmw_notify import make_worker
from regmw_notify.events import plugin_event
from regmw_notify.ops import Operations
from regmw_notify.sink import NotifySink
from regmw_notify.stream import NotReplicated, RedisStreams, _text, shard_of
from regmw_redis.cluster import slot_of

from .servers.redis_apps import registry_app
from .servers.webhook_receiver import SECRET, first_deliveries
from .servers._util import stop
from .test_notify_delivery import wait_until
from .test_redis_cluster import _record_script_calls

pytestmark = pytest.mark.services

SHARDS = 8


def _ns() -> str:
    return "n" + uuid.uuid4().hex[:10]


def _endpoint(receiver, **extra) -> dict:
    table = {"name": "hook", "url": receiver.url, "secrets": [SECRET], "timeout": 0.5,
             "retry_schedule": [0, 0.05, 0.1], "jitter": 0.2}
    table.update(extra)
    return table


def _config(url: str, namespace: str, endpoints: list[dict], spool_dir, **notifications) -> dict:
    section = {"endpoints": endpoints, "allowed_networks": ["127.0.0.0/8"], "shards": SHARDS,
               "spool_dir": str(spool_dir), "lease_ttl": 1.5}
    section.update(notifications)
    return {
        "regmw": {"plugins": ["redis", "notifications"], "entry_points": False},
        # (the socket outlasts WAIT, as start-up requires)
        "redis": {"url": url, "namespace": namespace, "socket_timeout": max(0.5, section.get("wait_timeout", 0) + 0.5),
                  "connect_timeout": 0.5},
        "notifications": section,
    }


def _cli_worker(url: str, namespace: str, receiver, tmp_path) -> subprocess.Popen:
    """``regmw -c worker.toml notifications worker``, the command an operator runs (at most 4 of the 8 shards)."""
    tmp_path.mkdir()
    config = tmp_path / "worker.toml"
    config.write_text("\n".join([
        "[regmw]", 'plugins = ["redis", "notifications"]', "entry_points = false",
        "[redis]", f"url = {json.dumps(url)}", f"namespace = {json.dumps(namespace)}",
        "[notifications]", f"shards = {SHARDS}", "lease_ttl = 3.0", "max_shards_per_worker = 4", 'allowed_networks = ["127.0.0.0/8"]',
        f"spool_dir = {json.dumps(str(tmp_path / 'cli-spool'))}",
        f'endpoints = [{{ name = "hook", url = {json.dumps(receiver.url)}, secrets = [{json.dumps(SECRET)}], '
        'timeout = 0.5, retry_schedule = [0, 0.05, 0.1] }]', ""]))
    return subprocess.Popen([sys.executable, "-m", "regmw.cli", "-c", str(config), "notifications", "worker"],
                            stderr=open(tmp_path / "stderr", "w"))


def _push(client: Client, repository: str, tag: int) -> None:
    response = client.put(f"/v2/{repository}/manifests/{tag}", data=b"{}", buffered=True,
                          headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert response.status_code == 201


def _check_order(firsts: list[dict], expected: int) -> None:
    assert len(firsts) == expected
    last: dict[str, int] = {}
    for event in firsts:
        repository, tag = event["target"]["repository"], int(event["target"]["tag"])
        assert tag == last.get(repository, 0) + 1, f"{repository}: {tag} after {last.get(repository)}"
        last[repository] = tag


def test_pushes_on_cluster_reach_the_receiver_in_order_per_repository(redis_cluster, webhook_receiver, tmp_path):
    """300 pushes over 20 repositories, two worker processes sharing 8 shards: every event, in order, signed.

    Both are ``regmw notifications worker`` processes, each allowed 4 shards,
    so both must deliver (their consumers show up in the shards' groups).
    """
    receiver = webhook_receiver()
    namespace = _ns()
    config = _config(redis_cluster.url, namespace, [_endpoint(receiver)], tmp_path / "spool", wait_replicas=1,
                     wait_timeout=1.5)  # long: a replica slowed by a busy machine must not spool what this checks
    middleware = RegistryMiddleware(registry_app, config, environ={})
    assert middleware.services.redis.cluster
    client = Client(middleware)
    workers = [_cli_worker(redis_cluster.url, namespace, receiver, tmp_path / f"worker{index}") for index in range(2)]
    repositories = [f"team{index % 5}/app{index}" for index in range(20)]
    try:
        for tag in range(1, 16):
            for repository in repositories:
                _push(client, repository, tag)
        wait_until(lambda: len(first_deliveries(receiver.snapshot())) >= 300, 30, "300 events delivered")
        assert all(worker.poll() is None for worker in workers)
    finally:
        for worker in workers:
            stop(worker)
        middleware.services.events.close()
    firsts = first_deliveries(receiver.snapshot())
    _check_order(firsts, 300)
    assert all(event["action"] == "push" and event["request"]["method"] == "PUT" for event in firsts)
    assert receiver.bad_signatures == 0
    # nothing was spooled: every XADD reached its shard's master and WAIT saw a replica confirm it
    assert not list((tmp_path / "spool").glob("spool-*.sqlite3"))
    streams = middleware.services.events.streams
    used = {slot_of(streams.stream(shard)) for shard in range(SHARDS)}
    nodes = {streams.client.get_node_from_key(streams.stream(shard)).name for shard in range(SHARDS)}
    assert len(used) == SHARDS and len(nodes) > 1  # the shards really are spread over the masters
    pids = {_text(consumer["name"]).split(":")[1] for shard in range(SHARDS)
            for consumer in streams.client.xinfo_consumers(streams.stream(shard), "hook")}
    assert pids == {str(worker.pid) for worker in workers}


def test_every_notify_script_call_stays_in_one_slot(redis_cluster, webhook_receiver, tmp_path, monkeypatch):
    """Emit, deliver (take fence, fenced read and ack), park and replay on the cluster: each script call, one slot."""
    calls = _record_script_calls(monkeypatch)
    receiver = webhook_receiver()
    namespace = _ns()
    refusing = webhook_receiver()
    refusing.status = 503  # every event to "parks" fails, and is older than its max_age: parked
    endpoints = [_endpoint(receiver), _endpoint(refusing, name="parks", max_age=0.0, retry_schedule=[0])]
    middleware = RegistryMiddleware(registry_app, _config(redis_cluster.url, namespace, endpoints,
                                                          tmp_path / "spool"), environ={})
    sink = middleware.services.events
    sent = [plugin_event("push", f"team/app{index}", tag="1") for index in range(24)]
    for event in sent:
        sink.emit(event)
    streams: RedisStreams = sink.streams
    stop_event = threading.Event()
    worker = make_worker(middleware.services)
    thread = threading.Thread(target=worker.run, args=(stop_event,), daemon=True)
    try:
        thread.start()
        wait_until(lambda: len(first_deliveries(receiver.snapshot())) >= len(sent), 20, "deliveries to hook")
        operations = Operations(worker.endpoints, streams)
        wait_until(lambda: len(operations.dead_letters("parks")) == len(sent), 20, "every event parked for 'parks'")
        assert operations.replay("parks") == len(sent)
    finally:
        stop_event.set()
        thread.join(10)
        sink.close()
    scripts = {script for script, _ in calls}
    firsts = {line.strip().splitlines()[0] for line in (
        "local current = tonumber(redis.call('GET', KEYS[1]) or '0')",
        "if tonumber(redis.call('GET', KEYS[1]) or '0') ~= tonumber(ARGV[1]) then return -1 end",
        "local moved = 0")}
    assert firsts <= scripts, scripts
    assert any(len(keys) == 3 for _, keys in calls)  # the park script: fence, stream, dead letters
    for script, keys in calls:
        assert len({slot_of(key) for key in keys}) == 1, f"{script}: {keys} span slots"
    assert receiver.bad_signatures == 0



def _waits(redis_cluster) -> dict[int, int]:
    """WAIT calls each node has served (INFO commandstats)."""
    out = {}
    for port in redis_cluster.alive_ports():
        stats = redis_cluster.node(port).info("commandstats")
        out[port] = int(stats.get("cmdstat_wait", {}).get("calls", 0))
    return out


def test_wait_replicas_waits_on_the_master_that_took_the_event(redis_cluster, tmp_path):
    """WAIT goes, on the XADD's own connection, to the shard's master only; 2 replicas asked of 1 is a spooled copy.

    (A cluster pipeline would send WAIT to every master on other connections
    and add up their replica counts: 3 masters x 1 replica would "confirm"
    ``wait_replicas = 2`` of a write no replica had seen.)
    """
    namespace = _ns()
    config = _config(redis_cluster.url, namespace, [], tmp_path / "spool", wait_replicas=1, wait_timeout=1.5)
    middleware = RegistryMiddleware(registry_app, config, environ={})
    sink = middleware.services.events
    streams: RedisStreams = sink.streams
    event = plugin_event("push", "team/app", tag="1")
    master = streams.client.get_node_from_key(streams.stream(shard_of("team/app", SHARDS))).port
    before = _waits(redis_cluster)
    sink.emit(event)
    after = _waits(redis_cluster)
    assert {port: after[port] - before[port] for port in after} == {
        port: 1 if port == master else 0 for port in after}
    assert not list((tmp_path / "spool").glob("spool-*.sqlite3"))
    # a batch over several masters (the spool forwarder's path): one WAIT on each master it wrote to
    entries = [(f"team/app{index}", b"{}") for index in range(16)]
    masters = {streams.client.get_node_from_key(streams.stream(shard_of(repo, SHARDS))).port for repo, _ in entries}
    before = _waits(redis_cluster)
    ids = streams.add(entries)
    after = _waits(redis_cluster)
    assert len(ids) == 16 and all(ids)
    assert {port for port in after if after[port] > before[port]} == masters and len(masters) > 1
    for (repository, _), entry_id in zip(entries, ids, strict=True):
        stored = streams.client.xrange(streams.stream(shard_of(repository, SHARDS)), entry_id, entry_id)
        assert stored[0][1][b"r"] == repository.encode()
    sink.close()
    strict = RedisStreams(middleware.services.redis, SHARDS, wait_replicas=2, wait_timeout=0.05)
    with pytest.raises(NotReplicated, match="1 of 2"):
        strict.add([("team/app", b"{}")])


class _SlotWithoutMaster:
    """A cluster connection whose every command meets a slot no master serves (both its nodes down)."""

    cluster = True
    namespace = "regmw"

    class client:  # noqa: N801 - stands in for the RedisCluster instance
        @staticmethod
        def register_script(script):
            return None

        @staticmethod
        def execute_command(*args, **kwargs):  # the XADD of an event (RedisStreams.add)
            raise SlotNotCoveredError("Command # 1 (XADD ...) could not be executed: slot 1234 not covered")

    @staticmethod
    def key(*parts: str) -> str:
        return ":".join(("regmw", *parts))


def test_a_slot_without_master_counts_as_redis_down_and_the_event_is_spooled(tmp_path):
    """redis-py raises SlotNotCoveredError, a RedisClusterException that is not a RedisError: still "Redis down"."""
    sink = NotifySink(RedisStreams(_SlotWithoutMaster(), SHARDS), tmp_path / "spool", breaker_seconds=5)
    sink.emit(plugin_event("push", "team/app", tag="1"))
    sink.emit(plugin_event("push", "team/app", tag="2"))  # the breaker is open: straight to the spool
    assert sink.spool.count() == 2
    assert [row.repository for row in sink.spool.read(0, 10)] == ["team/app", "team/app"]


def _master_killer(group, key: str) -> tuple[Callable[[], None], Callable[[], bool]]:
    """(kill, promoted): SIGKILL the master serving ``key``'s slot; has a replica taken that slot over?"""
    victim = group.master_of(key)

    def kill() -> None:
        group.process(victim).send_signal(signal.SIGKILL)
        group.process(victim).wait(10)

    def promoted() -> bool:
        try:
            return group.master_of(key) != victim
        except (redis.RedisError, RuntimeError):
            return False

    return kill, promoted


def test_a_master_failover_loses_no_event_with_wait_replicas(redis_cluster_fresh, tmp_path):
    """Kill the master of a shard mid-stream: events confirmed by WAIT survive, the rest are spooled and forwarded.

    The WAIT pipelines bypass the cluster client's error handling, so the
    stream re-reads the slot map itself after a failure; without that every
    later XADD would go on to the dead master and the spool would never drain.
    """
    group = redis_cluster_fresh
    config = _config(group.url, _ns(), [], tmp_path / "spool", wait_replicas=1, wait_timeout=0.2,
                     breaker_seconds=0.2)
    middleware = RegistryMiddleware(registry_app, config, environ={})
    sink = middleware.services.events
    streams: RedisStreams = sink.streams
    key = streams.stream(shard_of("team/app", SHARDS))
    sent: list[str] = []

    def emit() -> None:
        event = plugin_event("push", "team/app", tag=str(len(sent) + 1))
        sink.emit(event)
        sent.append(event["id"])

    def stored() -> list[str]:
        master = group.node(group.master_of(key))
        return [json.loads(fields[b"e"])["id"] for _, fields in master.xrange(key)]

    try:
        for _ in range(20):
            emit()
        assert not list((tmp_path / "spool").glob("spool-*.sqlite3"))  # all confirmed by the replica
        kill, promoted = _master_killer(group, key)
        kill()

        # requests keep coming while the cluster fails over, and for a while after it (the promoted
        # replica has no replica of its own: WAIT confirms nothing, so these are spooled and forwarded)
        deadline = time.monotonic() + 30
        while not promoted() and time.monotonic() < deadline:
            emit()
            time.sleep(0.05)  # pacing only: a request every 50 ms
        assert promoted(), "no replica took over the shard's slot"
        for _ in range(20):
            emit()

        def all_stored() -> bool:
            try:
                return set(sent) <= set(stored())
            except (redis.RedisError, RuntimeError):
                return False

        wait_until(all_stored, 30, "every event on the promoted master")
        ids = stored()
        firsts = list(dict.fromkeys(ids))  # at-least-once: a spooled copy of a confirmed one may repeat
        assert firsts[:20] == sent[:20]  # the confirmed ones, in order, on the promoted replica
    finally:
        sink.close()


def _push_retrying(client: Client, repository: str, tag: int, deadline: float) -> None:
    """Push as a client does while the slot has no master: the read-only check fails closed (503), so retry."""
    while True:
        response = client.put(f"/v2/{repository}/manifests/{tag}", data=b"{}", buffered=True,
                              headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
        if response.status_code == 201:
            return
        assert response.status_code == 503 and time.monotonic() < deadline, response.get_data(as_text=True)
        time.sleep(0.05)  # a client's back-off, not a wait for an outcome


def pushes_and_deliveries_across_a_failover(url: str, receiver, tmp_path, repositories: list[str],
                                            kill: Callable[[], None], promoted: Callable[[], bool]) -> None:
    """Two CLI workers deliver while ``kill()`` takes the master down; pushes go on until ``promoted()``.

    Then every event pushed (at least 20 per repository) must reach the
    receiver, in order per repository (first deliveries), signatures verifying.
    """
    namespace = _ns()
    config = _config(url, namespace, [], tmp_path / "spool", wait_replicas=1, wait_timeout=0.2, breaker_seconds=0.2)
    middleware = RegistryMiddleware(registry_app, config, environ={})
    client = Client(middleware)
    workers = [_cli_worker(url, namespace, receiver, tmp_path / f"worker{index}") for index in range(2)]
    tags = 0
    try:
        deadline = time.monotonic() + 60
        for tags in range(1, 11):
            for repository in repositories:
                _push_retrying(client, repository, tags, deadline)
        wait_until(lambda: len(first_deliveries(receiver.snapshot())) >= 5, 20, "the workers delivering")
        kill()
        while not (tags >= 20 and promoted()):  # pushes go on through the failover, and a while after it
            assert time.monotonic() < deadline, "no replica was promoted"
            tags += 1
            for repository in repositories:
                _push_retrying(client, repository, tags, deadline)
        expected = tags * len(repositories)
        try:
            wait_until(lambda: len(first_deliveries(receiver.snapshot())) >= expected, 60,
                       f"{expected} events delivered")
        except AssertionError as exc:  # say what the workers said, for whoever reads a failed run
            logs = "\n".join((tmp_path / f"worker{index}" / "stderr").read_text()[-3000:] for index in range(2))
            raise AssertionError(f"{exc}; {len(first_deliveries(receiver.snapshot()))} arrived; "
                                 f"workers' stderr:\n{logs}") from None
        assert all(worker.poll() is None for worker in workers)
    finally:
        for worker in workers:
            stop(worker)
        middleware.services.events.close()
    _check_order(first_deliveries(receiver.snapshot()), expected)
    assert receiver.bad_signatures == 0


def test_delivery_goes_on_across_a_master_failover(redis_cluster_fresh, webhook_receiver, tmp_path):
    """Workers delivering while a shard's master is SIGKILLed: every event arrives, in order per repository.

    The workers' fenced reads and acks on the dead master fail, so they let
    its shards go and take them again once the replica is promoted; entries
    sent but not yet acknowledged there are sent again (duplicates, never a
    gap). Requests keep writing during the failover (their events spooled
    when WAIT cannot be confirmed, then forwarded); a write to the dead
    master's slots is refused with 503 until the promotion (the read-only
    check fails closed), and the client retries it.
    """
    group = redis_cluster_fresh
    repositories = [f"team{index % 3}/app{index}" for index in range(12)]
    key = "{notify-shard:%d}" % shard_of(repositories[0], SHARDS)  # the hash tag: the slot of that shard's keys
    kill, promoted = _master_killer(group, key)
    pushes_and_deliveries_across_a_failover(group.url, webhook_receiver(), tmp_path, repositories, kill, promoted)
