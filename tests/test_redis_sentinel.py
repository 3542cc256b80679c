"""Sentinel: the master is SIGKILLed mid-load; regmw keeps serving and follows the promotion."""
from __future__ import annotations

import signal
import time
from collections import Counter

import redis
from werkzeug.test import Client

from regmw import metrics
from regmw_redis.admission import RedisAdmission
from tests.servers.redis_apps import make_middleware

COUNTER = "regmw:ratelimit:LIMITER/repo/team/app/1000000/1/hour"


def _fail_opens() -> float:
    return metrics.REGISTRY.get_sample_value(
        "regmw_backend_errors_total", {"backend": "ratelimit", "action": "fail_open"}
    ) or 0.0


def test_master_sigkill_mid_load_keeps_serving_and_reconnects(redis_sentinel_group):
    group = redis_sentinel_group
    middleware = make_middleware(
        group.url,
        ratelimit={"rules": [{"name": "repo", "by": "repository", "limit": "1000000/hour"}]},
        readonly={"fail_closed_writes": False},
    )
    assert isinstance(middleware.services.admission, RedisAdmission)
    client = Client(middleware)
    replica = redis.Redis(port=group.replica_port, socket_timeout=1)
    statuses: Counter = Counter()

    def request(index: int) -> None:
        if index % 5 == 0:
            response = client.put("/v2/team/app/manifests/latest", data=b"{}")
        else:
            response = client.get("/v2/team/app/manifests/latest")
        statuses[response.status_code] += 1

    for index in range(50):
        request(index)
    assert statuses == Counter({200: 40, 201: 10})
    assert middleware.services.cache.get("before") is None

    def replicated() -> bool:
        return int(replica.get(COUNTER) or 0) == 50

    deadline = time.monotonic() + 10
    while not replicated() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert replicated()

    opens_before = _fail_opens()
    group.master.send_signal(signal.SIGKILL)  # mid-load: the loop below never stops sending
    group.master.wait(10)
    promoted_at = None
    deadline = time.monotonic() + 30
    index = 0
    while time.monotonic() < deadline and index < 50_000:
        request(index)
        index += 1
        if promoted_at is None and index % 20 == 0:
            try:
                if replica.info("replication")["role"] == "master" and int(replica.get(COUNTER) or 0) > 50:
                    promoted_at = index  # a request counted on the promoted replica
            except redis.RedisError:
                pass
        if promoted_at is not None and index >= promoted_at + 200:
            break
    assert promoted_at is not None, "regmw never wrote to the promoted master"
    assert set(statuses) <= {200, 201}, f"5xx while failing over: {statuses}"
    assert _fail_opens() > opens_before  # the outage happened, and was failed open
    assert group.master_address() == ("127.0.0.1", group.replica_port)

    # the last 200 requests all counted on the new master
    after = int(replica.get(COUNTER))
    request(1)
    assert int(replica.get(COUNTER)) == after + 1
    # the cache and the locks follow too
    middleware.services.cache.set("after", b"1", ttl=60)
    assert replica.get("regmw:cache:after") == b"1"
    assert middleware.services.locks.set_read_only("team/app", 30, "migrator") is not None
    assert client.put("/v2/team/app/manifests/latest", data=b"{}").status_code == 503
