"""The ``[redis]`` configuration section (declared through ``regmw_config_sections``)."""
from __future__ import annotations

from regmw.config import Option, Section

from .cluster import CLUSTER_SCHEMES, parse_cluster_url
from .connection import SCHEMES, parse_url


def _check_url(url: str) -> str:
    if url.split("://", 1)[0] in CLUSTER_SCHEMES:
        parse_cluster_url(url)
        return url
    parse_url(url)  # raises ValueError with a sentence naming what is wrong
    return url


def _check_namespace(value: str) -> str:
    if not value or any(char in value for char in "{} "):
        raise ValueError("must be non-empty, without braces or spaces (braces would become a hash tag)")
    return value


SECTION = Section(
    "redis",
    "Shared Redis (single node, Sentinel or Cluster) for the cache, read-only locks, cluster slots and rate limits.",
    {
        "url": Option(
            "url", "redis://127.0.0.1:6379/0",
            "redis://[[user]:password@]host:port/db, rediss:// (TLS), unix:///path.sock?db=N, or Sentinel "
            "redis+sentinel://[[user]:password@]host:port,host:port/<service>[/db] (password = the master's), or "
            "Cluster redis+cluster://[[user]:password@]host:port[,host:port...] (rediss+cluster:// with TLS).",
            schemes=SCHEMES + CLUSTER_SCHEMES, check=_check_url,
        ),
        "service_name": Option("str", None, "Sentinel master name, when the URL does not carry it."),
        "sentinel_password": Option("str", None, "Password of the sentinels themselves (none by default)."),
        "password": Option("str", None, "Password of the Redis server (wins over the URL's)."),
        "db": Option("int", None, "Database number (wins over the URL's).", minimum=0),
        "namespace": Option("str", "regmw", "Prefix of every key regmw writes: `<namespace>:...`.", check=_check_namespace),
        "socket_timeout": Option(
            "float", 0.25, "Seconds one Redis operation may take before it counts as Redis being down.", minimum=0.001
        ),
        "connect_timeout": Option("float", 0.25, "Seconds to open a connection.", minimum=0.001),
        "retries": Option(
            "int", 1, "Immediate retries of an operation after a connection error (re-dials dead pooled connections).",
            minimum=0,
        ),
        "max_connections": Option("int", 64, "Connections in the shared pool, per process.", minimum=1),
        "pool_timeout": Option("float", 1.0, "Seconds to wait for a free pooled connection (single node).", minimum=0),
        "health_check_interval": Option(
            "float", 0, "PING idle connections older than this many seconds before use; 0 = off (a dead one is retried anyway).",
            minimum=0,
        ),
        "client_name": Option("str", "regmw", "CLIENT SETNAME of regmw's connections (shows in CLIENT LIST)."),
        "protocol": Option(
            "int", 2, "RESP protocol version spoken to Redis (2 parses faster in redis-py; 3 if your proxy needs it).",
            check=lambda value: value if value in (2, 3) else (_ for _ in ()).throw(ValueError("must be 2 or 3")),
        ),
        "tls_ca_file": Option("path", None, "CA bundle verifying the server's certificate for rediss:// and rediss+cluster://."),
        "cache_ttl": Option("float", 300.0, "Seconds a cache entry lives when the caller gives no TTL.", minimum=0.001),
        "hot_path": Option(
            "str", "script",
            "How a request is admitted: `script` = rate limits (fixed window), read-only check and cache prefetch in "
            "ONE round trip (a Lua script); `limits` = through the `limits` library, any [ratelimit] strategy, "
            "several round trips.",
            choices=("script", "limits"),
        ),
    },
)
