"""Batched background database migrations against a REAL primary and streaming replica.

The migrations are declared by tests/batches_plugin.py (loaded by dotted
path, so the ``regmw db-migrations`` commands, run in-process through
:func:`regmw.cli.main` with the same config file, see them too). Batches run
as jobs of the embedded SQLite queue in a worker thread; the dbroute router of
the same runtime measures replica lag, and a monitor thread polls its status
every 10 ms (a quarantine lasts at least ``reintegrate_after`` health rounds
of 100 ms, so it cannot slip between two polls). Every wait polls a
condition against a deadline.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from regmw_batches.runner import Runner, backoff, runner_for
from regmw_batches.settings import SECTION as BATCH_SECTION
from regmw_batches.throttle import judge

from regmw.cli import main
from regmw.config import validate
from regmw.runtime import build

from . import batches_plugin

pytestmark = [pytest.mark.services, pytest.mark.timeout(240)]

ROWS = 1_000_000
MB = 1024 * 1024
QUARANTINE_LAG = 6.0        # [database] max_replay_lag: dbroute quarantines a replica this far behind
QUARANTINE_BYTES = 96 * MB  # [database] max_byte_lag
THROTTLE_LAG = 1.0          # [db_migrations] max_replica_lag: migrations pause here (below the above)
THROTTLE_BYTES = 24 * MB    # [db_migrations] max_replica_byte_lag
ARTIFICIAL_DELAY = "2500ms"  # recovery_min_apply_delay during the lag phase: > THROTTLE_LAG, < QUARANTINE_LAG


def config_for(pg, tmp_path: Path) -> dict:
    return {
        "regmw": {"plugins": ["dbroute", "db-migrations", "tests.batches_plugin"]},
        "database": {
            "primary": pg.primary_url, "replicas": [pg.replica_url], "health_interval": 0.1,
            "max_replay_lag": QUARANTINE_LAG, "max_byte_lag": QUARANTINE_BYTES, "lsn_ttl": 60.0, "store": "memory",
        },
        "jobs": {"queue_path": str(tmp_path / "jobs.sqlite3"), "poll_interval": 0.02, "run_in_process": False,
                 "min_backoff": 0.1, "max_backoff": 1.0},
        "db_migrations": {
            "max_replica_lag": THROTTLE_LAG, "max_replica_byte_lag": THROTTLE_BYTES, "throttle_delay": 0.2,
            "throttle_hold": 1.0, "min_backoff": 0.2, "max_backoff": 1.0, "scheduler_interval": 1.0,
        },
    }


def write_config(config: dict, path: Path) -> Path:
    def value(item):
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, str):
            return '"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(item, list):
            return "[" + ", ".join(value(x) for x in item) + "]"
        return repr(item)

    lines = []
    for section, options in config.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {value(item)}" for key, item in options.items())
    path.write_text("\n".join(lines) + "\n")
    return path


class Monitor:
    """Polls the router's status: every quarantine seen, and the largest lags."""

    def __init__(self, router) -> None:
        self.router = router
        self.quarantines: list[dict] = []
        self.max_time_lag = 0.0
        self.max_byte_lag = 0
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            for replica in self.router.status()["replicas"]:
                if replica["quarantined"]:
                    self.quarantines.append(replica)
                self.max_time_lag = max(self.max_time_lag, replica["time_lag"] or 0.0)
                self.max_byte_lag = max(self.max_byte_lag, replica["byte_lag"] or 0)
            self.polls += 1

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def make_runtime(pg_cluster, tmp_path):
    """Build a runtime from a config (fresh state tables) whose embedded queue 2 threads work until teardown."""
    for table in ("regmw_batched_migration_attempts", "regmw_batched_migration_batches", "regmw_batched_migrations"):
        pg_cluster.sql("primary", f"DROP TABLE IF EXISTS {table}")
    batches_plugin.CALLS.clear()
    started = []

    def make(config: dict, work: bool = True):
        path = write_config(config, tmp_path / f"regmw{len(started)}.toml")
        runtime = build(config, environ={})
        stop = threading.Event()
        worker = threading.Thread(target=runtime.services.jobs.work, args=(stop, 2), daemon=True)
        if work:
            worker.start()
        started.append((runtime, stop, worker))
        return runtime, path

    try:
        yield make
    finally:
        for runtime, stop, worker in started:
            stop.set()
            if worker.is_alive():
                worker.join(30)
            runtime.services.db_router.close()


