"""The state tables on the primary, and every statement that reads or changes them.

Three tables, created idempotently (``CREATE ... IF NOT EXISTS`` under a
transaction-scoped advisory lock, so two processes starting at once do not
race on the catalog):

- ``regmw_batched_migrations``: one row per migration (its range, batch size,
  ``status``: active, paused, finished or failed, and the last error);
- ``regmw_batched_migration_batches``: one row per key range ``[start_key,
  stop_key)``: ``pending``, ``queued`` (a job is due at ``due_at``),
  ``succeeded`` or ``failed``, with its attempt count;
- ``regmw_batched_migration_attempts``: one row per attempt (start, end,
  outcome, error), written in the batch's own transaction.

At most one batch of a migration is ``queued`` at a time: a migration's
batches run one after the other, each only when the throttle allows, so its
write rate is bounded by what the replicas replay. The migration row is
locked (``FOR UPDATE``) while a batch runs: a pause waits for the batch in
flight, and a duplicate job finds the batch already succeeded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

MIGRATIONS = "regmw_batched_migrations"
BATCHES = "regmw_batched_migration_batches"
ATTEMPTS = "regmw_batched_migration_attempts"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {MIGRATIONS} (
    name text PRIMARY KEY,
    table_name text NOT NULL,
    key_column text NOT NULL,
    batch_size bigint NOT NULL,
    min_key bigint,
    max_key bigint,
    status text NOT NULL CHECK (status IN ('active', 'paused', 'finished', 'failed')),
    last_error text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE TABLE IF NOT EXISTS {BATCHES} (
    migration text NOT NULL REFERENCES {MIGRATIONS} (name) ON DELETE CASCADE,
    id integer NOT NULL,
    start_key bigint NOT NULL,
    stop_key bigint NOT NULL,
    status text NOT NULL CHECK (status IN ('pending', 'queued', 'succeeded', 'failed')),
    attempts integer NOT NULL DEFAULT 0,
    due_at timestamptz,
    finished_at timestamptz,
    last_error text NOT NULL DEFAULT '',
    PRIMARY KEY (migration, id)
);
CREATE TABLE IF NOT EXISTS {ATTEMPTS} (
    id bigserial PRIMARY KEY,
    migration text NOT NULL,
    batch integer NOT NULL,
    attempt integer NOT NULL,
    started_at timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    outcome text NOT NULL CHECK (outcome IN ('succeeded', 'failed')),
    error text NOT NULL DEFAULT '',
    FOREIGN KEY (migration, batch) REFERENCES {BATCHES} (migration, id) ON DELETE CASCADE
)
"""


def ensure_schema(conn: Connection) -> None:
    """Create the state tables if missing (call inside a transaction)."""
    conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:name))"), {"name": MIGRATIONS})
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(text(statement))


@dataclass(frozen=True)
class MigrationRow:
    name: str
    table: str
    key: str
    batch_size: int
    min_key: int | None
    max_key: int | None
    status: str
    last_error: str


@dataclass(frozen=True)
class BatchRow:
    id: int
    start: int
    stop: int
    status: str
    attempts: int


def lock_migration(conn: Connection, name: str, skip_locked: bool = False) -> MigrationRow | None:
    """The migration's row, locked for this transaction (None if absent, or locked elsewhere with ``skip_locked``)."""
    row = conn.execute(text(
        f"SELECT name, table_name, key_column, batch_size, min_key, max_key, status, last_error FROM {MIGRATIONS} "
        f"WHERE name = :name FOR UPDATE{' SKIP LOCKED' if skip_locked else ''}"), {"name": name}).first()
    return MigrationRow(*row) if row else None


def read_status(conn: Connection, name: str) -> str | None:
    """The migration's status without locking (a plain read on the primary)."""
    return conn.execute(text(f"SELECT status FROM {MIGRATIONS} WHERE name = :name"), {"name": name}).scalar()


