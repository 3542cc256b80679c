"""``regmw readonly set|clear|list``: per-repository read-only locks, from the command line.

An embedded default plugin, contributed through ``regmw_cli_commands`` like
any plugin's commands. It works on whatever ``services.locks`` the
configuration provides (the redis plugin's, a third party's), through the
:class:`~regmw.backends.LockManager` contract only, and refuses a lock manager
that is not ``shared``: a lock set by this command in its own process would
vanish with it while every server kept accepting writes. Setting and
clearing a lock emit ``locked`` / ``unlocked`` events through
``services.events`` when a sink is configured.
"""
from __future__ import annotations

import socket

import click

from regmw import events
from regmw.cli import Failure, FiniteFloatRange, config_option, get_runtime
from regmw.errors import Refusal
from regmw.plugins import hookimpl
from regmw.routes import check_name

MISUSE = 2
MAX_TTL = 1e9  # about 31 years: beyond it a lock store's millisecond expiry overflows


def _shared_locks():
    locks = get_runtime().services.locks
    if not getattr(locks, "shared", False):
        raise Failure(
            "readonly needs a shared lock store (one every server sees, e.g. the redis plugin's); "
            f"{type(locks).__name__} keeps its locks inside each process",
            MISUSE,
        )
    return locks


def _repository(name: str) -> str:
    try:
        return check_name(name)
    except Refusal as refusal:
        raise Failure(f"{refusal.message}: {name!r}", MISUSE) from None


def _default_owner() -> str:
    return f"regmw-cli@{socket.gethostname()}"


@click.group("readonly")
@config_option
def readonly() -> None:
    """Per-repository read-only locks (writes get 503 UNAVAILABLE while one is held)."""


@readonly.command("set")
@click.argument("repository")
@click.option("--ttl", type=FiniteFloatRange(0, MAX_TTL, min_open=True), default=3600.0, show_default=True,
              help="seconds the lock lasts")
@click.option("--owner", help="lock owner (default: regmw-cli@<host>)")
@config_option
def set_command(repository: str, ttl: float, owner: str | None) -> None:
    """Make REPOSITORY read-only for --ttl seconds."""
    repository = _repository(repository)
    locks = _shared_locks()
    lease = locks.set_read_only(repository, ttl, owner or _default_owner())
    if lease is None:
        raise Failure(f"{repository} is already read-only under another owner")
    click.echo(f"{repository} read-only for {ttl:.0f}s (owner {lease.owner}, token {lease.token})")
    events.emit(get_runtime().services, events.repository_event(events.LOCKED, repository, actor=lease.owner,
                                                                reason="operator", token=lease.token))


@readonly.command("clear")
@click.argument("repository")
@click.option("--owner", help="the owner that set the lock (default: regmw-cli@<host>)")
@click.option("--force", is_flag=True, help="clear it whoever holds it (operator override)")
@config_option
def clear_command(repository: str, owner: str | None, force: bool) -> None:
    """Clear REPOSITORY's read-only lock held by --owner (default: this CLI's owner)."""
    repository = _repository(repository)
    locks = _shared_locks()
    owner = owner or _default_owner()
    # Locks are released by their owner; --force is the operator's explicit override.
    if not locks.clear_read_only(repository, None if force else owner):
        hint = "" if force else f" under owner {owner} (--force clears any owner's lock)"
        raise Failure(f"{repository} was not read-only{hint}")
    click.echo(f"{repository} writable")
    events.emit(get_runtime().services, events.repository_event(events.UNLOCKED, repository, actor=owner,
                                                                reason="operator"))


@readonly.command("list")
@config_option
def list_command() -> None:
    """List read-only repositories and the seconds left."""
    for repository, seconds in sorted(_shared_locks().list_read_only().items()):
        click.echo(f"{repository}\t{seconds:.0f}s")


@hookimpl
def regmw_cli_commands():
    return [readonly]