@pytest.fixture
def worker_runtime(make_runtime, pg_cluster, tmp_path):
    """(runtime, config path) with this module's test limits."""
    return make_runtime(config_for(pg_cluster, tmp_path))


def cli(capsys, *args: str) -> str:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what}: not reached within {timeout}s")


def summary(runner: Runner, name: str) -> dict:
    (row,) = runner.status(name)
    return row


def assert_first_batch_on_its_way(outcome: str) -> None:
    """What starting a migration answers: "started; batch 0 enqueued", or "started; a batch is running" when a
    worker's periodic scheduler took the just-created migration's lock first (and enqueues batch 0 itself)."""
    assert "started; batch 0 enqueued" in outcome or "started; a batch is running" in outcome, outcome


def summary_or_none(runner: Runner, name: str) -> dict | None:
    rows = runner.status(name)
    return rows[0] if rows else None


def test_million_row_migration_completes_pauses_on_replica_lag_and_never_gets_a_replica_quarantined(
        pg_cluster, worker_runtime, capsys):
    runtime, path = worker_runtime
    pg = pg_cluster
    pg.sql("primary", "DROP TABLE IF EXISTS batch_big")
    pg.sql("primary", "CREATE TABLE batch_big (id bigint PRIMARY KEY, a bigint, b bigint) WITH (fillfactor = 40)")
    pg.sql("primary", f"INSERT INTO batch_big (id) SELECT g FROM generate_series(1, {ROWS}) AS g")
    pg.wait_replica_caught_up(60)
    runner = runner_for(runtime.services)
    router = runtime.services.db_router

    with Monitor(router) as monitor:
        # 1. at the baseline (200 ms apply delay) a migration over the 1,000,000 rows completes
        started = time.monotonic()
        assert_first_batch_on_its_way(cli(capsys, "db-migrations", "run", "backfill_a", "-c", str(path)))
        wait_for(lambda: summary(runner, "backfill_a")["status"] == "finished", 90, "backfill_a finished")
        baseline_seconds = time.monotonic() - started
        row = summary(runner, "backfill_a")
        assert (row["total"], row["succeeded"], row["failed"], row["min_key"], row["max_key"]) == (20, 20, 0, 1, ROWS)
        assert pg.sql("primary", "SELECT count(*) FROM batch_big WHERE a IS DISTINCT FROM id * 2") == [(0,)]
        assert "backfill_a" in cli(capsys, "db-migrations", "status", "-c", str(path))

        # 2. with 2.5 s of artificial replica lag, the next migration pauses, resumes, and also obeys the CLI
        pg.set_apply_delay(ARTIFICIAL_DELAY)
        assert_first_batch_on_its_way(cli(capsys, "db-migrations", "run", "backfill_b", "-c", str(path)))
        note = wait_for(lambda: (summary(runner, "backfill_b")["throttle"] or {}).get("pauses", 0) >= 1 and
                        summary(runner, "backfill_b")["throttle"], 60, "backfill_b paused by replica lag")
        assert "lags" in note["reason"], note
        done_at_pause = summary(runner, "backfill_b")["succeeded"]
        assert done_at_pause < 20
        # it resumes by itself once the replica has replayed (the lag falls below the limit) ...
        wait_for(lambda: summary(runner, "backfill_b")["succeeded"] > done_at_pause, 60, "backfill_b resumed")
        resumed = summary(runner, "backfill_b")
        assert resumed["throttle"]["pauses"] >= 1

        # ... and an operator's pause holds: no batch for 10 health rounds, until resume
        assert "paused" in cli(capsys, "db-migrations", "pause", "backfill_b", "-c", str(path))
        held = summary(runner, "backfill_b")
        assert held["status"] == "paused" and held["queued"] == 0
        rounds = router.checker.rounds
        wait_for(lambda: router.checker.rounds >= rounds + 10, 30, "10 health rounds")
        assert summary(runner, "backfill_b")["succeeded"] == held["succeeded"]
        pg.set_apply_delay(pg.apply_delay)
        assert "resumed" in cli(capsys, "db-migrations", "resume", "backfill_b", "-c", str(path))
        wait_for(lambda: summary(runner, "backfill_b")["status"] == "finished", 120, "backfill_b finished")

    final = summary(runner, "backfill_b")
    assert (final["total"], final["succeeded"], final["failed"]) == (20, 20, 0)
    assert pg.sql("primary", "SELECT count(*) FROM batch_big WHERE b IS DISTINCT FROM id + 7") == [(0,)]
    pg.wait_replica_caught_up(60)
    assert pg.sql("replica", "SELECT count(*) FROM batch_big WHERE a IS DISTINCT FROM id * 2 "
                  "OR b IS DISTINCT FROM id + 7") == [(0,)]
    # never quarantined, and the lag it saw stayed below dbroute's quarantine limits
    assert monitor.polls > 100
    assert monitor.quarantines == []
    assert monitor.max_time_lag < QUARANTINE_LAG and monitor.max_byte_lag < QUARANTINE_BYTES
    assert monitor.max_time_lag >= THROTTLE_LAG  # the lag was real
    print(f"\nbaseline migration of {ROWS} rows: {baseline_seconds:.1f}s; max lag seen {monitor.max_time_lag:.2f}s, "
          f"{monitor.max_byte_lag / MB:.1f} MiB; pauses {final['throttle'].get('pauses')}, "
          f"slows {final['throttle'].get('slows')}")
    from regmw_batches import state

    with runner.engine.connect() as conn:  # one succeeded attempt per batch: no batch ran twice
        for name in ("backfill_a", "backfill_b"):
            assert sorted((a["batch"], a["outcome"]) for a in state.attempts(conn, name)) == [
                (batch, "succeeded") for batch in range(20)]
    pg.sql("primary", "DROP TABLE batch_big")


