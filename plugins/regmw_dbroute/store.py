"""Where the WAL position of each repository's latest write is shared.

Two implementations of the contract's :class:`regmw.backends.PositionStore`
(``services.positions``, provided by this plugin's ``regmw_position_store``):

* :class:`RedisPositionStore`: shared by every instance. ``advance`` is a Lua
  compare-and-set that keeps the MAXIMUM position (two writes finishing out of
  order never move a repository's position backwards) and refreshes the TTL.
* :class:`MemoryPositionStore`: one process (the embedded default), same
  semantics under a lock.

Besides per-repository positions, a store has a *floor* and an *epoch marker*.
A store that lost its data (a Redis restart without persistence, a fresh
process) has no marker; the router then records the primary's current position
as the floor before trusting the store, so writes whose positions were lost are
still covered: a read needs a replica that reached max(repository position, floor).

A Redis that restarts *with* data (AOF or RDB, or a Sentinel failover to a
replica) still has its marker but may have lost recent positions (the last
second before an AOF ``everysec`` fsync, writes a replica had not received) or
may come back older than positions some instance could not store meanwhile.
So the marker holds the ``run_id`` of the Redis process that set it, and every
read compares it, inside the same script that reads the positions, with the
``run_id`` of the server answering (``INFO server``). A server that is not the
one the marker was set on is treated like an empty store: a new floor first.
Every instance sees it on its very next read, whether or not it saw the outage.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from regmw.backends import Positions, PositionStore, StoreUnavailable, repository_key
from regmw.errors import ConfigError

from .lsn import from_key, to_key

log = logging.getLogger("regmw.dbroute")

__all__ = [
    "MemoryPositionStore", "PositionStore", "Positions", "RedisPositionStore", "StoreUnavailable", "make_store",
]


class MemoryPositionStore:
    """In-process positions: correct for one process, which is all it can see."""

    kind = "memory"

    def __init__(self) -> None:
        self._positions: dict[str, tuple[int, float]] = {}
        self._floor: tuple[int, float] | None = None
        self._initialized = False
        self._lock = threading.Lock()
        self._sweep_at = 0.0

    def get(self, repository: str | None) -> Positions:
        now = time.monotonic()
        entry = self._positions.get(repository) if repository else None
        floor = self._floor
        return Positions(
            entry[0] if entry and entry[1] > now else None,
            floor[0] if floor and floor[1] > now else None,
            self._initialized,
        )

    def advance(self, repository: str, lsn: int, ttl: float) -> int:
        now = time.monotonic()
        with self._lock:
            entry = self._positions.get(repository)
            current = entry[0] if entry and entry[1] > now else 0
            kept = max(current, lsn)
            self._positions[repository] = (kept, now + ttl)
            if now >= self._sweep_at:  # bounded memory: drop expired entries now and then
                self._sweep_at = now + ttl
                for key in [key for key, (_, expires) in self._positions.items() if expires <= now]:
                    del self._positions[key]
            return kept

    def initialize(self, floor: int, ttl: float) -> None:
        now = time.monotonic()
        with self._lock:
            current = self._floor[0] if self._floor and self._floor[1] > now else 0
            self._floor = (max(current, floor), now + ttl)
            self._initialized = True


# greater(a, b) for two 16-hex-digit LSNs, shared by _ADVANCE and _INITIALIZE.
# Compares the two 32-bit halves as numbers: exact, unlike one Lua double.
_GREATER = """
local function greater(a, b)
  local ah, bh = tonumber(string.sub(a, 1, 8), 16), tonumber(string.sub(b, 1, 8), 16)
  if ah ~= bh then return ah > bh end
  return tonumber(string.sub(a, 9, 16), 16) > tonumber(string.sub(b, 9, 16), 16)
end
"""

# KEYS[1] = position key; ARGV[1] = 16-hex-digit LSN, ARGV[2] = TTL in ms.
_ADVANCE = _GREATER + """
local current = redis.call('GET', KEYS[1])
if (not current) or string.len(current) ~= 16 or greater(ARGV[1], current) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return current
"""


# KEYS[1] = floor key, KEYS[2] = epoch key, KEYS[3] = position key (optional).
# Returns {position, floor, epoch state}: 0 no marker, 1 set on this server run, 2 set on another run.
_GET = """
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local epoch = redis.call('GET', KEYS[2])
local state = 0
if epoch then
  if epoch == run_id then state = 1 else state = 2 end
