"""The embedded job queue: a persistent SQLite file, run in-process (no Redis needed).

Why not dramatiq's StubBroker: it keeps messages in memory, so a crash loses
every queued migration. Why not a dramatiq broker on SQLite: a broker is the
whole consume/ack/nack/delay/requeue surface of dramatiq's consumer protocol,
while what the embedded case needs is five SQL statements; the jobs are the
same :class:`regmw.jobs.Job` functions either way, so a deployment moves to
dramatiq on Redis (the ``jobs`` plugin) without touching a job.

Guarantees (the same as the Redis queue's): a job is stored (committed, WAL)
before ``enqueue`` returns; a claimed job carries a lease (``lease_until``),
renewed while it runs; a process that dies mid-job leaves it ``running`` with
a lease that runs out, after which any runner claims it again (at least
once). Each claim is numbered (``attempts``): a runner renews and records the
outcome of its own claim only, so one whose lease ran out (paused, its
renewals failing) cannot mark ``done`` or requeue a job another runner now
holds. Claims take SQLite's write lock (``BEGIN IMMEDIATE``), so two
processes on one file never run one job at once. A failed attempt is retried
after an exponential backoff, up to the job's ``max_retries``; then ``failed``.

In a serving process the runner starts with the first request (so ``regmw
demo`` and ``regmw serve`` run jobs, and one-shot commands such as
``regmw migrate`` only enqueue); ``regmw worker`` runs it in the foreground.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from contextlib import closing
from typing import Any

from regmw.backends import JobRecord
from regmw.config import Option, Section
from regmw.errors import BackendUnavailable, ConfigError
from regmw.jobs import FinishedRecords, Job, JobContext, LeaseLost, PeriodicRunner, RetryLater, collect_jobs
from regmw.plugins import hookimpl

log = logging.getLogger("regmw.jobs")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, kwargs TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, not_before REAL NOT NULL, lease_until REAL NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '', created REAL NOT NULL, updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs (state, not_before);
CREATE TABLE IF NOT EXISTS job_state (key TEXT PRIMARY KEY, value TEXT NOT NULL, token INTEGER NOT NULL);
"""


def backoff(section: Any, attempts: int) -> float:
    """Seconds before retry number ``attempts`` (1-based): min_backoff doubling, capped at max_backoff."""
    return min(section["max_backoff"], section["min_backoff"] * (2 ** max(0, attempts - 1)))