MID_ROWS = 300_000


@pytest.fixture
def paused_replay_runtime(pg_cluster, make_runtime, tmp_path):
    """A 300,000-row table, replay paused on the replica, and a runtime with the DEFAULT lag limits.

    dbroute quarantines at 16 MiB / 30 s, migrations pause at 4 MiB / 10 s.
    Filling one column of the table writes well over 16 MiB of WAL (checked
    below), so only the throttle can keep the paused replica out of quarantine.
    """
    pg = pg_cluster
    pg.sql("primary", "DROP TABLE IF EXISTS batch_mid")
    pg.sql("primary", "CREATE TABLE batch_mid (id bigint PRIMARY KEY, a bigint) WITH (fillfactor = 40)")
    pg.sql("primary", f"INSERT INTO batch_mid (id) SELECT g FROM generate_series(1, {MID_ROWS}) AS g")
    pg.wait_replica_caught_up(60)
    config = config_for(pg, tmp_path)
    config["database"] = {"primary": pg.primary_url, "replicas": [pg.replica_url], "health_interval": 0.1,
                          "store": "memory"}
    config["db_migrations"] = {"throttle_delay": 0.2, "throttle_hold": 1.0}
    runtime, _ = make_runtime(config)
    pg.pause_replay()
    yield runtime
    pg.resume_replay()
    pg.sql("primary", "DROP TABLE IF EXISTS batch_mid")


def test_paused_replay_pauses_the_migration_below_the_quarantine_byte_lag(pg_cluster, paused_replay_runtime):
    runtime = paused_replay_runtime
    runner = runner_for(runtime.services)
    router = runtime.services.db_router
    limit = runtime.config["database"]["max_byte_lag"]
    assert limit == 16 * MB and runner.settings["max_replica_byte_lag"] == 4 * MB
    with Monitor(router) as monitor:
        runner.start("mid_fill")
        note = wait_for(lambda: summary(runner, "mid_fill")["throttle"].get("state") == "paused" and
                        summary(runner, "mid_fill")["throttle"], 60, "mid_fill paused")
        assert "bytes" in note["reason"], note
        held = summary(runner, "mid_fill")["succeeded"]
        rounds = router.checker.rounds
        wait_for(lambda: router.checker.rounds >= rounds + 10, 30, "10 health rounds")
        assert summary(runner, "mid_fill")["succeeded"] == held < 15  # held while the replica does not replay
        pg_cluster.resume_replay()
        wait_for(lambda: summary(runner, "mid_fill")["status"] == "finished", 90, "mid_fill finished")
    assert monitor.quarantines == []
    assert 4 * MB <= monitor.max_byte_lag < limit
    assert pg_cluster.sql("primary", "SELECT count(*) FROM batch_mid WHERE a IS DISTINCT FROM id - 1") == [(0,)]
    print(f"\nreplay paused: held at {held}/15 batches, max byte lag {monitor.max_byte_lag / MB:.1f} MiB")


