"""regmw built-in plugin ``redis``: Redis (single node or Sentinel) behind the cache, locks and rate limits.

Enable with ``[regmw] plugins = ["redis"]`` and configure ``[redis]``. The
hook implementations are attributes of this module (it is what the plugin
manager registers); the work lives in one small module per job:

- :mod:`.connection`: URL parsing, the shared client, key namespacing, round-trip counting;
- :mod:`.settings`: the ``[redis]`` section;
- :mod:`.cache`, :mod:`.locks`, :mod:`.ratelimit`: the backends;
- :mod:`.admission`: the one-round-trip hot path; :mod:`.scripts`: its Lua.

See docs/redis.md.
"""
from __future__ import annotations

from regmw.defaults.ratelimit import LimitsRateLimiter
from regmw.errors import ConfigError
from regmw.plugins import hookimpl

from . import scripts
from .admission import RedisAdmission
from .cache import RedisCache
from .connection import namespaced, redis_client
from .errors import REDIS_DOWN, log
from .locks import RedisLockManager
from .ratelimit import build_rate_limiter
from .settings import SECTION

__all__ = [
    "RedisAdmission", "RedisCache", "RedisLockManager", "namespaced", "redis_client",
    "regmw_admission", "regmw_cache", "regmw_config_sections", "regmw_lock_manager", "regmw_rate_limiter",
    "regmw_startup",
]


@hookimpl
def regmw_config_sections():
    return [SECTION]


@hookimpl
def regmw_cache(config):
    return RedisCache(redis_client(config), namespaced(config, "cache"), config["redis"]["cache_ttl"])


@hookimpl
def regmw_lock_manager(config):
    return RedisLockManager(redis_client(config), config["redis"]["namespace"])


@hookimpl
def regmw_rate_limiter(config):
    return build_rate_limiter(config)


@hookimpl
def regmw_admission(config, services):
    """The one-round-trip admission, unless ``[redis] hot_path = "limits"`` (then the core's sequential one)."""
    if config["redis"]["hot_path"] != "script":
        return None
    limiter = services.rate_limiter
    if limiter is not None and not isinstance(limiter, LimitsRateLimiter):
        return None  # a third-party limiter: let the core call it
    rules = limiter.rules if limiter is not None else []
    strategy = config["ratelimit"]["strategy"]
    if rules and strategy != "fixed-window":
        raise ConfigError(
            f"{getattr(config, 'source', '<config>')}: ratelimit.strategy {strategy!r} needs "
            '[redis] hot_path = "limits" (the one-round-trip script counts fixed windows)'
        )
    locks = services.locks
    cache = services.cache
    return RedisAdmission(
        services,
        redis_client(config),
        rules,
        namespaced(config, "ratelimit"),
        locks.read_only_key if isinstance(locks, RedisLockManager) else None,
        cache if isinstance(cache, RedisCache) else None,
    )


@hookimpl
def regmw_startup(services):
    """Load the scripts now, so the first requests do not pay for NOSCRIPT + SCRIPT LOAD."""
    if not isinstance(services.admission, RedisAdmission) and not isinstance(services.locks, RedisLockManager):
        return
    client = redis_client(services.config)
    try:
        for source in (scripts.ADMIT, scripts.SET_READ_ONLY, scripts.RELEASE_IF_OWNER):
            client.script_load(source)
    except REDIS_DOWN as exc:
        log.warning("redis unavailable at start-up (scripts load on first use): %s", exc)
