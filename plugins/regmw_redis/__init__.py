"""regmw built-in plugin ``redis``: Redis (single node, Sentinel or Cluster) behind the cache, locks and rate limits.

Enable with ``[regmw] plugins = ["redis"]`` and configure ``[redis]``. The
hook implementations are attributes of this module (it is what the plugin
manager registers); the work lives in one small module per job:

- :mod:`.connection`: URL parsing, :class:`RedisConnection` (this runtime's
  ``services.redis``, which every other plugin uses through the contract),
  key namespacing, round-trip counting;
- :mod:`.settings`: the ``[redis]`` section;
- :mod:`.cache`, :mod:`.locks`, :mod:`.ratelimit`: the backends;
- :mod:`.admission`: the one-round-trip hot path; :mod:`.scripts`: its Lua;
- :mod:`.cluster`: Redis Cluster (``redis+cluster://``): lazy client, key tags, per-slot admission.

See docs/redis.md.
"""
from __future__ import annotations

from regmw.backends import split_limiter
from regmw.plugins import hookimpl

from . import scripts
from .admission import RedisAdmission
from .cache import RedisCache
from .cluster import connection_for
from .connection import RedisConnection
from .errors import REDIS_DOWN, log
from .locks import RedisLockManager
from .ratelimit import build_rate_limiter
from .settings import SECTION

__all__ = [
    "RedisAdmission", "RedisCache", "RedisConnection", "RedisLockManager",
    "regmw_admission", "regmw_cache", "regmw_config_sections", "regmw_lock_manager", "regmw_rate_limiter",
    "regmw_redis", "regmw_startup",
]


@hookimpl
def regmw_config_sections():
    return [SECTION]


@hookimpl
def regmw_redis(config):
    """``services.redis``: this runtime's connection (no connection is opened until first use)."""
    return connection_for(config["redis"])


@hookimpl
def regmw_cache(config, services):
    connection = services.redis
    return RedisCache(connection, connection.key("cache"), config["redis"]["cache_ttl"])


@hookimpl
def regmw_lock_manager(config, services):
    return RedisLockManager(services.redis)


@hookimpl
def regmw_rate_limiter(config, services):
    return build_rate_limiter(config, services.redis)


def _on(connection, backend, capability: str):
    """``backend``'s ``capability`` method when the backend lives on ``connection``, else None."""
    if backend is None or getattr(backend, "connection", None) is not connection:
        return None
    return getattr(backend, capability, None)


@hookimpl
def regmw_admission(config, services):
    """The one-round-trip admission, unless ``[redis] hot_path = "limits"`` (then the core's sequential one)."""
    if config["redis"]["hot_path"] != "script":
        return None
    connection = services.redis
    if connection is None:
        return None
    rules, others = split_limiter(services.rate_limiter)  # declarative rules count in the script
    # [ratelimit] strategy vs hot_path is the schema's check (settings.py): the script counts fixed windows
    return RedisAdmission(
        services,
        connection,
        list(rules),
        connection.key("ratelimit"),
        _on(connection, services.locks, "read_only_key"),
        _on(connection, services.cache, "redis_key"),
        others,
    )


@hookimpl
def regmw_startup(services):
    """Load the scripts now, so the first requests do not pay for NOSCRIPT + SCRIPT LOAD."""
    connection = services.redis
    if connection is None or not any(
        getattr(backend, "connection", None) is connection for backend in (services.admission, services.locks)
    ):
        return
    try:
        for source in (scripts.ADMIT, scripts.SET_READ_ONLY, scripts.RELEASE_IF_OWNER):
            connection.client.script_load(source)
    except REDIS_DOWN as exc:
        log.warning("redis unavailable at start-up (scripts load on first use): %s", exc)