def test_without_the_throttle_the_same_migration_gets_the_replica_quarantined(
        pg_cluster, paused_replay_runtime, monkeypatch):
    """The control: with the throttle rule replaced by "go", the paused replica falls 16 MiB behind."""
    from regmw_batches import runner as runner_module
    from regmw_batches.throttle import GO

    monkeypatch.setattr(runner_module, "judge", lambda *args: GO)
    runtime = paused_replay_runtime
    runner = runner_for(runtime.services)
    router = runtime.services.db_router
    runner.start("mid_fill")
    wait_for(lambda: any(r["quarantined"] and "byte lag" in r["reason"] for r in router.status()["replicas"]),
             90, "replica quarantined for byte lag")
    runner.pause("mid_fill")


@pytest.fixture
def small_table(pg_cluster):
    pg_cluster.sql("primary", "DROP TABLE IF EXISTS batch_small")
    pg_cluster.sql("primary", "CREATE TABLE batch_small (id bigint PRIMARY KEY, v bigint, w bigint)")
    pg_cluster.sql("primary", "INSERT INTO batch_small (id) SELECT g FROM generate_series(1, 1000) AS g")
    yield
    pg_cluster.sql("primary", "DROP TABLE IF EXISTS batch_small")


def test_failed_batch_is_retried_with_backoff_and_its_attempt_recorded(pg_cluster, worker_runtime, small_table):
    runtime, _ = worker_runtime
    runner = runner_for(runtime.services)
    assert_first_batch_on_its_way(runner.start("flaky"))
    wait_for(lambda: summary(runner, "flaky")["status"] == "finished", 60, "flaky finished")
    row = summary(runner, "flaky")
    assert (row["total"], row["succeeded"], row["attempts"]) == (10, 10, 11)
    assert pg_cluster.sql("primary", "SELECT count(*) FROM batch_small WHERE v IS DISTINCT FROM id * 3") == [(0,)]
    from regmw_batches import state

    with runner.engine.connect() as conn:
        attempts = state.attempts(conn, "flaky")
    failed = [a for a in attempts if a["outcome"] == "failed"]
    assert [(a["batch"], a["attempt"]) for a in failed] == [(1, 1)]
    assert "first attempt of batch 1 fails" in failed[0]["error"]
    (retry,) = [a for a in attempts if a["batch"] == 1 and a["outcome"] == "succeeded"]
    assert retry["attempt"] == 2
    waited = (retry["started_at"] - failed[0]["finished_at"]).total_seconds()
    assert waited >= backoff(runner.settings, 1) * 0.9  # the backoff was honoured (0.2 s)


def test_batch_failing_for_good_stops_the_migration_and_resume_retries_it(
        pg_cluster, worker_runtime, small_table, capsys, tmp_path):
    runtime, path = worker_runtime
    runner = runner_for(runtime.services)
    runner.start("broken")
    wait_for(lambda: summary(runner, "broken")["status"] == "failed", 60, "broken failed")
    row = summary(runner, "broken")
    assert (row["succeeded"], row["failed"], row["attempts"]) == (0, 1, 2)
    assert "always fails" in row["last_error"]
    assert batches_plugin.CALLS[("broken", 1)] == 2
    assert pg_cluster.sql("primary", "SELECT count(*) FROM batch_small WHERE w IS NOT NULL") == [(0,)]  # rolled back
    assert "batch_small.id" in cli(capsys, "db-migrations", "list", "-c", str(path))
    out = cli(capsys, "db-migrations", "status", "broken", "-c", str(path))
    assert "failed" in out and "always fails" in out
    assert "1 failed batch(es) retried" in cli(capsys, "db-migrations", "resume", "broken", "-c", str(path))
    # hostile names: a typo among good names does nothing at all (exit 2); a declared name not started is exit 1
    for command in ("run", "pause", "resume"):
        capsys.readouterr()
        assert main(["db-migrations", command, "flaky", "no-such'; --", "-c", str(path)]) == 2
        assert "no batched migration named" in capsys.readouterr().err
    assert summary_or_none(runner, "flaky") is None  # `run flaky <typo>` started nothing
    for command in ("pause", "resume"):
        assert main(["db-migrations", command, "flaky", "-c", str(path)]) == 1
        assert "not started: flaky" in capsys.readouterr().err
    # URLs as the docs write them (`postgresql://`, `postgres://`) work with what `regmw[db]` installs (psycopg2)
    for scheme in ("postgresql", "postgres"):
        plain = config_for(pg_cluster, tmp_path)
        plain["db_migrations"]["primary"] = pg_cluster.primary_url.replace("postgresql+psycopg2", scheme, 1)
        assert "broken" in cli(capsys, "db-migrations", "status", "-c", str(write_config(plain, tmp_path / "p.toml")))
    # the primary unreachable: one line and exit 1, not a traceback
    from .servers._util import free_port

    dead = config_for(pg_cluster, tmp_path)
    dead["db_migrations"]["primary"] = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    dead_path = write_config(dead, tmp_path / "dead.toml")
    for args in (["status"], ["run", "flaky"], ["pause", "broken"], ["resume", "broken"]):
        capsys.readouterr()
        assert main(["db-migrations", *args, "-c", str(dead_path)]) == 1
        err = capsys.readouterr().err
        assert "regmw: database error" in err and "Traceback" not in err, err
    wait_for(lambda: batches_plugin.CALLS[("broken", 1)] == 4 and summary(runner, "broken")["status"] == "failed",
             60, "broken failed again after resume")


