"""The ``[notifications]`` configuration section (declared through ``regmw_config_sections``).

Endpoint tables are checked here, in the schema, so ``regmw check-config``
refuses exactly what start-up would (a private endpoint address, a bad secret).
"""
from __future__ import annotations

from regmw.config import Option, Section

from .endpoints import parse_endpoints


def endpoints_are_valid(section, config) -> str | None:
    """endpoints: each table's keys and values (`secrets`, `actions`, `media_types`, `repositories` lists of
    strings, not one string; `timeout` > 0; `jitter` 0 to 1), unique names, secrets that are Standard Webhooks secrets, and
    URLs outside loopback/link-local/private/other non-public networks unless in allowed_networks (IP literals
    and localhost; names are checked before each POST)."""
    try:
        parse_endpoints(section["endpoints"], section["allowed_networks"])
    except (ValueError, TypeError) as exc:
        return f"notifications.{exc}"
    return None


def wait_fits_the_socket_timeout(section, config) -> str | None:
    """wait_timeout below [redis] socket_timeout when wait_replicas is set: otherwise the socket times out
    before WAIT answers, so a master without replicas looks down and its events are re-added again and again."""
    socket_timeout = (config.get("redis") or {}).get("socket_timeout")
    if section["wait_replicas"] and socket_timeout and section["wait_timeout"] >= socket_timeout:
        return (f"notifications.wait_timeout ({section['wait_timeout']}) must be below redis.socket_timeout "
                f"({socket_timeout}) when notifications.wait_replicas is set")
    return None


SECTION = Section(
    "notifications",
    "Webhook notifications: events of successful requests, queued durably and delivered in order per repository.",
    {
        "endpoints": Option(
            "table-list", [],
            "Webhook receivers: tables with `name`, `url` (required), `secrets` (Standard Webhooks secrets "
            "`whsec_...`; several = rotation, every one signs), `actions`, `media_types`, `repositories` "
            "(fnmatch patterns; empty = all), `timeout` (s the whole POST may take, answer included; default 5), "
            "`retry_schedule` (seconds before each attempt, the first sent at once whatever its entry; "
            "default 0, 5, 300, 1800, 7200, 18000, 36000, the last repeating; a 429/503's longer "
            "Retry-After is waited for, up to the longest step), `jitter` (fraction, "
            "default 0.2), `max_age` (s an event may wait before it is parked, default 259200), `batch_max` "
            "(events per POST, default 1), `headers` (a table of extra headers; a Content-Type replaces ours, "
            "whatever its case; the webhook-* headers, Host, Content-Length and the like are refused).",
        ),
        "allowed_networks": Option(
            "cidrs", [],
            "Networks endpoints may resolve into although they are not public (loopback, link-local, private, shared...) "
            "(the SSRF guard refuses those otherwise), e.g. [\"127.0.0.0/8\"].",
        ),
        "shards": Option(
            "int", 16, "Streams the events are sharded over by repository; one leased consumer per shard delivers.",
            minimum=1, maximum=1024,
        ),
        "pulls": Option("bool", True, "Emit `pull` events for GET of manifests and blobs."),
        "spool_dir": Option(
            "path", "regmw-spool",
            "Directory of the on-disk spools (SQLite, WAL): events wait there while Redis is unreachable; "
            "without Redis it is the queue itself. One file per process, adopted by the next one after a crash.",
        ),
        "wait_replicas": Option(
            "int", 0,
            "After each XADD, WAIT for this many replicas to acknowledge it (0 = off). Without it a Redis "
            "failover can lose an event whose XADD was acknowledged.", minimum=0,
        ),
        "wait_timeout": Option("float", 0.1, "Seconds WAIT may block; fewer replicas than asked = spooled too.",
                               minimum=0.001),
        "breaker_seconds": Option(
            "float", 1.0,
            "After Redis failed, requests spool straight to disk for this long before trying Redis again "
            "(bounds what an outage adds to a request).", minimum=0,
        ),
        "lease_ttl": Option("float", 10.0, "Seconds a worker's lease on a shard lasts (renewed every third).",
                            minimum=0.3),
        "claim_idle": Option(
            "float", 0.0,
            "Seconds an entry a dead worker had taken must sit idle before another worker reclaims it "
            "(XAUTOCLAIM); 0 = the largest endpoint timeout plus one second.", minimum=0,
        ),
        "delivery_thread": Option(
            "str", "auto",
            "Deliver from a thread inside the server (`regmw serve`, `regmw demo`, any app; never in a CLI command): `on`, `off`, or "
            "`auto` = on without Redis (the embedded queue has no other deliverer; one process at a time "
            "delivers), off with Redis (run `regmw notifications worker`).", choices=("auto", "on", "off"),
        ),
        "max_shards_per_worker": Option("int", 0, "Shards one worker process leases at most; 0 = all it can get.",
                                        minimum=0),
    },
    checks=(endpoints_are_valid, wait_fits_the_socket_timeout),
)


