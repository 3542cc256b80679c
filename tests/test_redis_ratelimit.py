"""Rate limits counted in Redis across processes admit no more than the limit."""
from __future__ import annotations

import multiprocessing

import pytest
import redis

from tests.servers import redis_apps

SPAWN = multiprocessing.get_context("spawn")


@pytest.mark.parametrize("hot_path", ["script", "limits"])
def test_limit_across_4_processes(redis_server, hot_path):
    _, url = redis_server
    rule = {"name": "repo", "by": "repository", "limit": "25/hour"}
    results = SPAWN.Queue()
    workers = [SPAWN.Process(target=redis_apps.ratelimit_worker, args=(url, hot_path, rule, 20, results)) for _ in range(4)]
    for process in workers:
        process.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for process in workers:
        process.join(30)
        assert process.exitcode == 0
    admitted = sum(outcome.get(200, 0) for outcome in outcomes)
    refused = sum(outcome.get(429, 0) for outcome in outcomes)
    assert (admitted, refused) == (25, 55)  # exactly the limit got through, the rest was refused
    assert set().union(*outcomes) <= {200, 429}
    counter = redis.Redis.from_url(url).get("regmw:ratelimit:LIMITER/repo/team/app/25/1/hour")
    assert int(counter) == 80  # every request was counted, in one shared counter
