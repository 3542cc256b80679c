"""The ``jobs`` plugin (dramatiq's Redis broker) on a real Redis Cluster (3 masters + 3 replicas on loopback).

dramatiq's dispatch script builds its key names in Lua from the namespace, so
on a Cluster the plugin makes the namespace a hash tag: every queue key in one
slot. These tests run jobs through a real dramatiq worker on the cluster, and
show that without the tag dramatiq's broker fails there.
"""
from __future__ import annotations

import threading
import time
import uuid

import dramatiq
import pytest
import redis
from dramatiq.brokers.redis import RedisBroker

from regmw import build
from regmw.jobs import Job, JobContext
from regmw.plugins import hookimpl
from regmw_jobs.queue import broker_namespace
from regmw_redis.cluster import slot_of

pytestmark = pytest.mark.services


class Recorder:
    """A test plugin: job ``record`` appends its ``n`` (failing the first attempt of ``n == 3``) and keeps fenced state."""

    def __init__(self) -> None:
        self.ran: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    @hookimpl
    def regmw_jobs(self, config):
        def run(context: JobContext, n: int) -> None:
            with self.lock:
                self.ran.append((n, context.attempt))
            if n == 3 and context.attempt == 1:
                raise RuntimeError("first attempt of 3 fails")
            jobs = context.services.jobs
            assert jobs.set_state(f"item-{n}", {"n": n}, token=context.attempt)
            assert not jobs.set_state(f"item-{n}", {"n": -1}, token=0)  # an older token cannot overwrite

        return [Job("record", run, max_retries=3)]


def _runtime(url: str, namespace: str, recorder: Recorder):
    config = {"regmw": {"plugins": ["redis", "jobs"], "entry_points": False},
              "redis": {"url": url, "namespace": namespace},
              "jobs": {"namespace": namespace + "-jobs", "min_backoff": 0.05, "max_backoff": 0.1}}
    return build(config, environ={}, plugins=[recorder])


def test_jobs_run_through_dramatiq_on_the_cluster(redis_cluster):
    """20 jobs (one failing once) enqueued on the cluster, run by a dramatiq worker: all done, state fenced."""
    namespace = "j" + uuid.uuid4().hex[:10]
    recorder = Recorder()
    runtime = _runtime(redis_cluster.url, namespace, recorder)
    queue = runtime.services.jobs
    assert runtime.services.redis.cluster and queue.namespace == "{" + namespace + "-jobs}"
    ids = [queue.enqueue("record", n=n) for n in range(20)]
    stop = threading.Event()
    worker = threading.Thread(target=queue.work, args=(stop, 2), daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            done = {record.id for record in queue.status("record") if record.state == "done"}
            if done >= set(ids):
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"jobs not done in 20s: {[(r.id, r.state) for r in queue.status('record')]}")
    finally:
        stop.set()
        worker.join(20)
    assert sorted(n for n, _ in recorder.ran) == sorted([*range(20), 3])  # 3 ran twice: its retry
    assert (3, 2) in recorder.ran
    assert {record.attempts for record in queue.status("record") if record.id == ids[3]} == {2}
    assert queue.get_state("item-7") == {"n": 7}
    # every key the queue wrote is in the namespace's slot (dramatiq's queues, acks, heartbeats, our records)
    written = set()
    for port in redis_cluster.alive_ports():
        node = redis_cluster.node(port)
        if node.info("replication")["role"] == "master":
            written.update(key.decode() for key in node.scan_iter(match=queue.namespace.replace("{", "\\{")
                                                                  .replace("}", "\\}") + ":*", count=1000))
    assert f"{queue.namespace}:regmw:records" in written
    assert any("__heartbeats__" in key for key in written) and len(written) >= 4, written
    assert {slot_of(key) for key in written} == {slot_of(queue.namespace)}


def test_dramatiq_without_a_hash_tag_fails_on_the_cluster(redis_cluster):
    """Why the tag: dramatiq's script declares the namespace as its one key and reaches others from Lua."""
    client = _runtime(redis_cluster.url, "j" + uuid.uuid4().hex[:10], Recorder()).services.redis.client
    namespace = next(name for name in (f"untagged-{index}" for index in range(1000))  # keys on two masters, for sure
                     if client.get_node_from_key(name).name != client.get_node_from_key(f"{name}:default.msgs").name)
    broker = RedisBroker(client=client, namespace=namespace)
    actor = dramatiq.Actor(lambda: None, broker=broker, actor_name="noop", queue_name="default", priority=0,
                           options={})
    with pytest.raises(redis.ResponseError, match="non local key"):
        actor.send()


def test_broker_namespace_tags_only_on_a_cluster():
    assert broker_namespace("regmw-jobs", cluster=False) == "regmw-jobs"
    assert broker_namespace("regmw-jobs", cluster=True) == "{regmw-jobs}"
    assert broker_namespace("a{jobs}b", cluster=True) == "a{jobs}b"  # already one tag: kept
    assert broker_namespace("a{}b", cluster=True) == "{a{}b}"  # an empty {} is no tag in Redis