end
local position = false
if KEYS[3] then position = redis.call('GET', KEYS[3]) end
return {position, redis.call('GET', KEYS[1]), state}
"""

# KEYS[1] = floor key, KEYS[2] = epoch key; ARGV as _ADVANCE. Raises the floor (maximum kept),
# then marks the store as initialised BY THIS SERVER RUN (its run_id), in one atomic step.
_INITIALIZE = _GREATER + """
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
local current = redis.call('GET', KEYS[1])
if (not current) or string.len(current) ~= 16 or greater(ARGV[1], current) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
redis.call('SET', KEYS[2], run_id)
return run_id
"""


class RedisPositionStore:
    """Positions in Redis, shared by every regmw instance.

    Keys: ``<namespace>:{repository:<name>}:lsn`` per repository (the core's
    hash-tagged key, so it sits in the repository's Redis Cluster slot), and
    ``<namespace>:{dbroute}:floor`` / ``:epoch`` for the floor and the marker,
    ``<namespace>`` being :func:`store_namespace`. ``key_for`` builds a full key
    from the un-namespaced parts. The epoch marker's value is the ``run_id``
    of the Redis server run that set it (see the module doc). ``get`` is one
    script call (one round trip). Its keys span two hash slots, so with Redis
    Cluster (``cluster=True``) the repository's key is read by a second call;
    the run_id check then covers the node holding the floor and the marker,
    not a restart of the node holding the repository's key.
    """

    kind = "redis"

    def __init__(self, client: Any, key_for, cluster: bool = False, connection: Any = None) -> None:
        self.client = client
        self.cluster = cluster
        #: the shared Redis connection (``services.redis``) this store's client belongs to, if any: a
        #: failure another feature just met on it (``recently_down``) is not waited out a second time
        self._connection = connection
        self._key_for = key_for
        self._floor_key = key_for("{dbroute}:floor")
        self._epoch_key = key_for("{dbroute}:epoch")
        self._advance = client.register_script(_ADVANCE)
        self._get = client.register_script(_GET)
        self._initialize = client.register_script(_INITIALIZE)

    def key(self, repository: str) -> str:
        return self._key_for(repository_key(repository, "lsn"))

    def _call(self, call):
        """``call()``, or StoreUnavailable at once while the shared Redis has just failed another feature's
        command (``recently_down``: a request whose admission waited out a hung Redis does not wait again)."""
        if self._connection is not None and getattr(self._connection, "recently_down", False):
            raise StoreUnavailable("position store (redis): the shared Redis failed a command just now; not asked")
        try:
            return call()
        except Exception as exc:  # redis.RedisError, OSError
            raise StoreUnavailable(f"position store (redis) unavailable: {exc}") from exc

    def get(self, repository: str | None) -> Positions:
        keys = [self._floor_key, self._epoch_key]
        if repository and not self.cluster:
            keys.append(self.key(repository))

        def read():
            position, floor, state = self._get(keys=keys)
            if repository and self.cluster:
                position = self.client.get(self.key(repository))
            return position, floor, state

        position, floor, state = self._call(read)
        if state == 2:
            log.warning("position store: Redis restarted or failed over since its floor was set (run_id changed)")
        return Positions(from_key(position), from_key(floor), state == 1)

    def advance(self, repository: str, lsn: int, ttl: float) -> int:
        kept = self._call(lambda: self._advance(keys=[self.key(repository)],
                                                args=[to_key(lsn), max(1, int(ttl * 1000))]))
        return from_key(kept) or lsn

    def initialize(self, floor: int, ttl: float) -> None:
        try:
            self._initialize(keys=[self._floor_key, self._epoch_key], args=[to_key(floor), max(1, int(ttl * 1000))])
        except Exception as exc:
            raise StoreUnavailable(f"position store (redis) unavailable: {exc}") from exc


def store_namespace(settings: Any, connection: Any) -> str:
    """``[database] store_namespace``, else the shared Redis connection's namespace, else ``regmw``."""
    if settings.store_namespace:
        return settings.store_namespace
    if connection is not None:
        return connection.namespace
    return "regmw"


def make_store(settings: Any, connection: Any = None) -> PositionStore:
    """The store ``[database] store`` asks for: on ``services.redis`` (``connection``), ``store_url``, or memory.

    ``connection`` is whatever provided ``services.redis`` (the ``redis``
    plugin, or a third-party one): only its ``client`` and ``namespace`` are
    used, so this plugin never imports another.
    """
    kind = settings.store
    if kind == "auto":
        kind = "redis" if (connection is not None or settings.store_url) else "memory"
    if kind == "memory":
        return MemoryPositionStore()
    namespace = store_namespace(settings, connection)
    if settings.store_url:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis.from_url(
            settings.store_url,
            socket_timeout=settings.store_timeout,
            socket_connect_timeout=settings.store_timeout,
            retry=Retry(NoBackoff(), 1),  # re-dial a dead pooled connection once, no backoff sleep
        )
        return RedisPositionStore(client, lambda key: f"{namespace}:{key}")
    if connection is None:
        raise ConfigError("database.store: redis needs a shared Redis (the `redis` plugin) or database.store_url")
    return RedisPositionStore(connection.client, lambda key: f"{namespace}:{key}",
                              cluster=bool(getattr(connection, "cluster", False)), connection=connection)
