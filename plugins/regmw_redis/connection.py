"""One Redis connection layer for every feature: cache, locks, rate limits, WAL positions.

Stable API (other plugins import these; keep the names):

``redis_client(config) -> redis.Redis``
    The client built from the ``[redis]`` section. Memoized per config object,
    so every feature of one regmw shares one connection pool (and, with
    Sentinel, one view of who the master is).
``namespaced(config, *parts) -> str``
    ``"<namespace>:<part>:<part>"``. Put a repository's keys in its hash tag
    with the core helper: ``namespaced(config, repository_key(repo, "wal"))``
    gives ``regmw:{repository:<repo>}:wal``.
``limits_storage(config) -> (uri, options)``
    The same server as a ``limits`` storage URI plus keyword arguments for
    :func:`limits.storage.storage_from_string`.
``ROUND_TRIPS``
    A Prometheus counter of packets of commands written to Redis (one per
    round trip: a pipeline or a script is one), counted at the connection.

URLs (``[redis] url``): ``redis://[[user]:password@]host:port/db``, ``rediss://``
(TLS), ``unix:///path/redis.sock?db=0``, and Sentinel
``redis+sentinel://[[user]:password@]host:port,host:port/<service>[/db]``.
For Sentinel, the URL's password authenticates to the master; sentinels get
``sentinel_password`` (none by default), so a master with ``requirepass`` and
sentinels without it both work.

The timeouts are per operation and short by default: Redis is a shared cache
and counter here, never worth making a request wait. Every caller treats a
:class:`redis.RedisError` as "Redis is unavailable" and applies its feature's
failure policy (a cache miss, fail-open, ...).
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from prometheus_client import Counter
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)

from regmw import metrics

__all__ = ["ROUND_TRIPS", "RedisTarget", "close_client", "limits_storage", "namespaced", "parse_url", "redis_client"]

SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")

ROUND_TRIPS = Counter(
    "regmw_redis_round_trips_total",
    "Packets of commands written to Redis (one per round trip; a pipeline or script counts once).",
    registry=metrics.REGISTRY,
)


# --- counting connections ----------------------------------------------------


class _CountingMixin:
    """Counts every write of a (packed) command batch: that is one round trip."""

    def send_packed_command(self, command, check_health=True):  # type: ignore[no-untyped-def]
        ROUND_TRIPS.inc()
        return super().send_packed_command(command, check_health)  # type: ignore[misc]


_COUNTING: dict[type, type] = {}


def counting(connection_class: type) -> type:
    """A subclass of ``connection_class`` that counts round trips (cached per class)."""
    if issubclass(connection_class, _CountingMixin):
        return connection_class
    if connection_class not in _COUNTING:
        _COUNTING[connection_class] = type(
            "Counting" + connection_class.__name__, (_CountingMixin, connection_class), {}
        )
    return _COUNTING[connection_class]


# --- URLs ----------------------------------------------------------------------


@dataclass(frozen=True)
class RedisTarget:
    """What a ``[redis] url`` (plus the section's override keys) points at."""

    scheme: str
    url: str  # for plain targets: a URL redis-py's from_url understands
    sentinels: tuple[tuple[str, int], ...] = ()
    service_name: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @property
    def is_sentinel(self) -> bool:
        return bool(self.sentinels)


def parse_url(url: str, section: Mapping[str, Any] | None = None) -> RedisTarget:
    """Parse ``url``; ``service_name``, ``db`` and ``password`` keys of ``section`` win over it."""
    section = section or {}
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme not in SCHEMES:
        raise ValueError(f"unsupported Redis URL scheme {scheme!r} (use {', '.join(s + '://' for s in SCHEMES)})")
    if not scheme.endswith("+sentinel"):
        db = section.get("db")
        if db is None:
            db = parse_qs(parts.query).get("db", [None])[0] or _path_db(parts.path, scheme)
        return RedisTarget(
            scheme, url, db=int(db), username=unquote(parts.username) if parts.username else None,
            password=section.get("password") or (unquote(parts.password) if parts.password else None),
            tls=scheme == "rediss",
        )
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, _, secret = userinfo.partition(":")
        username, password = unquote(user) or None, unquote(secret) or None
    sentinels = []
    for item in hostlist.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"sentinel address {item!r} is not host:port")
        sentinels.append((host.strip("[]"), int(port)))
    path = [piece for piece in parts.path.split("/") if piece]
    service = section.get("service_name") or (unquote(path[0]) if path else None)
    if not service:
        raise ValueError("a redis+sentinel:// URL needs the master's service name: redis+sentinel://h:p,h:p/<service>")
    db = section.get("db")
    if db is None:
        db = int(path[1]) if len(path) > 1 else 0
    return RedisTarget(
        scheme, url, tuple(sentinels), service, int(db), username, section.get("password") or password,
        tls=scheme.startswith("rediss"),
    )


def _path_db(path: str, scheme: str) -> int:
    if scheme == "unix":
        return 0
    piece = path.strip("/")
    return int(piece) if piece else 0


# --- clients -------------------------------------------------------------------

_CLIENTS: dict[int, tuple[Any, redis.Redis]] = {}
_CLIENTS_LOCK = threading.Lock()


