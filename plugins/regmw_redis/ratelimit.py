"""Rate limiting through ``limits``' own Redis / Sentinel storages (``hot_path = "limits"``).

The counters live under ``<namespace>:ratelimit:`` with ``limits``' key names,
which the one-round-trip script (:mod:`.admission`) uses too: switching
``hot_path`` or running a mixed fleet during a rollout counts the same
windows. This path supports every ``[ratelimit] strategy`` (moving window,
sliding window counter) at the cost of round trips: ``limits`` needs one to
count a hit and two more for the remaining count and reset time.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from regmw.defaults.ratelimit import LimitsRateLimiter, parse_rules

from .connection import RedisConnection, limits_storage


def build_rate_limiter(config: Mapping[str, Mapping[str, Any]], connection: RedisConnection) -> LimitsRateLimiter | None:
    """The ``limits``-backed limiter on ``connection``'s Redis, or None without rules."""
    section = config["ratelimit"]
    if not section["enabled"] or not section["rules"]:
        return None
    uri, options = limits_storage(connection, "ratelimit")
    limiter = LimitsRateLimiter(parse_rules(section["rules"]), uri, section["strategy"], **options)
    limiter.shared = True  # capability: its counters live in the shared Redis
    return limiter
