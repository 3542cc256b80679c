"""What counts as "Redis is unavailable", and logging it without flooding the log.

During a Sentinel failover every request meets the same error for a couple of
seconds; one warning per second per feature says as much as a thousand.
"""
from __future__ import annotations

import logging

import redis
from redis.exceptions import RedisClusterException

from regmw import metrics

#: Errors that mean "Redis could not answer": the feature's failure policy applies.
#: ``RedisClusterException`` is not a RedisError: redis-py raises it (SlotNotCoveredError) for a slot
#: without a master during a Cluster failover.
REDIS_DOWN: tuple[type[BaseException], ...] = (redis.RedisError, OSError, RedisClusterException)

log = logging.getLogger("regmw.redis")


def report(feature: str, action: str, exc: BaseException, interval: float = 1.0) -> None:
    """Count the error in ``regmw_backend_errors_total{backend=feature, action}``; log at most once per interval."""
    metrics.report_backend_error(feature, action, exc, log, interval)
