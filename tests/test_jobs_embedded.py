"""The embedded SQLite job queue: claims, leases and outcomes across runners sharing one file."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time

import regmw
from regmw.jobs import Job, JobContext
from regmw.plugins import hookimpl


class Blocking:
    """A test plugin: job ``block`` waits until its attempt's event is set (attempt 1 stands for a paused runner)."""

    def __init__(self) -> None:
        self.started = {1: threading.Event(), 2: threading.Event()}
        self.release = {1: threading.Event(), 2: threading.Event()}

    @hookimpl
    def regmw_jobs(self, config):
        def run(context: JobContext) -> None:
            self.started[context.attempt].set()
            assert self.release[context.attempt].wait(30)

        return [Job("block", run, max_retries=3)]


def test_a_runner_whose_lease_ran_out_cannot_finish_the_job_another_runner_holds(tmp_path):
    """Runner A stalls past its lease, B claims the job again; A's late outcome must not overwrite B's claim."""
    plugin = Blocking()
    config = {"regmw": {"entry_points": False},
              "jobs": {"queue_path": str(tmp_path / "jobs.sqlite3"), "run_in_process": False}}
    a, b = (regmw.build(config, environ={}, plugins=[plugin]).services.jobs for _ in range(2))  # two processes' queues
    job_id = a.enqueue("block")
    stop = threading.Event()
    runner_a = threading.Thread(target=a.run_one, args=(stop,))
    runner_a.start()
    assert plugin.started[1].wait(30)
    with sqlite3.connect(a.path) as conn:  # A's renewals stopped (paused, its file busy): its lease runs out
        conn.execute("UPDATE jobs SET lease_until = 0 WHERE id = ?", (job_id,))
    runner_b = threading.Thread(target=b.run_one, args=(stop,))
    runner_b.start()
    assert plugin.started[2].wait(30)
    plugin.release[1].set()  # A wakes up and finishes its stale run
    runner_a.join(30)
    (record,) = b.status("block")
    assert (record.state, record.attempts) == ("running", 2)  # still B's: not "done" under B's feet
    plugin.release[2].set()
    runner_b.join(30)
    assert [r.state for r in b.status("block")] == ["done"]


def test_one_failed_renewal_does_not_stop_the_renewals(tmp_path, monkeypatch):
    """A busy or failing file once ("database is locked"): the next turn renews; the job is never left unleased."""
    plugin = Blocking()
    config = {"regmw": {"entry_points": False},
              "jobs": {"queue_path": str(tmp_path / "jobs.sqlite3"), "run_in_process": False, "lease": 1,
                       "poll_interval": 0.05}}
    queue = regmw.build(config, environ={}, plugins=[plugin]).services.jobs
    job_id = queue.enqueue("block")
    connect, failed = queue._connect, threading.Event()

    def busy_once():
        if threading.current_thread().name == "regmw-jobs-renew" and not failed.is_set():
            failed.set()
            raise sqlite3.OperationalError("database is locked")
        return connect()

    monkeypatch.setattr(queue, "_connect", busy_once)
    stop = threading.Event()
    worker = threading.Thread(target=queue.work, args=(stop, 1))
    worker.start()
    try:
        assert plugin.started[1].wait(30) and failed.wait(30)
        failed_at = time.time()

        def lease_until() -> float:
            with sqlite3.connect(queue.path) as conn:
                return conn.execute("SELECT lease_until FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]

        deadline = time.monotonic() + 10
        while lease_until() <= failed_at + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lease_until() > failed_at + 1, "the lease was not renewed after one failed renewal"
    finally:
        plugin.release[1].set()
        stop.set()
        worker.join(30)
    assert [r.state for r in queue.status("block")] == ["done"]



def test_a_job_that_kills_its_worker_every_time_is_failed_not_run_forever(tmp_path):
    """Each run dies with its process (no outcome recorded); after max_retries + 1 runs the job is failed."""
    runs = tmp_path / "runs"
    config = {"regmw": {"entry_points": False, "plugins": ["tests.job_killer"]},
              "jobs": {"queue_path": str(tmp_path / "jobs.sqlite3"), "run_in_process": False, "lease": 1}}
    queue = regmw.build(config, environ={}).services.jobs
    job_id = queue.enqueue("killer")
    worker = ("import json, sys, threading, regmw; "
              "regmw.build(json.loads(sys.argv[1]), environ={}).services.jobs.run_one(threading.Event())")
    deadline = time.monotonic() + 60
    while queue.status("killer")[0].state != "failed":
        assert time.monotonic() < deadline, f"still {queue.status('killer')}, runs: {runs.read_text().split()}"
        subprocess.run([sys.executable, "-c", worker, json.dumps(config)], env=killer_env(runs), timeout=60)
    (record,) = queue.status("killer")
    assert record.attempts == 3 and "without an outcome" in record.error, record
    assert runs.read_text().split() == ["1", "2"]  # max_retries = 1: two runs, the third claim gives up
    assert record.id == job_id


def killer_env(runs) -> dict[str, str]:
    """The environment of a process running ``tests.job_killer``: its runs file, the repository on the path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "RUNS_FILE": str(runs), "PYTHONPATH": os.pathsep.join([root, *sys.path])}


class Quick:
    """A test plugin: job ``quick`` returns at once."""

    @hookimpl
    def regmw_jobs(self, config):
        return [Job("quick", lambda context: None)]


def _run_until_done(queue, job_id: str) -> None:
    stop = threading.Event()
    deadline = time.monotonic() + 30
    while {record.id: record.state for record in queue.status("quick")}.get(job_id) != "done":
        assert time.monotonic() < deadline, queue.status("quick")
        queue.run_one(stop)


def test_records_of_finished_jobs_are_deleted_after_keep_finished(tmp_path):
    """A finished job's record stays `keep_finished` seconds, then the next outcome (in a while) deletes it."""
    config = {"regmw": {"entry_points": False},
              "jobs": {"queue_path": str(tmp_path / "jobs.sqlite3"), "run_in_process": False, "keep_finished": 3600}}
    a, b = (regmw.build(config, environ={}, plugins=[Quick()]).services.jobs for _ in range(2))  # two processes
    old, kept = a.enqueue("quick"), a.enqueue("quick")
    _run_until_done(a, old)
    _run_until_done(a, kept)
    with sqlite3.connect(a.path) as conn:  # `old` finished two hours ago, `kept` just now
        conn.execute("UPDATE jobs SET updated = updated - 7200 WHERE id = ?", (old,))
    fresh = b.enqueue("quick")
    _run_until_done(b, fresh)  # b has not looked for old records yet: it does on this outcome
    assert sorted(record.id for record in b.status("quick")) == sorted([kept, fresh])
