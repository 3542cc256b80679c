"""Running migrations: start, pause, resume, one batch as a job, and the periodic scheduler.

Each batch is one job (``db-migration-batch``, through ``services.jobs``).
A batch job:

1. returns at once unless the migration is ``active`` (a paused migration's
   job ends; ``resume`` enqueues the batch again);
2. asks the throttle (:mod:`.throttle`) and waits in its thread up to
   ``throttle_hold`` seconds for it to say go; still paused after that, it
   requeues itself ``throttle_delay`` seconds later, writing nothing;
3. in ONE transaction on the primary: locks the migration row, locks the
   batch row and returns if the batch is no longer ``queued`` (a duplicate
   job: at-least-once delivery makes that normal), runs the batch function in
   a savepoint, records the attempt, and marks the next batch ``queued``;
4. after the commit, enqueues the next batch's job with the primary's WAL
   position, so the next batch waits for a health check that includes this one.

A failed batch function is rolled back to its savepoint, the attempt is
recorded, and the batch is queued again after an exponential backoff
(``min_backoff`` doubling up to ``max_backoff``), until ``max_attempts``;
then the batch is ``failed`` and the migration stops as ``failed``
(``resume`` retries its failed batches). An error outside the batch
function (the primary is down) fails the job, which the job queue retries.
A job lost with its worker leaves its batch ``queued``; the periodic
scheduler (``db-migrations-scheduler``) enqueues it again after ``stale_after``,
unless a job of that batch held back by the throttle beat within
``stale_after`` (a heartbeat in the job queue's state store, no WAL): a long
lag pause keeps one job per migration, not one more per ``stale_after``.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.engine import URL, Engine

from regmw import metrics
from regmw.batched import BatchedMigration, collect_migrations
from regmw.errors import ConfigError
from regmw.jobs import JobContext

from . import state
from .throttle import judge, lag_report

log = logging.getLogger("regmw.db_migrations")

BATCH_JOB = "db-migration-batch"
SCHEDULER_JOB = "db-migrations-scheduler"

BATCHES = Counter(
    "regmw_db_migration_batches_total", "Batches of background database migrations, by outcome.",
    ["migration", "outcome"], registry=metrics.REGISTRY,
)
THROTTLED = Counter(
    "regmw_db_migration_throttled_total",
    "Batches held back by replica lag (slow = waited throttle_delay; pause = waited for the lag to fall; "
    "requeued = gave its worker thread back while paused).",
    ["migration", "action"], registry=metrics.REGISTRY,
)

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def postgres_url(url: str) -> URL:
    """``postgres://`` and ``postgresql://`` driven with psycopg2 (what ``regmw[db]`` installs; SQLAlchemy 2.1
    would pick psycopg 3 for a bare ``postgresql://``); an explicit driver (``postgresql+psycopg://``) is kept."""
    parsed = make_url("postgresql://" + url[len("postgres://"):] if url.startswith("postgres://") else url)
    return parsed.set(drivername="postgresql+psycopg2") if parsed.drivername == "postgresql" else parsed


def engine_for(url: str) -> Engine:
    """One small engine per primary URL and process (batches of one migration run one at a time)."""
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = create_engine(postgres_url(url), pool_size=2, max_overflow=4, pool_pre_ping=True,
                                   connect_args={"connect_timeout": 5, "application_name": "regmw-db-migrations"})
            _engines[url] = engine
        return engine


def backoff(settings: Mapping[str, Any], attempt: int) -> float:
    """Seconds before attempt ``attempt + 1``: min_backoff doubling, capped at max_backoff."""
    return min(settings["max_backoff"], settings["min_backoff"] * 2 ** max(0, attempt - 1))


def throttle_key(name: str) -> str:
    return f"db-migrations:{name}:throttle"


def alive_key(name: str) -> str:
    """Job-queue state key of the heartbeat of the migration's batch job that the throttle holds back."""
    return f"db-migrations:{name}:alive"