class SqliteJobQueue:
    """A :class:`~regmw.backends.JobQueue` in one SQLite file (``[jobs] queue_path``)."""

    shared = False  # one machine's processes share the file; other machines do not

    def __init__(self, services: Any, section: Any, jobs: dict[str, Job]) -> None:
        self.services = services
        self.section = section
        self.path = section["queue_path"]
        self.jobs = jobs
        self.lease = section["lease"]
        self._ready = False
        self._running = threading.Event()
        self._mine: dict[str, int] = {}  # job id -> the claim (attempt) this process holds
        self._mine_lock = threading.Lock()
        self._finished = FinishedRecords(section["keep_finished"])

    # --- storage --------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if not self._ready:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        if not self._ready:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)
            self._ready = True
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def enqueue(self, name: str, *, delay: float = 0.0, **kwargs: Any) -> str:
        if name not in self.jobs:
            raise ConfigError(f"no job named {name!r} is declared (known: {', '.join(sorted(self.jobs)) or 'none'})")
        job_id = uuid.uuid4().hex
        now = time.time()
        with closing(self._connect()) as conn:
            conn.execute("INSERT INTO jobs (id, name, kwargs, state, not_before, created, updated) "
                         "VALUES (?, ?, ?, 'queued', ?, ?, ?)", (job_id, name, json.dumps(kwargs), now + delay, now, now))
        return job_id

    def _exists(self) -> bool:
        """Whether the queue file exists: reading a queue that was never written creates nothing (``regmw jobs
        status`` run from another directory must not leave a ``regmw-jobs.sqlite3`` there)."""
        return self._ready or os.path.exists(self.path)

    def status(self, name: str | None = None) -> list[JobRecord]:
        if not self._exists():
            return []
        query = "SELECT id, name, kwargs, state, attempts, error, updated, lease_until FROM jobs"
        with closing(self._connect()) as conn:
            rows = conn.execute(query + (" WHERE name = ?" if name else "") + " ORDER BY created",
                                (name,) if name else ()).fetchall()
        now = time.time()
        records = []
        for job_id, job_name, kwargs, state, attempts, error, updated, lease_until in rows:
            if state == "running" and lease_until < now:
                state = "queued"  # its runner died: it will be claimed again
            records.append(JobRecord(job_id, job_name, json.loads(kwargs), state, attempts, error, updated))
        return records

    def get_state(self, key: str) -> dict[str, Any] | None:
        if not self._exists():
            return None
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT value FROM job_state WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_state(self, key: str, value: dict[str, Any], token: int) -> bool:
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute("SELECT token FROM job_state WHERE key = ?", (key,)).fetchone()
            if row and row[0] > token:
                conn.execute("ROLLBACK")
                return False
            conn.execute("INSERT OR REPLACE INTO job_state (key, value, token) VALUES (?, ?, ?)",
                         (key, json.dumps(value), token))
            conn.execute("COMMIT")
        return True

    # --- running ---------------------------------------------------------------

    def _claim(self) -> tuple[str, str, dict[str, Any], int] | None:
        now = time.time()
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(
                "SELECT id, name, kwargs, attempts FROM jobs WHERE (state = 'queued' AND not_before <= ?) "
                "OR (state = 'running' AND lease_until < ?) ORDER BY not_before LIMIT 1", (now, now)).fetchone()
            if row is None:
                conn.execute("ROLLBACK")
                return None
            conn.execute("UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_until = ?, updated = ? "
                         "WHERE id = ?", (now + self.lease, now, row[0]))
            conn.execute("COMMIT")
        return row[0], row[1], json.loads(row[2]), row[3] + 1

    def _finish(self, job_id: str, state: str, error: str = "", not_before: float = 0.0,
                attempt: int | None = None) -> None:
        """Record an outcome; with ``attempt``, only while that claim is still the job's (not re-claimed since)."""
        fenced = "" if attempt is None else " AND attempts = ?"
        now = time.time()
        cutoff = self._finished.cutoff(now) if state in ("done", "failed") else None
        with closing(self._connect()) as conn:
            conn.execute("UPDATE jobs SET state = ?, error = ?, not_before = ?, lease_until = 0, updated = ? "
                         "WHERE id = ?" + fenced, (state, error[:2000], not_before, now, job_id,
                                                    *(() if attempt is None else (attempt,))))
            if cutoff is not None:
                conn.execute("DELETE FROM jobs WHERE state IN ('done', 'failed') AND updated < ?", (cutoff,))

    def _renew(self, stop: threading.Event) -> None:
        while not stop.wait(self.lease / 3):
            with self._mine_lock:
                mine = list(self._mine.items())
            if not mine:
                continue
            try:
                with closing(self._connect()) as conn:
                    conn.executemany("UPDATE jobs SET lease_until = ? WHERE id = ? AND attempts = ? "
                                     "AND state = 'running'",
                                     [(time.time() + self.lease, job_id, attempt) for job_id, attempt in mine])
            except (sqlite3.Error, OSError) as exc:  # a busy or failing file: try again next turn, never stop renewing
                log.warning("job queue %s: leases not renewed: %s", self.path, exc)

    def run_one(self, stop: threading.Event) -> bool:
        """Claim and run one ready job; False when none was ready."""
        claimed = self._claim()
        if claimed is None:
            return False
        job_id, name, kwargs, attempts = claimed
        job = self.jobs.get(name)
        if job is None:
            self._finish(job_id, "failed", f"no job named {name!r} is declared here", attempt=attempts)
            return True
        if attempts > job.max_retries + 1:
            # Outcomes stop at max_retries + 1 attempts; a claim beyond that means runs ended with no outcome
            # at all: their runner died (a job that OOM-kills or crashes its worker would run forever).
            error = f"gave up after {attempts - 1} attempts: a runner stopped mid-job without an outcome (killed?)"
            log.error("job %s %s %s", name, job_id, error)
            self._finish(job_id, "failed", error, attempt=attempts)
            return True
        with self._mine_lock:
            self._mine[job_id] = attempts
        try:
            job.run(JobContext(self.services, job_id, name, attempts, stop=stop), **kwargs)
        except (Exception, LeaseLost) as exc:  # noqa: BLE001 - any failure is recorded, then retried or failed
            error = f"{type(exc).__name__}: {exc}"
            if attempts > job.max_retries:
                log.error("job %s %s failed for good after %d attempts: %s", name, job_id, attempts, error)
                self._finish(job_id, "failed", error, attempt=attempts)
            else:
                if not isinstance(exc, RetryLater):
                    log.warning("job %s %s attempt %d failed, retrying: %s", name, job_id, attempts, error)
                self._finish(job_id, "queued", error, time.time() + backoff(self.section, attempts), attempts)
        else:
            self._finish(job_id, "done", attempt=attempts)
        finally:
            with self._mine_lock:
                if self._mine.get(job_id) == attempts:  # not re-claimed by another thread of this process
                    del self._mine[job_id]
        return True

    def work(self, stop: threading.Event, threads: int = 1) -> None:
        """Run jobs (and periodic jobs) until ``stop`` is set; one runner per process.

        Opens the queue first: a ``queue_path`` that cannot be opened is the caller's error at once
        (``regmw worker``: one line, exit 1), not runner threads dying while the worker goes on.
        """
        if self._running.is_set():
            stop.wait()
            return
        try:
            self._connect().close()
        except (sqlite3.Error, OSError) as exc:
            raise BackendUnavailable(f"job queue {os.path.abspath(self.path)} ([jobs] queue_path) cannot be opened: "
                                     f"{exc}") from exc
        self._running.set()
        try:
            periodic = PeriodicRunner(self.services, self.jobs.values(), stop)
            periodic.start()
            renewer = threading.Thread(target=self._renew, args=(stop,), name="regmw-jobs-renew", daemon=True)
            renewer.start()
            workers = [threading.Thread(target=self._loop, args=(stop,), name=f"regmw-jobs-{index}", daemon=True)
                       for index in range(max(1, threads))]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            periodic.join(5)
        finally:
            self._running.clear()

    def _loop(self, stop: threading.Event) -> None:
        poll = self.section["poll_interval"]
        while not stop.is_set():
            try:
                if not self.run_one(stop):
                    stop.wait(poll)
            except (sqlite3.Error, OSError) as exc:  # the file busy or failing: try again, never stop running jobs
                log.warning("job queue %s: %s", self.path, exc)
                stop.wait(poll)

    def start_in_background(self) -> threading.Event:
        """Run :meth:`work` in a daemon thread of this process (the serving process's runner)."""
        stop = threading.Event()
        threading.Thread(target=self.work, args=(stop, self.section["threads"]), name="regmw-jobs",
                         daemon=True).start()
        return stop


