"""Rate limiting through ``limits``' own Redis / Sentinel / Cluster storages (``hot_path = "limits"``).

The counters live under ``<namespace>:ratelimit:`` with ``limits``' key names,
which the one-round-trip script (:mod:`.admission`) uses too: switching
``hot_path`` or running a mixed fleet during a rollout counts the same
windows. This path supports every ``[ratelimit] strategy`` (moving window,
sliding window counter) at the cost of round trips: ``limits`` needs one to
count a hit and two more for the remaining count and reset time.

On a Redis Cluster the rules are :class:`.cluster.TaggedRule` (identity
``{<by>:<value>}``, one slot per identity) for both paths, and ``limits``'
cluster storage, which connects in its constructor, is built on the first
request that needs it (:class:`LazyLimiter`): with ``hot_path = "script"``
never, and checking a configuration stays offline.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from regmw.backends import RateLimitResult
from regmw.defaults.ratelimit import LimitsRateLimiter, Rule, parse_rules

from .cluster import tagged
from .connection import RedisConnection, limits_storage


class LazyLimiter:
    """A ``LimitsRateLimiter`` on ``limits``' Redis Cluster storage, built on its first ``hit``.

    Capabilities as the limiter it stands for: ``shared``, ``rules`` (so the
    admission script counts them instead, and this is never built). A
    failure to build it is raised from ``hit`` (the ``[ratelimit] fail_open``
    policy applies) and the next ``hit`` tries again.
    """

    shared = True

    def __init__(self, rules: list[Rule], uri: str, strategy: str, options: dict[str, Any]) -> None:
        self.rules = rules
        self._args = (uri, strategy, options)
        self._limiter: LimitsRateLimiter | None = None
        self._lock = threading.Lock()

    def hit(self, context: Any) -> RateLimitResult:
        if self._limiter is None:
            with self._lock:
                if self._limiter is None:
                    uri, strategy, options = self._args
                    self._limiter = LimitsRateLimiter(self.rules, uri, strategy, **options)
        return self._limiter.hit(context)


def build_rate_limiter(
    config: Mapping[str, Mapping[str, Any]], connection: RedisConnection
) -> LimitsRateLimiter | LazyLimiter | None:
    """The ``limits``-backed limiter on ``connection``'s Redis, or None without rules."""
    section = config["ratelimit"]
    if not section["enabled"] or not section["rules"]:
        return None
    rules = parse_rules(section["rules"])
    if getattr(connection, "cluster", False):
        uri, options = _cluster_storage(connection)
        return LazyLimiter(tagged(rules), uri, section["strategy"], options)
    uri, options = limits_storage(connection, "ratelimit")
    limiter = LimitsRateLimiter(rules, uri, section["strategy"], **options)
    limiter.shared = True  # capability: its counters live in the shared Redis
    return limiter


def _cluster_storage(connection: Any) -> tuple[str, dict[str, Any]]:
    """(URI, options) of ``limits``' ``redis+cluster://`` storage on the connection's cluster, same settings."""
    from .cluster import cluster_options

    target = connection.target
    options = cluster_options(connection.section, target)
    options.pop("connection_pool_class")  # limits passes startup nodes, not a URL: no pool class
    options.update({"key_prefix": connection.key("ratelimit")})
    if target.tls:
        options["ssl"] = True
    hosts = ",".join(f"{host}:{port}" for host, port in target.nodes)
    return f"redis+cluster://{hosts}", options
