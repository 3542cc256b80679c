"""``regmw worker`` and ``regmw jobs status``: run and inspect background jobs, whatever the queue.

An embedded default plugin (commands through ``regmw_cli_commands``), working
on ``services.jobs`` through the :class:`~regmw.backends.JobQueue` contract
only, so the same command runs the embedded SQLite queue and dramatiq on Redis
(the ``jobs`` plugin). It reads the same configuration file as ``regmw serve``
(``-c``/``$REGMW_CONFIG``), so jobs see the same locks, storage and events.
"""
from __future__ import annotations

import logging
import signal
import threading
from datetime import UTC, datetime

import click

from regmw.cli import Failure, config_option, get_runtime
from regmw.plugins import hookimpl


def _queue():
    queue = get_runtime().services.jobs
    if queue is None:
        raise Failure("no job queue is configured (a regmw_job_queue provider returned None)", 2)
    return queue


@click.command("worker")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="jobs run at once (default: [jobs] threads)")
@config_option
def worker(threads: int | None) -> None:
    """Run background jobs (and periodic jobs) until SIGTERM or SIGINT."""
    runtime = get_runtime()
    logging.basicConfig(level=runtime.config["regmw"]["log_level"], format="%(asctime)s %(name)s %(message)s")
    queue = _queue()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    click.echo(f"regmw worker: {type(queue).__name__}, {threads or runtime.config['jobs']['threads']} threads",
               err=True)
    queue.work(stop, threads or runtime.config["jobs"]["threads"])


def print_records(records) -> None:
    """One line per job: state, name, arguments, attempts, last change, last error."""
    for record in records:
        when = datetime.fromtimestamp(record.updated, UTC).strftime("%H:%M:%S") if record.updated else "-"
        args = " ".join(f"{key}={value}" for key, value in sorted(record.kwargs.items()))
        error = f"  {record.error.splitlines()[0]}" if record.error and record.state != "done" else ""
        click.echo(f"{record.state:8} {record.name:20} {args:40} attempts={record.attempts} {when}{error}")


@click.group("jobs")
@config_option
def jobs() -> None:
    """Background jobs (docs/jobs.md)."""


@jobs.command("status")
@click.option("--name", help="only jobs of this name")
@config_option
def status(name: str | None) -> None:
    """List queued, running, done and failed jobs."""
    records = _queue().status(name)
    print_records(records)
    counts = {state: sum(1 for r in records if r.state == state) for state in ("queued", "running", "done", "failed")}
    click.echo(" ".join(f"{state}={count}" for state, count in counts.items()))


@hookimpl
def regmw_cli_commands():
    return [worker, jobs]
