"""The ``[redis]`` configuration section (declared through ``regmw_config_sections``)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from regmw.config import Option, Section

from .cluster import CLUSTER_SCHEMES, parse_cluster_url
from .connection import SCHEMES, parse_url


def url_and_options(section: Mapping[str, Any], config: Any = None) -> str | None:
    """`url` parses together with `service_name`/`db`/`password` (a Sentinel URL names its master, in the URL or in `service_name`); `service_name` and `sentinel_password` only with a `redis+sentinel://` URL; `tls_ca_file` only with TLS (`rediss://`, `rediss+sentinel://`, `rediss+cluster://`); a Cluster has no `db` but 0."""
    if section["url"].split("://", 1)[0] in CLUSTER_SCHEMES:
        return _cluster_url_and_options(section)
    try:
        target = parse_url(section["url"], section)
    except ValueError as exc:
        return f"redis.url: {exc}"
    if not target.is_sentinel:
        for key in ("service_name", "sentinel_password"):
            if section.get(key):
                return f"redis.{key} is set but redis.url is not a redis+sentinel:// URL"
    if section.get("tls_ca_file") and not target.tls:
        return "redis.tls_ca_file is set but redis.url does not use TLS (rediss://)"
    return None


def script_counts_fixed_windows(section: Mapping[str, Any], config: Mapping[str, Any]) -> str | None:
    """`hot_path` = `script` counts fixed windows only: with `[ratelimit]` rules and another `strategy`, use `hot_path` = `limits`."""
    ratelimit = config.get("ratelimit") if config is not None else None
    if section["hot_path"] != "script" or not ratelimit or not (ratelimit["enabled"] and ratelimit["rules"]):
        return None
    if ratelimit["strategy"] != "fixed-window":
        return (f"ratelimit.strategy {ratelimit['strategy']!r} needs [redis] hot_path = \"limits\" "
                "(the one-round-trip script counts fixed windows)")
    return None


def _cluster_url_and_options(section: Mapping[str, Any]) -> str | None:
    try:
        target = parse_cluster_url(section["url"], section)
    except ValueError as exc:
        return f"redis.url: {exc}"
    for key in ("service_name", "sentinel_password"):
        if section.get(key):
            return f"redis.{key} is set but redis.url is not a redis+sentinel:// URL"
    if section.get("tls_ca_file") and not target.tls:
        return "redis.tls_ca_file is set but redis.url does not use TLS (rediss+cluster://)"
    return None


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
            schemes=SCHEMES + CLUSTER_SCHEMES,
        ),
        "service_name": Option(
            "str", None, "Sentinel master name, when the URL does not carry it (a different name in both is an error).",
        ),
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
            "float", 0, "PING idle connections older than this many seconds before use (single node and Sentinel: "
            "redis-py's cluster client takes no such setting); 0 = off (a dead one is retried anyway).",
            minimum=0,
        ),
        "client_name": Option("str", "regmw", "CLIENT SETNAME of regmw's connections (shows in CLIENT LIST)."),
        "protocol": Option(
            "int", 2, "RESP protocol version spoken to Redis (2 parses faster in redis-py; 3 if your proxy needs it).",
            minimum=2, maximum=3,
        ),
        "tls_ca_file": Option("path", None, "CA bundle verifying the server's certificate for rediss://, rediss+sentinel:// and rediss+cluster://."),
        "cache_ttl": Option("float", 300.0, "Seconds a cache entry lives when the caller gives no TTL.", minimum=0.001),
        "hot_path": Option(
            "str", "script",
            "How a request is admitted: `script` = rate limits (fixed window), read-only check and cache prefetch in "
            "ONE round trip (a Lua script); `limits` = through the `limits` library, any [ratelimit] strategy, "
            "several round trips.",
            choices=("script", "limits"),
        ),
    },
    checks=(url_and_options, script_counts_fixed_windows),
)
