"""The ``[db_migrations]`` section: where the state lives, retries, and the replica-lag throttle.

The throttle's limits must stay below dbroute's quarantine limits
(``[database] max_replay_lag`` / ``max_byte_lag``): a migration pauses before
its writes could get a replica quarantined. The section's check refuses a
configuration where they do not (``regmw check-config`` says so).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from regmw.config import Option, Section

PG_SCHEMES = ("postgresql", "postgresql+psycopg2", "postgres")


def throttle_below_quarantine(section: Mapping[str, Any], config: Any = None) -> str | None:
    """`max_replica_lag` < `[database] max_replay_lag` and `max_replica_byte_lag` < `[database] max_byte_lag`."""
    database = config.get("database") if config is not None else None
    if not database:
        return None
    if section["max_replica_lag"] >= database["max_replay_lag"]:
        return (f"db_migrations.max_replica_lag ({section['max_replica_lag']:g}s) must be below "
                f"database.max_replay_lag ({database['max_replay_lag']:g}s), or a migration could get a "
                "replica quarantined before it pauses")
    if section["max_replica_byte_lag"] >= database["max_byte_lag"]:
        return (f"db_migrations.max_replica_byte_lag ({section['max_replica_byte_lag']}) must be below "
                f"database.max_byte_lag ({database['max_byte_lag']}), or a migration could get a replica "
                "quarantined before it pauses")
    return None


def primary_is_known(section: Mapping[str, Any], config: Any = None) -> str | None:
    """`primary` is set, or the `dbroute` plugin's `[database]` section names one."""
    if section["primary"] or (config is not None and config.get("database")):
        return None
    return ("db_migrations.primary is empty and no [database] section (plugin dbroute) names a primary: "
            "set one of them")


SECTION = Section(
    "db_migrations",
    "Batched background database migrations (plugin `db-migrations`, docs/db-migrations.md).",
    {
        "primary": Option(
            "str", "",
            "SQLAlchemy URL of the PostgreSQL primary holding the migrated tables and the state tables. "
            "Empty: the database router's primary (`[database] primary`, plugin `dbroute`).",
        ),
        "max_replica_lag": Option(
            "float", 10.0,
            "A replica lagging this many seconds (as the dbroute health checker measures it) pauses every "
            "migration; half of it slows them (each batch waits `throttle_delay`). Must be below "
            "`[database] max_replay_lag`, where dbroute quarantines the replica.",
            minimum=0.01,
        ),
        "max_replica_byte_lag": Option(
            "int", 4 * 1024 * 1024,
            "A replica this many WAL bytes behind the primary pauses every migration; half of it slows them. "
            "Must be below `[database] max_byte_lag` minus the WAL one batch writes.",
            minimum=1,
        ),
        "throttle_delay": Option(
            "float", 1.0, "Seconds a slowed batch waits, and between two looks at the lag while paused.",
            minimum=0.01,
        ),
        "throttle_hold": Option(
            "float", 10.0,
            "Seconds a batch job waits in its worker thread for the lag to fall (or for a health check newer "
            "than the previous batch) before it gives the thread back and requeues itself `throttle_delay` later.",
            minimum=0,
        ),
        "max_attempts": Option(
            "int", 5, "Attempts per batch before the migration stops as `failed` (a declaration may override).",
            minimum=1,
        ),
        "min_backoff": Option("float", 1.0, "Seconds before a failed batch's second attempt (doubling after).",
                              minimum=0),
        "max_backoff": Option("float", 300.0, "Longest wait between two attempts of a batch.", minimum=0),
        "batch_timeout": Option(
            "float", 300.0, "`statement_timeout` in seconds of a batch's statements (0 = none).", minimum=0
        ),
        "stale_after": Option(
            "float", 600.0,
            "Seconds after which the scheduler enqueues a queued batch again (its job was lost), unless a job of "
            "that batch, held back by the throttle, was seen alive within this time. A duplicate job is "
            "harmless: it finds the batch done.",
            minimum=1,
        ),
        "scheduler_interval": Option(
            "float", 30.0,
            "Seconds between two runs of the periodic scheduler (one worker in the cluster at a time), which "
            "restarts migrations whose batch job was lost.",
            minimum=0.1,
        ),
    },
    checks=(primary_is_known, throttle_below_quarantine),
)
