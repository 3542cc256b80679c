"""The throttle: go, slow down or pause a batch, from the dbroute health checker's lag figures.

The figures come from ``services.db_router.replica_lag()`` (the router's
public report; no other plugin's module is imported). The rule, for the next
batch of a migration whose previous batch left the primary at WAL position
``after_lsn``:

1. no router (no ``dbroute``) or no replicas                  → go;
2. no completed health round since ``after_lsn``, or the
   primary is down                                           → wait: the figures do not
   include the previous batch yet (this bounds the WAL a migration writes
   between two looks at the lag to one batch);
3. a replica quarantined, never checked, or lagging at least
   ``max_replica_lag`` seconds or ``max_replica_byte_lag`` bytes → pause;
4. lagging at least half of either                           → slow (wait ``throttle_delay``, then go);
5. otherwise                                                  → go.

The limits sit below dbroute's quarantine limits (``[database] max_replay_lag``
and ``max_byte_lag``; the section check enforces it), so the migration stops
writing before the health checker would quarantine a replica. A paused batch
writes nothing to the database (a write would only add lag): its state is
kept in the job queue's state store instead.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Verdict:
    action: Literal["go", "slow", "wait", "pause"]
    reason: str = ""


GO = Verdict("go")


def judge(report: Mapping[str, Any] | None, after_lsn: int, settings: Mapping[str, Any]) -> Verdict:
    """What the next batch should do, given the router's :meth:`replica_lag` report (None: no router)."""
    if report is None or not report.get("replicas"):
        return GO
    if not report.get("primary_up", True):
        return Verdict("wait", "the primary is down")
    checked = report.get("checked_lsn")
    if checked is None or checked < after_lsn:
        return Verdict("wait", "no replica health check since the previous batch")
    max_lag, max_bytes = settings["max_replica_lag"], settings["max_replica_byte_lag"]
    slow = ""
    for replica in report["replicas"]:
        name, time_lag, byte_lag = replica["name"], replica.get("time_lag"), replica.get("byte_lag")
        if replica.get("quarantined"):
            return Verdict("pause", f"replica {name} is quarantined")
        if time_lag is None or byte_lag is None:
            return Verdict("pause", f"replica {name} has no lag measurement")
        if time_lag >= max_lag:
            return Verdict("pause", f"replica {name} lags {time_lag:.2f}s >= {max_lag:g}s")
        if byte_lag >= max_bytes:
            return Verdict("pause", f"replica {name} lags {byte_lag} bytes >= {max_bytes}")
        if not slow and (time_lag >= max_lag / 2 or byte_lag >= max_bytes / 2):
            slow = f"replica {name} lags {time_lag:.2f}s / {byte_lag} bytes (over half the limit)"
    return Verdict("slow", slow) if slow else GO


def lag_report(services: Any) -> Mapping[str, Any] | None:
    """The router's report, or None when there is no router or it has no ``replica_lag``."""
    router = getattr(services, "db_router", None)
    report = getattr(router, "replica_lag", None)
    return report() if callable(report) else None