def test_lost_batch_job_is_enqueued_again_and_a_duplicate_job_is_a_no_op(
        pg_cluster, make_runtime, small_table, tmp_path):
    import sqlite3

    from regmw.jobs import JobContext

    config = config_for(pg_cluster, tmp_path)
    config["db_migrations"]["stale_after"] = 1.0
    runtime, _ = make_runtime(config, work=False)
    runner = runner_for(runtime.services)
    assert_first_batch_on_its_way(runner.start("flaky"))
    with sqlite3.connect(config["jobs"]["queue_path"]) as queue:  # the job is lost (say, with its Redis)
        assert queue.execute("DELETE FROM jobs").rowcount == 1
    assert runner.kick("flaky") == "a batch is queued"  # not yet overdue
    wait_for(lambda: runner.kick("flaky") == "batch 0 enqueued", 30, "the lost batch enqueued again")
    assert [record.kwargs["batch"] for record in runtime.services.jobs.status()] == [0]
    worker_runtime, _ = make_runtime(config)  # a worker starts
    wait_for(lambda: summary(runner, "flaky")["status"] == "finished", 60, "flaky finished")
    calls = dict(batches_plugin.CALLS)
    context = JobContext(runtime.services, "duplicate", "db-migration-batch")
    runner.run_batch(context, "flaky", 0, 0)  # a second delivery of batch 0's job
    assert batches_plugin.CALLS == calls
    assert summary(runner, "flaky")["attempts"] == 11


def test_batch_held_by_the_throttle_past_stale_after_is_not_enqueued_again(
        pg_cluster, make_runtime, small_table, tmp_path, monkeypatch):
    """A replica lagging longer than `stale_after` must not breed one more job per `stale_after`."""
    from regmw_batches import runner as runner_module
    from regmw_batches.throttle import GO, Verdict

    verdict = [Verdict("pause", "replica r1 lags (test)")]
    monkeypatch.setattr(runner_module, "judge", lambda *args: verdict[0])
    config = config_for(pg_cluster, tmp_path)
    config["db_migrations"].update(stale_after=1.0, throttle_hold=0.1, throttle_delay=0.1,
                                   scheduler_interval=3600.0)  # the test plays the scheduler (kick)
    runtime, _ = make_runtime(config)
    runner = runner_for(runtime.services)
    runner.start("flaky")  # its kick may meet another's lock on the row ("a batch is running"): kick until queued
    wait_for(lambda: runner.kick("flaky") == "a batch is queued", 30, "batch 0 queued")
    wait_for(lambda: summary(runner, "flaky")["throttle"].get("state") == "paused", 30, "flaky paused")
    wait_for(lambda: pg_cluster.sql("primary", "SELECT due_at < now() - interval '2 seconds' FROM "
                                    "regmw_batched_migration_batches WHERE migration = 'flaky' AND id = 0") == [(True,)],
             30, "batch 0 overdue by twice stale_after")
    assert runner.kick("flaky") == "a batch is queued"  # its job is alive, only held back
    live = [r for r in runtime.services.jobs.status() if r.name == "db-migration-batch" and r.state != "done"]
    assert [r.kwargs["batch"] for r in live] == [0]
    verdict[0] = GO
    wait_for(lambda: summary(runner, "flaky")["status"] == "finished", 60, "flaky finished")