def create_migration(conn: Connection, name: str, table: str, key: str, batch_size: int) -> bool:
    """Insert the migration and its batches, from the key range read now; False if it already existed."""
    inserted = conn.execute(text(
        f"INSERT INTO {MIGRATIONS} (name, table_name, key_column, batch_size, status) "
        "VALUES (:name, :table, :key, :size, 'active') ON CONFLICT (name) DO NOTHING RETURNING name"),
        {"name": name, "table": table, "key": key, "size": batch_size}).first()
    if inserted is None:
        return False
    low, high = conn.execute(text(f"SELECT min({key}), max({key}) FROM {table}")).one()
    conn.execute(text(f"UPDATE {MIGRATIONS} SET min_key = :low, max_key = :high WHERE name = :name"),
                 {"low": low, "high": high, "name": name})
    if low is not None:
        conn.execute(text(
            f"INSERT INTO {BATCHES} (migration, id, start_key, stop_key, status) "
            "SELECT :name, g.i, :low + g.i * :size, LEAST(:low + (g.i + 1) * :size, :high + 1), 'pending' "
            "FROM generate_series(0, (:high - :low) / :size) AS g(i)"),
            {"name": name, "low": low, "high": high, "size": batch_size})
    return True


def set_status(conn: Connection, name: str, status: str, error: str | None = None) -> None:
    conn.execute(text(
        f"UPDATE {MIGRATIONS} SET status = :status, updated_at = now(), "
        "last_error = COALESCE(:error, last_error), "
        "finished_at = CASE WHEN :status = 'finished' THEN now() ELSE finished_at END WHERE name = :name"),
        {"status": status, "error": error, "name": name})


def lock_batch(conn: Connection, name: str, batch: int) -> BatchRow | None:
    row = conn.execute(text(
        f"SELECT id, start_key, stop_key, status, attempts FROM {BATCHES} "
        "WHERE migration = :name AND id = :batch FOR UPDATE"), {"name": name, "batch": batch}).first()
    return BatchRow(*row) if row else None


def record_attempt(conn: Connection, name: str, batch: int, attempt: int, started: Any, outcome: str,
                   error: str = "") -> None:
    conn.execute(text(
        f"INSERT INTO {ATTEMPTS} (migration, batch, attempt, started_at, outcome, error) "
        "VALUES (:name, :batch, :attempt, :started, :outcome, :error)"),
        {"name": name, "batch": batch, "attempt": attempt, "started": started, "outcome": outcome,
         "error": error[:2000]})


def batch_succeeded(conn: Connection, name: str, batch: int) -> None:
    conn.execute(text(
        f"UPDATE {BATCHES} SET status = 'succeeded', attempts = attempts + 1, finished_at = now(), "
        "due_at = NULL, last_error = '' WHERE migration = :name AND id = :batch"), {"name": name, "batch": batch})


def batch_failed(conn: Connection, name: str, batch: int, error: str, retry_in: float | None) -> None:
    """One more failed attempt: queued again ``retry_in`` seconds from now, or ``failed`` for good (None)."""
    conn.execute(text(
        f"UPDATE {BATCHES} SET attempts = attempts + 1, last_error = :error, "
        "status = CASE WHEN CAST(:retry AS float8) IS NULL THEN 'failed' ELSE 'queued' END, "
        "due_at = CASE WHEN CAST(:retry AS float8) IS NULL THEN NULL "
        "ELSE now() + make_interval(secs => CAST(:retry AS float8)) END, "
        "finished_at = CASE WHEN CAST(:retry AS float8) IS NULL THEN now() ELSE NULL END "
        "WHERE migration = :name AND id = :batch"),
        {"error": error[:2000], "retry": retry_in, "name": name, "batch": batch})


def peek(conn: Connection, name: str, stale_after: float) -> tuple[str | None, bool, int | None]:
    """(status, busy, queued batch) WITHOUT locking anything: a lock (``FOR UPDATE``) writes WAL, which a
    paused migration must not do (a commit every few seconds would keep a delayed replica lagging).

    ``busy``: a batch is queued and not overdue by ``stale_after``; the queued batch's id either way.
    """
    row = conn.execute(text(
        f"SELECT m.status, q.id, q.due_at >= now() - make_interval(secs => :stale) FROM {MIGRATIONS} m "
        f"LEFT JOIN LATERAL (SELECT b.id, b.due_at FROM {BATCHES} b WHERE b.migration = m.name "
        "AND b.status = 'queued' ORDER BY b.id LIMIT 1) q ON true WHERE m.name = :name"),
        {"name": name, "stale": stale_after}).first()
    return (row[0], bool(row[2]), row[1]) if row else (None, False, None)