def _check_namespace(value: str) -> None:
    if not value or any(char.isspace() for char in value):
        raise ValueError("must be non-empty, without spaces")


def jobs_plugin_has_redis(section: Any, config: Any) -> str | None:
    """The `jobs` plugin (dramatiq on Redis) needs the `redis` plugin's connection."""
    plugins = config["regmw"]["plugins"]
    if "jobs" in plugins and "redis" not in plugins:
        return "regmw.plugins: the jobs plugin (dramatiq on Redis) needs the redis plugin: plugins = [\"redis\", \"jobs\"]"
    return None


SECTION = Section(
    "jobs",
    "Background jobs (docs/jobs.md): the embedded SQLite queue, or dramatiq on Redis with the `jobs` plugin.",
    {
        "queue_path": Option("path", "regmw-jobs.sqlite3",
                             "SQLite file of the embedded queue (used when the `jobs` plugin is not enabled)."),
        "run_in_process": Option("bool", False, "Embedded queue: a serving process runs jobs in background threads, "
                                 "from its first request on (`regmw demo` turns it on; otherwise run `regmw worker`)."),
        "threads": Option("int", 2, "Jobs run at once by one worker process.", minimum=1),
        "lease": Option("float", 30.0, "Embedded queue: seconds a claimed job stays claimed without renewal; a "
                        "runner that died has its job run again after this.", minimum=1),
        "poll_interval": Option("float", 0.5, "Embedded queue: seconds an idle runner waits before looking again.",
                                minimum=0.01),
        "min_backoff": Option("float", 1.0, "Seconds before the first retry of a failed job (doubling after).",
                              minimum=0),
        "max_backoff": Option("float", 300.0, "Longest wait between retries of a failed job.", minimum=0),
        "keep_finished": Option("float", 604800.0, "Seconds the record of a finished job (`done` or `failed`) is "
                                "kept for `regmw jobs status` (7 days: as long as dramatiq keeps a dead letter); "
                                "then a worker deletes it. 0: kept forever.", minimum=0),
        "heartbeat_timeout": Option("float", 60.0, "Redis queue (dramatiq): seconds without a heartbeat after which "
                                    "a dead worker's jobs are requeued.", minimum=1),
        "maintenance_chance": Option("float", 0.001, "Redis queue (dramatiq): probability that a broker command also "
                                     "requeues dead workers' jobs (dramatiq's maintenance): with the default a dead "
                                     "worker's job waits minutes past `heartbeat_timeout` (docs/jobs.md).",
                                     minimum=0, maximum=1),
        "namespace": Option("str", None, "Redis queue (dramatiq): key namespace of the broker; default "
                            "`<[redis] namespace>-jobs`, so deployments sharing a Redis under different namespaces "
                            "never share a queue (on a Redis Cluster `{<namespace>}`, one hash tag, unless it has one).",
                            check=_check_namespace),
    },
    checks=(jobs_plugin_has_redis,),
)


@hookimpl
def regmw_config_sections():
    return [SECTION]


@hookimpl
def regmw_job_queue(config, services):
    queue = SqliteJobQueue(services, config["jobs"], collect_jobs(config, services.pm))
    if config["jobs"]["run_in_process"] and queue.jobs and not services.pm.has_plugin(RUNNER_PLUGIN):
        # only then does a request pay for a regmw_finish call (a hook nobody implements is skipped)
        services.pm.register(InProcessRunner(queue), name=RUNNER_PLUGIN)
    return queue


RUNNER_PLUGIN = "regmw.defaults.jobs.runner"


class InProcessRunner:
    """Starts the embedded runner with the first request this process serves (``[jobs] run_in_process``).

    Not at start-up: one-shot commands (``regmw migrate``) build the same
    runtime and must only enqueue, not claim a job and exit mid-way.
    """

    def __init__(self, queue: SqliteJobQueue) -> None:
        self.queue = queue
        self.started = False
        self.lock = threading.Lock()

    @hookimpl
    def regmw_finish(self, context, status):
        if self.started or context.services.jobs is not self.queue:
            return
        with self.lock:
            if self.started:
                return
            self.started = True
        self.queue.start_in_background()
