"""regmw-outside: a third-party regmw plugin that brings its own shared stores.

Loaded through the ``regmw`` entry-point group. It replaces the cache, the
lock manager and the rate limiter with its own (:mod:`.stores`), in the Redis
some plugin provides as ``services.redis`` or, when none does, on its own
client (``[outside] url``, offered as ``services.redis`` with ``trylast``, so
any other provider wins), and declares one prefetch key of its own. It
knows the built-in plugins only through the contract: it reads
``services.redis`` and hooks in, and imports nothing but the core and redis-py.
"""
from __future__ import annotations

import redis

from regmw import Option, Section, hookimpl, repository_key
from regmw.defaults.ratelimit import parse_rules

from .stores import Namespace, OutsideCache, OutsideLocks, OutsideRateLimiter

SECTION = Section("outside", "regmw-outside: shared stores on Redis (a third-party plugin).", {
    "url": Option("str", "redis://127.0.0.1:6379/0", "Its own Redis, used only when no plugin provides services.redis."),
    "namespace": Option("str", "outside", "Prefix of its keys."),
})


def note_key(context) -> str | None:
    """The cache key of a repository's note: declared for prefetch, so it is read on the request's way in."""
    return repository_key(context.repository, "outside-note") if context.repository else None


@hookimpl
def regmw_config_sections():
    return [SECTION]


@hookimpl(trylast=True)
def regmw_redis(config):
    """Its own connection, only when no other plugin provides ``services.redis`` (no connection opened yet)."""
    section = config["outside"]
    return Namespace(redis.Redis.from_url(section["url"], socket_timeout=1), section["namespace"])


def _connection(config, services):
    return services.redis


@hookimpl
def regmw_cache(config, services):
    return OutsideCache(_connection(config, services), config["outside"]["namespace"])


@hookimpl
def regmw_lock_manager(config, services):
    return OutsideLocks(_connection(config, services), config["outside"]["namespace"])


@hookimpl
def regmw_rate_limiter(config, services):
    section = config["ratelimit"]
    if not section["enabled"] or not section["rules"]:
        return None
    return OutsideRateLimiter(_connection(config, services), config["outside"]["namespace"],
                              parse_rules(section["rules"]))


@hookimpl
def regmw_prefetch():
    return [note_key]
