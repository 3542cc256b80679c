"""What counts as "Redis is unavailable", and logging it without flooding the log.

During a Sentinel failover every request meets the same error for a couple of
seconds; one warning per second per feature says as much as a thousand.
"""
from __future__ import annotations

import logging
import threading
import time

import redis

from regmw import metrics

#: Errors that mean "Redis could not answer": the feature's failure policy applies.
REDIS_DOWN: tuple[type[BaseException], ...] = (redis.RedisError, OSError)

log = logging.getLogger("regmw.redis")

_last_logged: dict[str, float] = {}
_lock = threading.Lock()


def report(feature: str, action: str, exc: BaseException, interval: float = 1.0) -> None:
    """Count the error in ``regmw_backend_errors_total{backend=feature, action}``; log at most once per interval."""
    metrics.backend_errors.labels(feature, action).inc()
    now = time.monotonic()
    with _lock:
        if now - _last_logged.get(feature, -interval) < interval:
            return
        _last_logged[feature] = now
    log.warning("redis unavailable for %s (%s): %s: %s", feature, action, type(exc).__name__, exc)