class Runner:
    """Everything the jobs and the CLI do, on one configuration's services."""

    def __init__(self, services: Any) -> None:
        self.services = services
        self.settings = services.config["db_migrations"]
        self.migrations: dict[str, BatchedMigration] = collect_migrations(services.config, services.pm)
        self._engine: Engine | None = None
        self._throttle_notes: dict[str, dict[str, Any]] = {}

    # --- plumbing ---------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            url = self.settings["primary"]
            if not url:
                router = getattr(self.services, "db_router", None)
                url = getattr(router, "primary_url", None)
            if not url:
                raise ConfigError("db_migrations.primary is empty and no database router (plugin dbroute) "
                                  "names a primary")
            self._engine = engine_for(url)
        return self._engine

    def declared(self, name: str) -> BatchedMigration:
        try:
            return self.migrations[name]
        except KeyError:
            known = ", ".join(sorted(self.migrations)) or "none"
            raise ConfigError(f"no batched migration named {name!r} is declared (known: {known})") from None

    def known(self, name: str, started: bool = False) -> None:
        """Refuse (ConfigError) a name that is not declared (``started``: nor started, i.e. in the state tables)."""
        if name in self.migrations:
            return
        if started:
            with self.engine.connect() as conn:
                with conn.begin():
                    state.ensure_schema(conn)
                current = state.read_status(conn, name)
                conn.rollback()
            if current is not None:
                return
        self.declared(name)

    def _enqueue(self, name: str, batch: int, after_lsn: int, delay: float = 0.0) -> None:
        queue = self.services.jobs
        if queue is None:
            raise ConfigError("no job queue is configured (services.jobs is None)")
        queue.enqueue(BATCH_JOB, delay=delay, migration=name, batch=batch, after_lsn=after_lsn)

    @staticmethod
    def _wal_lsn(conn: Any) -> int:
        lsn = int(conn.execute(text("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")).scalar())
        conn.rollback()
        return lsn

    # --- operations (CLI) ---------------------------------------------------------

    def start(self, name: str) -> str:
        """Create the migration (state tables, key range, batches) and enqueue its first batch; idempotent."""
        spec = self.declared(name)
        with self.engine.connect() as conn:
            with conn.begin():
                state.ensure_schema(conn)
                created = state.create_migration(conn, name, spec.table, spec.key, spec.batch_size)
            message = "started" if created else "already known"
        return f"{message}; {self.kick(name)}"

    def pause(self, name: str) -> str:
        """Mark the migration paused (waits for a batch in flight to commit); its queued batch goes back to pending."""
        with self.engine.connect() as conn, conn.begin():
            row = state.lock_migration(conn, name)
            if row is None:
                return "not started"
            if row.status != "active":
                return f"not active ({row.status})"
            state.set_status(conn, name, "paused")
            conn.execute(text(f"UPDATE {state.BATCHES} SET status = 'pending', due_at = NULL "
                              "WHERE migration = :name AND status = 'queued'"), {"name": name})
        return "paused"

    def resume(self, name: str) -> str:
        """Make a paused (or failed: its failed batches get fresh attempts) migration active and enqueue a batch."""
        with self.engine.connect() as conn:
            with conn.begin():
                row = state.lock_migration(conn, name)
                if row is None:
                    return "not started"
                if row.status == "finished":
                    return "already finished"
                reset = state.reset_failed(conn, name) if row.status == "failed" else 0
                state.set_status(conn, name, "active", "" if reset else None)
        return f"resumed{f' ({reset} failed batch(es) retried)' if reset else ''}; {self.kick(name)}"

    def kick(self, name: str) -> str:
        """Enqueue the next batch if the migration is active and none is queued (the scheduler's step).

        Looks first without locking, so the periodic scheduler writes nothing
        (no WAL) while a batch is queued, throttled or not.
        """
        with self.engine.connect() as conn:
            current, busy, queued = state.peek(conn, name, self.settings["stale_after"])
            conn.rollback()
        if current is None:
            return "not started"
        if current != "active":
            return current
        if busy or (queued is not None and self._job_alive(name, queued)):
            return "a batch is queued"  # overdue only because the throttle holds its (live) job back
        with self.engine.connect() as conn:
            with conn.begin():
                row = state.lock_migration(conn, name, skip_locked=True)
                if row is None:
                    return "a batch is running"
                if row.status != "active":
                    return row.status
                batch, busy = state.next_batch(conn, name, self.settings["stale_after"])
                if batch is None and not busy and not state.unfinished(conn, name):
                    state.set_status(conn, name, "finished")
                    return "finished"
            lsn = self._wal_lsn(conn)
        if batch is None:
            return "a batch is queued" if busy else "nothing to enqueue"
        self._enqueue(name, batch, lsn)
        return f"batch {batch} enqueued"

    def status(self, name: str | None = None) -> list[dict[str, Any]]:
        """Each migration's row with batch counts, plus its throttle note from the job queue's state."""
        with self.engine.connect() as conn:
            with conn.begin():
                state.ensure_schema(conn)
            rows = state.summaries(conn, name)
        queue = self.services.jobs
        for row in rows:
            row["throttle"] = (queue.get_state(throttle_key(row["name"])) if queue is not None else None) or {}
        return rows

    # --- jobs -----------------------------------------------------------------------

    def run_batch(self, context: JobContext, migration: str, batch: int, after_lsn: int = 0) -> None:
        """The ``db-migration-batch`` job (see the module docstring)."""
        spec = self.declared(migration)
        with self.engine.connect() as conn:
            current = state.read_status(conn, migration)
            queued = state.read_batch_status(conn, migration, batch) == "queued"
            conn.rollback()
        if current != "active" or not queued:
            return  # paused, or a duplicate job: it must not hold a worker thread in the throttle
        self._beat(migration, batch)
        if not self._wait_for_throttle(context, migration, after_lsn, batch):
            THROTTLED.labels(migration, "requeued").inc()
            self._enqueue(migration, batch, after_lsn, delay=self.settings["throttle_delay"])
            return
        context.check()
        following: int | None = None
        retry_in: float | None = None
        with self.engine.connect() as conn:
            with conn.begin():
                row = state.lock_migration(conn, migration)
                if row is None or row.status != "active":
                    return
                current_batch = state.lock_batch(conn, migration, batch)
                if current_batch is None or current_batch.status != "queued":
                    return  # a duplicate job: the batch is done, failed or back to pending
                started = conn.execute(text("SELECT clock_timestamp()")).scalar()
                timeout_ms = int(self.settings["batch_timeout"] * 1000)
                conn.execute(text(f"SET LOCAL statement_timeout = {timeout_ms}"))
                error = self._call(spec, conn, current_batch)
                attempt = current_batch.attempts + 1
                if error is None:
                    state.batch_succeeded(conn, migration, batch)
                    state.record_attempt(conn, migration, batch, attempt, started, "succeeded")
                    following, _ = state.next_batch(conn, migration, self.settings["stale_after"])
                    if following is None and not state.unfinished(conn, migration):
                        state.set_status(conn, migration, "finished")
                        log.warning("batched migration %s finished", migration)
                else:
                    max_attempts = spec.max_attempts or self.settings["max_attempts"]
                    retry_in = backoff(self.settings, attempt) if attempt < max_attempts else None
                    state.batch_failed(conn, migration, batch, error, retry_in)
                    state.record_attempt(conn, migration, batch, attempt, started, "failed", error)
                    if retry_in is None:
                        state.set_status(conn, migration, "failed", f"batch {batch}: {error}")
                        log.error("batched migration %s failed: batch %d after %d attempts: %s",
                                  migration, batch, attempt, error)
                    else:
                        log.warning("batched migration %s: batch %d attempt %d failed, retry in %.1fs: %s",
                                    migration, batch, attempt, retry_in, error)
            lsn = self._wal_lsn(conn)
        BATCHES.labels(migration, "succeeded" if error is None else "failed").inc()
        if following is not None:
            self._enqueue(migration, following, lsn)
        elif retry_in is not None:
            self._enqueue(migration, batch, lsn, delay=retry_in)

    @staticmethod
    def _call(spec: BatchedMigration, conn: Any, batch: state.BatchRow) -> str | None:
        """Run the batch function in a savepoint; its error (rolled back), or None."""
        savepoint = conn.begin_nested()
        try:
            spec.run(conn, batch.start, batch.stop)
        except Exception as exc:  # noqa: BLE001 - any failure of the function is an attempt that failed
            savepoint.rollback()
            return f"{type(exc).__name__}: {exc}"[:2000]
        savepoint.commit()
        return None

    def _beat(self, migration: str, batch: int) -> None:
        """Tell the scheduler this batch's job is alive (in the job queue's state store: no WAL)."""
        queue = self.services.jobs
        if queue is not None:
            queue.set_state(alive_key(migration), {"batch": batch, "at": time.time()}, time.time_ns())

    def _job_alive(self, migration: str, batch: int) -> bool:
        """A job of this batch beat within ``stale_after`` (it is held back by the throttle, not lost)."""
        queue = self.services.jobs
        note = (queue.get_state(alive_key(migration)) if queue is not None else None) or {}
        return note.get("batch") == batch and time.time() - note.get("at", 0.0) < self.settings["stale_after"]

    def _wait_for_throttle(self, context: JobContext, migration: str, after_lsn: int, batch: int = -1) -> bool:
        """Wait in this thread until the throttle says go (True) or ``throttle_hold`` passed (False)."""
        settings = self.settings
        deadline = time.monotonic() + settings["throttle_hold"]
        beat = time.monotonic()
        slowed = False
        while True:
            if time.monotonic() - beat >= settings["stale_after"] / 4:
                beat = time.monotonic()
                self._beat(migration, batch)
            report = lag_report(self.services)
            verdict = judge(report, after_lsn, settings)
            if verdict.action == "go" or (verdict.action == "slow" and slowed):
                self._note(migration, "running", "")
                return True
            if verdict.action == "slow":
                slowed = True
                THROTTLED.labels(migration, "slow").inc()
                self._note(migration, "slowed", verdict.reason)
                context.stop.wait(settings["throttle_delay"])
            else:
                if verdict.action == "pause":
                    self._note(migration, "paused", verdict.reason)
                if time.monotonic() >= deadline:
                    return False
                interval = (report or {}).get("health_interval", 0.1)
                context.stop.wait(min(settings["throttle_delay"], max(0.01, interval / 4)))
            context.check()

    def _note(self, migration: str, current: str, reason: str) -> None:
        """Record a throttle transition in the job queue's state store (never in the database: no WAL)."""
        note = self._throttle_notes.get(migration)
        queue = self.services.jobs
        if note is None:
            note = (queue.get_state(throttle_key(migration)) if queue is not None else None) or {
                "state": "running", "reason": "", "since": time.time(), "pauses": 0, "slows": 0}
            self._throttle_notes[migration] = note
        if note["state"] == current:
            return
        note = dict(note, state=current, reason=reason, since=time.time())
        if current == "paused":
            note["pauses"] += 1
            THROTTLED.labels(migration, "pause").inc()
            log.warning("batched migration %s paused: %s", migration, reason)
        elif current == "slowed":
            note["slows"] += 1
        elif self._throttle_notes[migration]["state"] == "paused":
            log.warning("batched migration %s resumed", migration)
        self._throttle_notes[migration] = note
        if queue is not None:
            queue.set_state(throttle_key(migration), note, time.time_ns())

    def schedule(self, context: JobContext) -> None:
        """The periodic scheduler: enqueue a batch for each active migration that has none in flight."""
        if not self.migrations:
            return  # nothing declared here: do not even connect
        with self.engine.connect() as conn:
            with conn.begin():
                state.ensure_schema(conn)
            names = state.active_migrations(conn)
            conn.rollback()
        for name in names:
            context.check()
            try:
                outcome = self.kick(name)
            except ConfigError as exc:
                log.warning("batched migration %s: %s", name, exc)
                continue
            if "enqueued" in outcome:
                log.warning("batched migration %s: scheduler %s (its job was lost?)", name, outcome)


_runners: dict[int, Runner] = {}
_runners_lock = threading.Lock()


def runner_for(services: Any) -> Runner:
    """The :class:`Runner` of these services (one per runtime, dropped with it)."""
    key = id(services)
    with _runners_lock:
        runner = _runners.get(key)
        if runner is None:
            runner = Runner(services)
            _runners[key] = runner
            weakref.finalize(services, _runners.pop, key, None)
        return runner
