"""``regmw notifications status|worker|dead-letters|pause|resume``: operate the webhook queue.

Contributed through ``regmw_cli_commands`` when the configuration enables the
``notifications`` plugin. Every command works on Redis (``services.redis``)
or, without it, on the embedded SQLite queue.
"""
from __future__ import annotations

import json
import signal
import threading

import click

from regmw.cli import Failure, config_option, get_runtime

from .ops import Operations

MISUSE = 2


def _operations() -> Operations:
    from . import endpoints_of, streams_of
    from .sink import NotifySink

    services = get_runtime().services
    config = services.config
    streams = streams_of(config, services)
    spool = None if streams is not None else NotifySink(None, config["notifications"]["spool_dir"]).spool
    return Operations(endpoints_of(config), streams, spool)


def _call(function, *args):
    try:
        return function(*args)
    except KeyError as exc:
        raise Failure(str(exc.args[0]), MISUSE) from None
    except Exception as exc:  # Redis down, a broken spool file: one line, not a traceback
        raise Failure(f"{type(exc).__name__}: {exc}") from None


@click.group("notifications")
@config_option
def notifications() -> None:
    """Webhook notifications: queue status, delivery worker, dead letters, pause/resume."""


@notifications.command()
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@config_option
def status(as_json: bool) -> None:
    """Depth, oldest age and parked events per endpoint (and per shard)."""
    report = _call(_operations().status)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    for name, row in report.items():
        flags = " PAUSED" if row["paused"] else ""
        flags += f" DISABLED ({row['disabled']})" if row["disabled"] else ""
        click.echo(f"{name}: depth {row['depth']}, oldest {row['oldest_age']:.1f}s, parked {row['parked']}{flags}")
        for shard, info in sorted(row["shards"].items()):
            click.echo(f"  shard {shard}: depth {info['depth']}, oldest {info['oldest_age']:.1f}s, "
                       f"parked {info['parked']}")


@notifications.command()
@click.option("--metrics-listen", metavar="HOST:PORT", default="",
              help="serve this worker's Prometheus metrics (deliveries, retries, parked, depth, lag) there")
@config_option
def worker(metrics_listen: str) -> None:
    """Deliver events until SIGTERM/SIGINT (one leased consumer per shard, across all workers)."""
    from . import make_worker

    services = get_runtime().services
    if not services.config["notifications"]["endpoints"]:
        raise Failure("no [notifications] endpoints configured", MISUSE)
    if metrics_listen:  # the delivery metrics live in this process: nothing else can serve them
        from regmw.server import start_metrics_server

        try:
            start_metrics_server(metrics_listen)
        except (OSError, ValueError, OverflowError) as exc:
            raise Failure(f"--metrics-listen {metrics_listen}: {exc}", MISUSE) from None
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    click.echo("regmw notifications worker: delivering (SIGTERM to stop)", err=True)
    make_worker(services).run(stop)


@notifications.group("dead-letters")
@config_option
def dead_letters() -> None:
    """Events parked after an endpoint's max_age."""


@dead_letters.command("list")
@click.option("--endpoint", help="only this endpoint's")
@config_option
def dead_list(endpoint: str | None) -> None:
    """One line per dead letter: its name, endpoint, event id, action, repository, reason."""
    for item in _call(_operations().dead_letters, endpoint):
        click.echo(f"{item['letter']}\t{item['endpoint']}\t{item['id']}\t{item['action']}\t"
                   f"{item['repository']}\t{item['reason']}")


@dead_letters.command("show")
@click.argument("endpoint")
@click.argument("letter")
@config_option
def dead_show(endpoint: str, letter: str) -> None:
    """The parked event LETTER of ENDPOINT, as JSON."""
    item = _call(_operations().show, endpoint, letter)
    if item is None:
        raise Failure(f"no dead letter {letter!r} for {endpoint!r}")
    click.echo(json.dumps({"reason": item["reason"], "event": item["event"]}, indent=2))


@dead_letters.command("replay")
@click.argument("endpoint")
@click.argument("letters", nargs=-1)
@config_option
def dead_replay(endpoint: str, letters: tuple[str, ...]) -> None:
    """Queue ENDPOINT's dead letters (all, or LETTERS) for delivery to it again."""
    moved = _call(_operations().replay, endpoint, list(letters) or None)
    click.echo(f"{moved} event(s) queued again for {endpoint}")


@dead_letters.command("drop")
@click.argument("endpoint")
@click.argument("letters", nargs=-1, required=True)
@config_option
def dead_drop(endpoint: str, letters: tuple[str, ...]) -> None:
    """Delete dead letters for good."""
    dropped = _call(_operations().drop, endpoint, list(letters))
    click.echo(f"{dropped} dead letter(s) dropped")


@notifications.command()
@click.argument("endpoint")
@config_option
def pause(endpoint: str) -> None:
    """Stop delivering to ENDPOINT (events keep queueing, in order)."""
    _call(_operations().pause, endpoint)
    click.echo(f"{endpoint} paused")


@notifications.command()
@click.argument("endpoint")
@config_option
def resume(endpoint: str) -> None:
    """Deliver to ENDPOINT again (also after a 410 disabled it)."""
    _call(_operations().resume, endpoint)
    click.echo(f"{endpoint} resumed")
