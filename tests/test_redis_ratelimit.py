"""Rate limits counted in Redis across processes admit no more than the limit."""
from __future__ import annotations


import pytest
import redis

from tests.servers import redis_apps



@pytest.mark.parametrize("hot_path", ["script", "limits"])
def test_limit_across_4_processes(redis_server, hot_path):
    _, url = redis_server
    rule = {"name": "repo", "by": "repository", "limit": "25/hour"}
    outcomes = redis_apps.run_workers(redis_apps.ratelimit_worker, (url, hot_path, rule, 20), 4)
    admitted = sum(outcome.get(200, 0) for outcome in outcomes)
    refused = sum(outcome.get(429, 0) for outcome in outcomes)
    assert (admitted, refused) == (25, 55)  # exactly the limit got through, the rest was refused
    assert set().union(*outcomes) <= {200, 429}
    counter = redis.Redis.from_url(url).get("regmw:ratelimit:LIMITER/repo/team/app/25/1/hour")
    assert int(counter) == 80  # every request was counted, in one shared counter
