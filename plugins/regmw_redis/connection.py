"""One Redis connection layer for every feature: cache, locks, rate limits, WAL positions.

Other plugins never import this module: the plugin provides one
:class:`RedisConnection` per runtime as ``services.redis`` (hook
``regmw_redis``), and every feature of that runtime shares its client, so one
connection pool (and, with Sentinel, one view of who the master is):

``RedisConnection(section)``
    ``.client`` (built without connecting), ``.namespace``, ``.cluster``,
    ``.key(*parts)`` = ``"<namespace>:<part>:<part>"`` (put a repository's keys
    in its hash tag: ``key(repository_key(repo, "wal"))`` gives
    ``regmw:{repository:<repo>}:wal``), ``.ping()``, ``.close()``.
``limits_storage(connection, purpose) -> (uri, options)``
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
import time
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

__all__ = ["ROUND_TRIPS", "RedisConnection", "RedisTarget", "build_client", "limits_storage", "parse_url"]

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
    check_query(parts.query)
    if not scheme.endswith("+sentinel"):
        if scheme == "unix" and not parts.path.strip("/"):
            raise ValueError("a unix:// URL needs the socket's path: unix:///path/redis.sock?db=N")
        url_db = _db(parse_qs(parts.query).get("db", [None])[0] or _path_db(parts.path, scheme))
        db = section.get("db")
        return RedisTarget(
            scheme, url, db=url_db if db is None else int(db),
            username=unquote(parts.username) if parts.username else None,
            password=section.get("password") or (unquote(parts.password) if parts.password else None),
            tls=scheme == "rediss",
        )
    username, password, sentinels = split_hosts(parts.netloc, "sentinel address")
    path = [piece for piece in parts.path.split("/") if piece]
    if len(path) > 2:
        raise ValueError(f"a redis+sentinel:// URL's path is /<service>[/db], not {parts.path!r}")
    url_service = unquote(path[0]) if path else None
    if url_service and section.get("service_name") and section["service_name"] != url_service:
        # e.g. redis+sentinel://h:p/3 meant as "db 3": the path's first part is the master's name
        raise ValueError(
            f"the URL names master {url_service!r} and [redis] service_name {section['service_name']!r}: keep one "
            "(the URL's path is /<service>[/db])"
        )
    service = section.get("service_name") or url_service
    if not service:
        raise ValueError("a redis+sentinel:// URL needs the master's service name: redis+sentinel://h:p,h:p/<service>")
    db = section.get("db")
    if db is None:
        db = _db(path[1]) if len(path) > 1 else 0
    return RedisTarget(
        scheme, url, tuple(sentinels), service, int(db), username, section.get("password") or password,
        tls=scheme.startswith("rediss"),
    )


def check_query(query: str) -> None:
    """Only ``?db=N`` may follow a URL: redis-py would let any other query argument win over ``[redis]``
    (timeouts, pool size) and over TLS verification (``?ssl_cert_reqs=none``), which is always on."""
    unknown = sorted(set(parse_qs(query, keep_blank_values=True)) - {"db"})
    if unknown:
        raise ValueError(f"URL query parameter {unknown[0]!r} is not supported (only ?db=N; set [redis] keys instead)")


def split_hosts(netloc: str, what: str) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    """``[[user]:password@]host:port[,host:port...]`` as (username, password, [(host, port), ...]).

    Shared by the sentinel and the Cluster URL (urlsplit cannot parse a host list). ``what`` names
    an address in the error (``sentinel address``, ``cluster node address``).
    """
    userinfo, _, hostlist = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, _, secret = userinfo.partition(":")
        username, password = unquote(user) or None, unquote(secret) or None
    hosts = []
    for item in hostlist.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{what} {item!r} is not host:port")
        hosts.append((host.strip("[]"), int(port)))
    return username, password, hosts


def _path_db(path: str, scheme: str) -> str | int:
    if scheme == "unix":
        return 0
    return path.strip("/") or 0


def _db(value: str | int | None) -> int:
    """A database number from a URL (its path or ``?db=``): a whole number, 0 or more."""
    text = str(value if value is not None else 0).strip()
    if not text.isdigit():
        raise ValueError(f"database {text!r} in the URL is not a number (0, 1, ...)")
    return int(text)


# --- clients -------------------------------------------------------------------

class RedisConnection:
    """The shared Redis of one runtime (``services.redis``): a client, a key namespace, a health check.

    One object per runtime, built by the ``regmw_redis`` hook: the backends of
    that runtime share its client and pool, and nothing is kept in module
    state, so two runtimes in one process (tests, app factories) never share
    or leak a client. Building it opens no connection: redis-py dials on the
    first command, so checking a configuration stays offline.
    """

    cluster = False

    #: Monotonic time until which Redis counts as just failed (:meth:`note_down`); 0: answering.
    down_until = 0.0
    #: Longest that a failure keeps best-effort writes off when nothing answers in between.
    DOWN_WINDOW = 1.0

    def __init__(self, section: Mapping[str, Any]) -> None:
        self.section = section
        self.namespace: str = section["namespace"]
        self.client: redis.Redis = build_client(section)

    def note_down(self) -> None:
        """Redis just failed a command: best-effort writes are skipped until it answers again.

        While Redis hangs, every command waits ``socket_timeout`` (times the
        retries) before failing. A request whose admission already waited that
        long must not wait again to cache what storage said (``RedisCache.set``
        / ``add``: dropped, as they would be after the wait). A command that
        answers (:meth:`note_up`) ends it, and so does :attr:`DOWN_WINDOW`.
        """
        self.down_until = time.monotonic() + self.DOWN_WINDOW

    def note_up(self) -> None:
        if self.down_until:
            self.down_until = 0.0

    @property
    def recently_down(self) -> bool:
        """True between a failure and the next answer (at most :attr:`DOWN_WINDOW` seconds)."""
        return bool(self.down_until) and time.monotonic() < self.down_until

    @property
    def command_deadline(self) -> float | None:
        """The longest one command can block: the longer timeout times (retries + 1).

        Read from ``[redis]`` (what the client was built with), never from
        redis-py's private ``Retry._retries``. None when no timeout is set.
        """
        timeouts = [t for t in (self.section["socket_timeout"], self.section["connect_timeout"]) if t]
        return max(timeouts) * (1 + self.section["retries"]) if timeouts else None

    def key(self, *parts: str) -> str:
        """``<namespace>:<parts joined by ':'>``, e.g. ``regmw:{repository:a/b}:wal``."""
        return ":".join((self.namespace, *parts))

    def execute(self, *args: Any) -> Any:
        """One command on a pooled connection, its raw reply (what ``execute_command`` would parse).

        Why not ``client.execute_command``: on the request path (the admission's
        EVALSHA, an event's XADD) redis-py's per-command client layer (retry
        wrapper, observability recorder, event dispatch, response callbacks)
        costs 18-29 us of a ~110 us loopback round trip on this project's VM
        (``benchmarks/redis_call_bench.py``; docs/performance.md). This
        keeps redis-py's pool, connections and parser (hiredis when
        installed). A connection error drops that connection and re-dials up
        to ``[redis] retries`` times, as the client's ``Retry(NoBackoff(),
        retries)`` does; a timeout drops it and is raised: a command that timed
        out is not sent again (Redis hangs: a new connection's handshake, which
        redis-py retries itself, would wait ``retries + 1`` more timeouts; and
        the command may have run), so one call waits at most
        :attr:`command_deadline`. A Redis error reply
        (``ResponseError``) is raised as is; the connection stays pooled.
        A cluster connection routes by key, so it goes through its client.
        """
        if self.cluster:
            return self.client.execute_command(*args)
        pool = self.client.connection_pool
        attempts = 1 + self.section["retries"]
        for attempt in range(attempts):
            conn = pool.get_connection()
            try:
                conn.send_command(*args)
                return conn.read_response()
            except redis.TimeoutError:
                # A hung Redis: re-dialling would wait again (the new connection's handshake, which
                # redis-py itself retries), and the command may have run (a script that counted).
                conn.disconnect()
                raise
            except redis.ConnectionError:
                conn.disconnect()
                if attempt + 1 == attempts:
                    raise
            except redis.ResponseError:  # Redis answered: the connection is in step, keep it pooled
                raise
            except BaseException:
                conn.disconnect()  # a reply may be left unread on it
                raise
            finally:
                pool.release(conn)
        raise AssertionError("unreachable")

    def run_script(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA of a registered ``script`` through :meth:`execute`, loading it once if Redis lost it."""
        try:
            return self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            self.execute("SCRIPT", "LOAD", script.script)
            return self.execute("EVALSHA", script.sha, len(keys), *keys, *args)

    def ping(self) -> None:
        """Raise a :class:`redis.RedisError` (or OSError) when Redis does not answer."""
        self.client.ping()

    def close(self) -> None:
        """Close the client and its pooled connections (the runtime is done with it)."""
        with contextlib.suppress(redis.RedisError, OSError):
            self.client.close()
            self.client.connection_pool.disconnect()

    def __repr__(self) -> str:
        return f"<RedisConnection {parse_url(self.section['url']).scheme} namespace={self.namespace!r}>"


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
    """A new client (and pool) for a ``[redis]`` section; one per :class:`RedisConnection`."""
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
        target.url, max_connections=section["max_connections"], timeout=section["pool_timeout"], **kwargs,
    )
    # redis-py lets the URL's db and password win over keyword arguments; here [redis] db and
    # password win (docs/redis.md), so they are set on the pool after it parsed the URL.
    pool.connection_kwargs["db"] = target.db
    if target.password is not None:
        pool.connection_kwargs["password"] = target.password
    pool.connection_class = counting(pool.connection_class)
    return redis.Redis(connection_pool=pool)


def limits_storage(connection: RedisConnection, purpose: str = "ratelimit") -> tuple[str, dict[str, Any]]:
    """(URI, keyword arguments) for ``limits``' own Redis / Sentinel storage on ``connection``'s server.

    For a plain server the storage reuses the connection's pool (one pool,
    one set of counted connections). Sentinel storages build their own
    ``Sentinel`` (``limits`` does not take a pool there) with the same settings;
    reads go to the master (``use_replicas=False``) so remaining counts are not stale.
    """
    section = connection.section
    target = parse_url(section["url"], section)
    prefix = connection.key(purpose)
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
            if section["tls_ca_file"]:
                options["ssl_ca_certs"] = str(section["tls_ca_file"])
        return f"{scheme}://{hosts}", options
    uri = "redis+unix://" + target.url[len("unix://"):] if target.scheme == "unix" else target.url
    return uri, {"connection_pool": connection.client.connection_pool, "key_prefix": prefix}