def redis_client(config: Mapping[str, Mapping[str, Any]]) -> redis.Redis:
    """The shared client for ``config`` (a :class:`regmw.config.Config` or a dict of sections)."""
    key = id(config)
    entry = _CLIENTS.get(key)
    if entry is not None and entry[0] is config:
        return entry[1]
    with _CLIENTS_LOCK:
        entry = _CLIENTS.get(key)
        if entry is not None and entry[0] is config:
            return entry[1]
        client = build_client(config["redis"])
        _CLIENTS[key] = (config, client)
        try:
            weakref.finalize(config, _forget, key, client)
        except TypeError:  # a plain dict cannot be weakly referenced: kept until close_client()
            pass
        return client


def close_client(config: Mapping[str, Mapping[str, Any]]) -> None:
    """Drop the memoized client of ``config`` and close its connections."""
    with _CLIENTS_LOCK:
        entry = _CLIENTS.pop(id(config), None)
    if entry is not None:
        entry[1].close()
        entry[1].connection_pool.disconnect()


def _forget(key: int, client: redis.Redis) -> None:
    with _CLIENTS_LOCK:
        entry = _CLIENTS.get(key)
        if entry is not None and entry[1] is client:
            del _CLIENTS[key]
    with contextlib.suppress(redis.RedisError, OSError):  # best effort, at garbage collection
        client.connection_pool.disconnect()


def _connection_kwargs(section: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "socket_timeout": section["socket_timeout"],
        "socket_connect_timeout": section["connect_timeout"],
        # One immediate retry: it re-dials a pooled connection the server closed
        # (restart, failover) without the ~1 s exponential backoff of redis-py's default.
        "retry": Retry(NoBackoff(), section["retries"]),
        "health_check_interval": section["health_check_interval"],
        "client_name": section["client_name"] or None,
        # RESP2: regmw needs no push messages, and redis-py parses RESP2 replies
        # faster (~30 us per script call here without hiredis).
        "protocol": section["protocol"],
    }


def build_client(section: Mapping[str, Any]) -> redis.Redis:
    """A new client (and pool) for a ``[redis]`` section; prefer :func:`redis_client`."""
    target = parse_url(section["url"], section)
    kwargs = _connection_kwargs(section)
    if target.is_sentinel:
        sentinel_kwargs = {
            "socket_timeout": section["socket_timeout"],
            "socket_connect_timeout": section["connect_timeout"],
        }
        if section["sentinel_password"]:
            sentinel_kwargs["password"] = section["sentinel_password"]
        if target.tls and section["tls_ca_file"]:
            kwargs["ssl_ca_certs"] = section["tls_ca_file"]
        sentinel = Sentinel(target.sentinels, sentinel_kwargs=sentinel_kwargs)
        base = SentinelManagedSSLConnection if target.tls else SentinelManagedConnection
        pool = SentinelConnectionPool(
            target.service_name, sentinel, connection_class=counting(base), db=target.db,
            username=target.username, password=target.password, max_connections=section["max_connections"],
            **kwargs,
        )
        client = redis.Redis(connection_pool=pool)
        client.regmw_sentinel = sentinel  # type: ignore[attr-defined]
        return client
    if target.tls and section["tls_ca_file"]:
        kwargs["ssl_ca_certs"] = section["tls_ca_file"]
    pool = redis.BlockingConnectionPool.from_url(
        target.url, db=target.db, password=target.password, max_connections=section["max_connections"],
        timeout=section["pool_timeout"], **kwargs,
    )
    pool.connection_class = counting(pool.connection_class)
    return redis.Redis(connection_pool=pool)


def namespaced(config: Mapping[str, Mapping[str, Any]], *parts: str) -> str:
    """``<namespace>:<parts joined by ':'>``, e.g. ``regmw:{repository:a/b}:wal``."""
    return ":".join((config["redis"]["namespace"], *parts))


def limits_storage(config: Mapping[str, Mapping[str, Any]], purpose: str = "ratelimit") -> tuple[str, dict[str, Any]]:
    """(URI, keyword arguments) for ``limits``' own Redis / Sentinel storage on the same server.

    For a plain server the storage reuses :func:`redis_client`'s pool (one pool,
    one set of counted connections). Sentinel storages build their own
    ``Sentinel`` (``limits`` does not take a pool there) with the same settings;
    reads go to the master (``use_replicas=False``) so remaining counts are not stale.
    """
    section = config["redis"]
    target = parse_url(section["url"], section)
    prefix = namespaced(config, purpose)
    if target.is_sentinel:
        hosts = ",".join(f"{host}:{port}" for host, port in target.sentinels)
        options: dict[str, Any] = {
            "service_name": target.service_name, "db": target.db, "use_replicas": False, "key_prefix": prefix,
            "socket_timeout": section["socket_timeout"], "socket_connect_timeout": section["connect_timeout"],
            "retry": Retry(NoBackoff(), section["retries"]), "protocol": section["protocol"],
            "sentinel_kwargs": {"password": section["sentinel_password"] or None,
                                "socket_timeout": section["socket_timeout"],
                                "socket_connect_timeout": section["connect_timeout"]},
        }
        if target.password:
            options["password"] = target.password
        if target.username:
            options["username"] = target.username
        scheme = "redis+sentinel"
        if target.tls:
            options["ssl"] = True
        return f"{scheme}://{hosts}", options
    client = redis_client(config)
    uri = "redis+unix://" + target.url[len("unix://"):] if target.scheme == "unix" else target.url
    return uri, {"connection_pool": client.connection_pool, "key_prefix": prefix}