def read_batch_status(conn: Connection, name: str, batch: int) -> str | None:
    """A batch's status without locking (a plain read on the primary)."""
    return conn.execute(text(f"SELECT status FROM {BATCHES} WHERE migration = :name AND id = :batch"),
                        {"name": name, "batch": batch}).scalar()


def next_batch(conn: Connection, name: str, stale_after: float) -> tuple[int | None, bool]:
    """The batch to enqueue next, marked ``queued``; (None, busy) when none.

    ``busy`` is True when a batch is already queued and not stale (its job is
    in the queue or running): nothing to do. A queued batch due more than
    ``stale_after`` seconds ago lost its job and is handed out again. Call
    with the migration row locked.
    """
    queued = conn.execute(text(
        f"SELECT id, due_at < now() - make_interval(secs => :stale) FROM {BATCHES} "
        "WHERE migration = :name AND status = 'queued' ORDER BY id LIMIT 1"),
        {"name": name, "stale": stale_after}).first()
    if queued is not None:
        batch, stale = queued
        if not stale:
            return None, True
        conn.execute(text(f"UPDATE {BATCHES} SET due_at = now() WHERE migration = :name AND id = :batch"),
                     {"name": name, "batch": batch})
        return batch, False
    batch = conn.execute(text(
        f"UPDATE {BATCHES} SET status = 'queued', due_at = now() WHERE migration = :name AND id = "
        f"(SELECT id FROM {BATCHES} WHERE migration = :name AND status = 'pending' ORDER BY id LIMIT 1) "
        "RETURNING id"), {"name": name}).scalar()
    return batch, False


def unfinished(conn: Connection, name: str) -> dict[str, int]:
    """Batches not yet succeeded, by status."""
    rows = conn.execute(text(
        f"SELECT status, count(*) FROM {BATCHES} WHERE migration = :name AND status <> 'succeeded' GROUP BY status"),
        {"name": name}).all()
    return {status: count for status, count in rows}


def reset_failed(conn: Connection, name: str) -> int:
    """Failed batches back to ``pending`` with a fresh attempt count (``resume`` of a failed migration)."""
    return conn.execute(text(
        f"UPDATE {BATCHES} SET status = 'pending', attempts = 0, due_at = NULL "
        "WHERE migration = :name AND status = 'failed'"), {"name": name}).rowcount


def active_migrations(conn: Connection) -> list[str]:
    return list(conn.execute(text(f"SELECT name FROM {MIGRATIONS} WHERE status = 'active' ORDER BY name")).scalars())


def summaries(conn: Connection, name: str | None = None) -> list[dict[str, Any]]:
    """Each migration with its batch counts by status, for ``status``."""
    rows = conn.execute(text(
        f"SELECT m.name, m.table_name, m.key_column, m.batch_size, m.min_key, m.max_key, m.status, m.last_error, "
        "m.created_at, m.finished_at, "
        "count(b.id) AS total, "
        "count(b.id) FILTER (WHERE b.status = 'succeeded') AS succeeded, "
        "count(b.id) FILTER (WHERE b.status = 'queued') AS queued, "
        "count(b.id) FILTER (WHERE b.status = 'pending') AS pending, "
        "count(b.id) FILTER (WHERE b.status = 'failed') AS failed, "
        "COALESCE(sum(b.attempts), 0) AS attempts "
        f"FROM {MIGRATIONS} m LEFT JOIN {BATCHES} b ON b.migration = m.name "
        + ("WHERE m.name = :name " if name else "") +
        "GROUP BY m.name ORDER BY m.name"), {"name": name} if name else {}).mappings().all()
    return [dict(row) for row in rows]


def attempts(conn: Connection, name: str) -> list[dict[str, Any]]:
    rows = conn.execute(text(
        f"SELECT batch, attempt, started_at, finished_at, outcome, error FROM {ATTEMPTS} "
        "WHERE migration = :name ORDER BY id"), {"name": name}).mappings().all()
    return [dict(row) for row in rows]
