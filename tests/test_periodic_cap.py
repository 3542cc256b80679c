"""A periodic job capped at N = 2, run by 5 `regmw worker` processes on a real Redis.

The job checks the cap itself (tests/servers/periodic_probe.py): never more
than 2 live holders, by fencing token. A SIGKILLed holder's slot is taken
over by another worker within the lease time (plus one turn of polling).
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from .migration_cluster import Cluster, wait_until
from .servers.periodic_probe import keys
from .servers.redis_server import start_redis
from .servers._util import stop

pytestmark = pytest.mark.services

LEASE = 1.5
EVERY = 0.1


def test_five_workers_never_more_than_two_holders_and_a_killed_slot_is_taken_over(tmp_path):
    proc, port = start_redis(tmp_path)
    prefix = f"probe{os.getpid()}"
    sections = {"jobs": {"namespace": f"{prefix}-jobs"}, "redis": {"socket_timeout": 0.3},
                "probe": {"instances": 2, "lease_ttl": LEASE, "every": EVERY, "prefix": prefix}}
    cluster = Cluster(tmp_path, f"redis://127.0.0.1:{port}/0",
                      plugins=["redis", "jobs", "tests.servers.periodic_probe"], sections=sections)
    live, violations, tokens = keys(prefix)
    try:
        workers = [cluster.start_worker(threads=1) for _ in range(5)]
        redis = cluster.redis

        def holders() -> list[tuple[int, int]]:
            return [tuple(map(int, m.decode().split(":"))) for m in redis.zrangebyscore(live, int(time.time() * 1000), "+inf")]

        wait_until(lambda: len(holders()) == 2, 30, "two holders")
        for _ in range(2):  # twice: SIGKILL a holder, another worker takes its slot within the lease
            token, pid = max(holders())
            victim = next(w for w in workers if w.pid == pid)
            known = {int(m.split(b":")[0]) for m in redis.lrange(tokens, 0, -1)}
            victim.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            victim.wait()
            workers.remove(victim)

            def taken_over(known: set[int] = known) -> bool:
                return any(t not in known for t, _ in holders()) and len(holders()) == 2

            wait_until(taken_over, 10, "the killed holder's slot taken over")
            took = time.monotonic() - killed_at
            assert took <= LEASE + EVERY + 1.0, f"slot taken over after {took:.2f}s (lease {LEASE}s)"
        # the survivors run on: 3 workers, 2 slots, a while longer
        deadline = time.monotonic() + 2 * LEASE
        wait_until(lambda: time.monotonic() > deadline, 3 * LEASE, "a few more turns", interval=0.1)
        assert redis.lrange(violations, 0, -1) == []
        assert len(holders()) == 2
        assert redis.llen(tokens) >= 4  # two initial holders and two take-overs at least
    finally:
        cluster.close()
        stop(proc)
