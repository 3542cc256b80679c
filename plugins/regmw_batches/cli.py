"""``regmw db-migrations list|status|run|pause|resume``: operate batched background migrations.

Commands work on the state tables on the primary and on ``services.jobs``
(through :class:`~.runner.Runner`), with the same configuration file as
``regmw serve`` and ``regmw worker``; the batches themselves run in workers.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import click
from sqlalchemy.exc import DBAPIError

from regmw.cli import Failure, config_option, get_runtime
from regmw.errors import ConfigError

from .runner import runner_for


def _runner():
    return runner_for(get_runtime().services)


@contextmanager
def _database() -> Iterator[None]:
    """A database error (the primary down, say) is one line on stderr and exit 1, not a traceback."""
    try:
        yield
    except DBAPIError as exc:
        first = str(exc.orig or exc).strip().splitlines()[0] if str(exc.orig or exc).strip() else type(exc).__name__
        raise Failure(f"database error (nothing more was done): {first}", 1) from None


def _do(operation, names, started: bool = True) -> None:
    """Apply ``operation`` to every name, once every name is known (a typo does nothing at all).

    A name must be declared (``run``), or declared or started (``pause``,
    ``resume``: a started migration no longer declared can still be paused);
    else nothing is done and the exit code is 2. A migration that has not been
    started makes the exit code 1, after the others were done.
    """
    runner = _runner()
    try:
        with _database():
            for name in names:
                runner.known(name, started=started)
    except ConfigError as exc:
        raise Failure(str(exc), 2) from None
    missing = []
    for name in names:
        try:
            with _database():
                outcome = operation(name)
        except ConfigError as exc:
            raise Failure(str(exc), 2) from None
        click.echo(f"{name}: {outcome}")
        if outcome == "not started":
            missing.append(name)
    if missing:
        raise Failure(f"batched migration(s) not started: {', '.join(missing)} (regmw db-migrations run NAME)", 1)


@click.group("db-migrations")
@config_option
def group() -> None:
    """Batched background database migrations (docs/db-migrations.md)."""


@group.command("list")
@config_option
def list_() -> None:
    """The declared migrations: name, table.key, batch size, description."""
    for name, spec in sorted(_runner().migrations.items()):
        click.echo(f"{name:30} {spec.table}.{spec.key:20} batch={spec.batch_size:<8} {spec.description}")


@group.command("run")
@click.argument("names", nargs=-1, required=True)
@config_option
def run(names: tuple[str, ...]) -> None:
    """Start migrations (state tables, key range, batches) and enqueue their first batch; idempotent."""
    _do(_runner().start, names, started=False)


@group.command("pause")
@click.argument("names", nargs=-1, required=True)
@config_option
def pause(names: tuple[str, ...]) -> None:
    """Pause migrations; returns once a batch in flight has committed. No batch runs until `resume`."""
    _do(_runner().pause, names)


@group.command("resume")
@click.argument("names", nargs=-1, required=True)
@config_option
def resume(names: tuple[str, ...]) -> None:
    """Resume paused migrations (and retry the failed batches of failed ones)."""
    _do(_runner().resume, names)


def _when(value) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


@group.command("status")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="one JSON object per migration")
@config_option
def status(name: str | None, as_json: bool) -> None:
    """Each started migration: status, batches done/total, failures, throttle state, last error."""
    try:
        with _database():
            rows = _runner().status(name)
    except ConfigError as exc:
        raise Failure(str(exc), 2) from None
    if name and not rows:
        raise Failure(f"batched migration {name!r} has not been started", 1)
    for row in rows:
        if as_json:
            click.echo(json.dumps(row, default=str, sort_keys=True))
            continue
        throttle = row["throttle"]
        note = ""
        if throttle:
            since = datetime.fromtimestamp(throttle["since"], UTC).strftime("%H:%M:%S")
            note = (f"  throttle={throttle['state']} since {since} (pauses={throttle['pauses']}, "
                    f"slows={throttle['slows']}){': ' + throttle['reason'] if throttle['reason'] else ''}")
        click.echo(f"{row['name']:30} {row['status']:8} {row['succeeded']}/{row['total']} batches "
                   f"({row['table_name']}.{row['key_column']} {row['min_key']}..{row['max_key']}, "
                   f"batch {row['batch_size']}) queued={row['queued']} failed={row['failed']} "
                   f"attempts={row['attempts']} started {_when(row['created_at'])} "
                   f"finished {_when(row['finished_at'])}{note}")
        if row["last_error"]:
            click.echo(f"    last error: {row['last_error'].splitlines()[0]}")
