"""The ``[database]`` section and the settings object the router is built from.

Everything that can be wrong with it is found by the schema, before anything
is built: URLs by their options, and the cross-field rules (the one the
read-your-writes guarantee rests on, see ``lsn_ttl``) by the section's
``checks``, so ``regmw check-config`` refuses them too.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from regmw.config import Option, Section

PG_SCHEMES = ("postgresql", "postgresql+psycopg2", "postgres")


def staleness(section: Mapping[str, Any]) -> float:
    """Seconds after which a replica's last good health check is too old to trust."""
    return 3 * section["health_interval"] + section["connect_timeout"]


def lsn_ttl_outlives_quarantine(section: Mapping[str, Any], config: Any = None) -> str | None:
    """`lsn_ttl` exceeds `max_replay_lag` + 3 × `health_interval` + `connect_timeout`: a replica still lacking an expired write position has been quarantined by then."""
    floor = section["max_replay_lag"] + staleness(section)
    if section["lsn_ttl"] <= floor:
        return (
            f"database.lsn_ttl: must exceed max_replay_lag + 3 × health_interval + connect_timeout "
            f"(= {floor:g}s), or a replica could serve a read of a write whose position already expired "
            f"(got {section['lsn_ttl']:g})"
        )
    return None


def store_url_needs_redis_store(section: Mapping[str, Any], config: Any = None) -> str | None:
    """`store_url` is only read with `store` = `redis` or `auto`."""
    if section["store_url"] and section["store"] == "memory":
        return "database.store_url is set but database.store = \"memory\" never reads it"
    return None


def _check_urls(urls: list[str]) -> list[str]:
    from urllib.parse import urlsplit

    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in PG_SCHEMES or not parts.netloc:
            raise ValueError(f"{url!r} is not a postgresql:// URL")
    return urls


def _check_namespace(value: str) -> str:
    if any(char in value for char in "{} "):
        raise ValueError("must not contain braces or spaces (braces would become a Redis Cluster hash tag)")
    return value


SECTION = Section(
    "database",
    "Database routing (plugin `dbroute`): writes to the primary, reads to an up-to-date replica.",
    {
        "primary": Option(
            "url", None,
            "SQLAlchemy URL of the primary (`postgresql://user:pass@host:5432/db`). Every write goes here.",
            required=True, schemes=PG_SCHEMES,
        ),
        "replicas": Option(
            "list", [],
            "SQLAlchemy URLs of the streaming replicas that may serve reads. Empty: everything goes to the primary.",
            check=_check_urls,
        ),
        "pool_size": Option("int", 5, "Connections kept open per database by the request pools.", minimum=1),
        "max_overflow": Option("int", 10, "Extra connections a request pool may open under load.", minimum=0),
        "pool_timeout": Option(
            "float", 5.0, "Seconds a request waits for a free pooled connection before failing.", minimum=0.1
        ),
        "pool_recycle": Option(
            "float", 1800.0, "Seconds after which a pooled connection is replaced (survives idle-killing proxies).",
            minimum=1,
        ),
        "pre_ping": Option(
            "bool", True,
            "Test a pooled connection (to the primary or a replica) before handing it out, so a restarted "
            "server costs a new connection, not an error in the app (a write's 503, the primary marked down).",
        ),
        "connect_timeout": Option(
            "int", 2,
            "libpq `connect_timeout` in seconds (libpq treats 1 as 2). Bounds how long a request, the health "
            "check or the write-position recording waits for a dead server.",
            minimum=1,
        ),
        "statement_timeout": Option(
            "float", 30.0, "Server-side `statement_timeout` in seconds for routed connections; 0 = none.", minimum=0
        ),
        "health_interval": Option(
            "float", 1.0, "Seconds between two health checks of the primary and every replica.", minimum=0.05
        ),
        "max_byte_lag": Option(
            "int", 16 * 1024 * 1024,
            "A replica whose replay position is more than this many WAL bytes behind the primary is quarantined.",
            minimum=0,
        ),
        "max_replay_lag": Option(
            "float", 30.0,
            "A replica that has not replayed WAL the primary wrote this many seconds ago is quarantined.",
            minimum=0,
        ),
        "failure_threshold": Option(
            "int", 3, "Consecutive failed checks or connections after which a replica is quarantined.", minimum=1
        ),
        "reintegrate_after": Option(
            "int", 2, "Consecutive good health checks a quarantined replica needs before it serves reads again.",
            minimum=1,
        ),
        "replay_position_max_age": Option(
            "float", 0.05,
            "Seconds a replica's replay position read on the request path is reused before it is asked again. "
            "A replica is only chosen for a repository with a recorded write when a known position has reached it.",
            minimum=0,
        ),
        "lsn_ttl": Option(
            "float", 600.0,
            "Seconds a repository's recorded write position is kept. Must exceed max_replay_lag + "
            "3 × health_interval + connect_timeout: a replica still lacking an expired position would have "
            "been quarantined by then.",
            minimum=1,
        ),
        "store": Option(
            "str", "auto",
            "Where write positions are shared: `auto` = Redis when a plugin provides the shared Redis "
            "(`services.redis`, e.g. the `redis` plugin) or `store_url` is set, else `memory` (one process only); "
            "`redis`; `memory`.",
            choices=("auto", "redis", "memory"),
        ),
        "store_url": Option(
            "str", "",
            "Redis URL for the position store when no plugin provides the shared Redis (`services.redis`).",
        ),
        "store_namespace": Option(
            "str", "",
            "Prefix of the position store's Redis keys (`<namespace>:{repository:<name>}:lsn`, "
            "`<namespace>:{dbroute}:floor`). Empty: the shared Redis' namespace (`[redis] namespace` "
            "with the `redis` plugin), else `regmw`. Deployments sharing one Redis (e.g. through `store_url`) need different namespaces, "
            "or their positions and floors mix.",
            check=_check_namespace,
        ),
        "store_timeout": Option(
            "float", 0.25, "Socket timeout in seconds of the position store's own Redis connection.", minimum=0.01
        ),
        "store_retry": Option(
            "float", 1.0,
            "After a store error, seconds during which reads go straight to the primary without trying the store.",
            minimum=0,
        ),
    },
    checks=(lsn_ttl_outlives_quarantine, store_url_needs_redis_store),
)


class Settings:
    """The validated ``[database]`` section as read-only attributes.

    Its attributes are :data:`SECTION`'s options, declared once there (with
    their types, defaults and meanings); this class only adds the one derived
    value, :attr:`health_staleness`.
    """

    def __init__(self, section: Mapping[str, Any]) -> None:
        missing = [key for key in SECTION.options if key not in section]
        if missing:
            raise TypeError(f"database settings lack {', '.join(missing)}")
        values = {key: section[key] for key in SECTION.options}
        values["replicas"] = tuple(values["replicas"] or ())
        self.__dict__.update(values)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("database settings are read-only")

    def __getattr__(self, name: str) -> Any:  # only reached for names that are not options
        raise AttributeError(f"[database] has no option {name!r}")

    @property
    def health_staleness(self) -> float:
        """A replica whose last good check is older than this is not used (the checker may be stuck)."""
        return staleness(self.__dict__)


def settings_from_config(section: Mapping[str, Any]) -> Settings:
    """The router's settings from a validated ``[database]`` section (the schema has checked its rules)."""
    return Settings(section)