def test_worker_sigkilled_mid_batch_on_dramatiq_leaves_no_trace_and_another_finishes(
        pg_cluster, small_table, make_runtime, tmp_path):
    """Two `regmw worker` processes on dramatiq (real Redis); the one running batch 3 is SIGKILLed in it."""
    import json
    import os
    import signal

    from .migration_cluster import Cluster
    from .servers.redis_server import start_redis
    from .servers._util import stop as stop_process

    proc, port = start_redis(tmp_path)
    marker = tmp_path / "stalled"
    sections = {
        "database": {"primary": pg_cluster.primary_url, "replicas": [pg_cluster.replica_url],
                     "health_interval": 0.1, "store": "memory"},
        "jobs": {"namespace": f"batches{os.getpid()}-jobs", "heartbeat_timeout": 2.0, "maintenance_chance": 0.3,
                 "min_backoff": 0.2, "max_backoff": 1.0},
        "db_migrations": {"batch_timeout": 5.0, "throttle_delay": 0.2},
    }
    cluster = Cluster(tmp_path, f"redis://127.0.0.1:{port}/0",
                      plugins=["redis", "jobs", "dbroute", "db-migrations", "tests.batches_plugin"], sections=sections)
    cluster.env["REGMW_TEST_STALL_MARKER"] = str(marker)
    try:
        workers = [cluster.start_worker(threads=1) for _ in range(2)]
        started = cluster.regmw("db-migrations", "run", "stalls_once")
        assert started.returncode == 0, started.stderr
        assert_first_batch_on_its_way(started.stdout)
        wait_for(marker.exists, 60, "batch 3 stalled")
        victim = next(worker for worker in workers if str(worker.pid) == marker.read_text())
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)

        wait_for(lambda: pg_cluster.sql("primary", "SELECT status FROM regmw_batched_migrations "
                                        "WHERE name = 'stalls_once'") == [("finished",)],
                 90, "stalls_once finished by the surviving worker", interval=0.1)
        status = json.loads(cluster.regmw("db-migrations", "status", "stalls_once", "--json").stdout)
        assert (status["status"], status["succeeded"], status["total"]) == ("finished", 10, 10)
    finally:
        cluster.close()
        stop_process(proc)
    assert pg_cluster.sql("primary", "SELECT count(*) FROM batch_small WHERE w IS DISTINCT FROM id + 1") == [(0,)]
    # the killed attempt left nothing: one succeeded attempt per batch, none failed
    assert pg_cluster.sql("primary", "SELECT batch, outcome FROM regmw_batched_migration_attempts "
                          "WHERE migration = 'stalls_once' ORDER BY batch") == [(b, "succeeded") for b in range(10)]


def test_throttle_rule():
    settings = {"max_replica_lag": 2.0, "max_replica_byte_lag": 1000}

    def report(time_lag=0.0, byte_lag=0, checked=100, quarantined=False, up=True):
        return {"checked_lsn": checked, "primary_up": up, "health_interval": 0.1, "replicas": [
            {"name": "r1", "time_lag": time_lag, "byte_lag": byte_lag, "quarantined": quarantined, "eligible": True}]}

    assert judge(None, 10, settings).action == "go"  # no router
    assert judge({"checked_lsn": None, "replicas": []}, 10, settings).action == "go"  # no replicas
    assert judge(report(), 100, settings).action == "go"
    assert judge(report(checked=99), 100, settings).action == "wait"  # no check since the previous batch
    assert judge(report(up=False), 0, settings).action == "wait"
    assert judge(report(time_lag=1.0), 0, settings).action == "slow"
    assert judge(report(byte_lag=500), 0, settings).action == "slow"
    assert judge(report(time_lag=2.0), 0, settings).action == "pause"
    assert judge(report(byte_lag=1000), 0, settings).action == "pause"
    assert judge(report(quarantined=True), 0, settings).action == "pause"
    assert judge(report(time_lag=None), 0, settings).action == "pause"


def test_throttle_limits_must_be_below_the_quarantine_limits():
    from regmw.errors import ConfigError
    from regmw_dbroute.config import SECTION as DATABASE

    sections = {"database": DATABASE, "db_migrations": BATCH_SECTION}
    primary = {"primary": "postgresql://u@127.0.0.1/db"}
    validate({"database": primary, "db_migrations": {}}, sections, "<test>")  # the defaults are consistent
    with pytest.raises(ConfigError, match="max_replica_lag .* must be below database.max_replay_lag"):
        validate({"database": {**primary, "max_replay_lag": 5.0}, "db_migrations": {"max_replica_lag": 5.0}},
                 sections, "<test>")
    with pytest.raises(ConfigError, match="max_replica_byte_lag .* must be below database.max_byte_lag"):
        validate({"database": primary, "db_migrations": {"max_replica_byte_lag": 16 * MB}}, sections, "<test>")
