"""A permanently failing endpoint: it does not hold the others back, its events are parked, replay delivers them."""
from __future__ import annotations

import threading

import pytest

from regmw_notify.endpoints import parse_endpoints
from regmw_notify.ops import Operations
from regmw_notify.sink import NotifySink
from regmw_notify.stream import RedisStreams
from regmw_redis.locks import RedisLockManager

from .servers.notify_apps import Connection
from .servers.webhook_receiver import first_deliveries
from .test_notify_delivery import check_order, endpoint, events_for, wait_until

pytestmark = pytest.mark.services
LOOPBACK = __import__("ipaddress").ip_network("127.0.0.0/8")


class RunningWorker:
    def __init__(self, streams, endpoints):
        from regmw_notify.worker import Worker

        self.stop = threading.Event()
        locks = RedisLockManager(streams.connection)
        self.worker = Worker(streams, locks, endpoints, [LOOPBACK], lease_ttl=1.0, claim_idle=0.6)
        self.thread = threading.Thread(target=self.worker.run, args=(self.stop,), daemon=True)
        self.thread.start()

    def close(self):
        self.stop.set()
        self.thread.join(10)


def test_failing_endpoint_is_parked_others_flow_and_replay_delivers(redis_server, webhook_receiver, tmp_path):
    good, bad = webhook_receiver(), webhook_receiver()
    bad.status = 503
    streams = RedisStreams(Connection(redis_server[1], namespace="parking"), 4)
    sink = NotifySink(streams, tmp_path / "spool")
    sent = events_for(10, 10)
    for event in sent:
        sink.emit(event)
    tables = [endpoint(good, "good"), endpoint(bad, "bad", max_age=3600)]
    first = RunningWorker(streams, parse_endpoints(tables, [LOOPBACK]))
    try:
        # one lane per endpoint: the good one gets everything while the bad one has not taken a single event
        wait_until(lambda: good.count() >= len(sent), 20, "the good endpoint's deliveries")
        assert bad.refused > 0 and bad.count() == 0
    finally:
        first.close()
    check_order(good.snapshot(), sent)

    tables[1]["max_age"] = 0.3  # shortened: every event is now past it
    second = RunningWorker(streams, parse_endpoints(tables, [LOOPBACK]))
    ops = Operations(parse_endpoints(tables, [LOOPBACK]), streams)
    try:
        wait_until(lambda: len(ops.dead_letters("bad")) == len(sent), 20, "every event parked for 'bad'")
        status = ops.status()
        assert status["bad"]["parked"] == len(sent) and status["bad"]["depth"] == 0
        assert status["good"]["parked"] == 0 and status["good"]["depth"] == 0
        letter = ops.dead_letters("bad")[0]
        assert "HTTP 503" in letter["reason"] and ops.show("bad", letter["letter"])["id"] == letter["id"]

        bad.status = 200
        assert ops.replay("bad") == len(sent)
        wait_until(lambda: bad.count() >= len(sent), 20, "replayed events at the recovered endpoint")
    finally:
        second.close()
    check_order(bad.snapshot(), sent)  # one shard's dead letters replay in their order
    assert len(first_deliveries(good.snapshot())) == len(good.snapshot()) == len(sent), "replay went to 'bad' only"
    assert ops.dead_letters("bad") == []
