"""``regmw migrate-mark REPOSITORY``: record that a repository has been migrated (classification "new").

Contributed by the migration plugin through ``regmw_cli_commands``, so it
exists when the configuration enables the plugin. It goes through the
contract only: ``services.classifier.mark_migrated``, refused unless the
cache behind it is ``shared`` (a mark left in this command's own process
would vanish with it while every server went on routing the repository old).
"""
from __future__ import annotations

import click

from regmw.cli import Failure, config_option, get_runtime
from regmw.errors import BackendUnavailable, Refusal
from regmw.routes import check_name

MISUSE = 2


@click.command("migrate-mark")
@click.argument("repository")
@config_option
def migrate_mark(repository: str) -> None:
    """Record that REPOSITORY was migrated (its classification becomes new)."""
    try:
        repository = check_name(repository)
    except Refusal as refusal:
        raise Failure(f"{refusal.message}: {repository!r}", MISUSE) from None
    services = get_runtime().services
    if not getattr(services.cache, "shared", False):
        raise Failure("migrate-mark needs a shared cache (one every server reads, e.g. the redis plugin's); "
                      f"{type(services.cache).__name__} lives inside each process", MISUSE)
    classifier = getattr(services, "classifier", None)
    if classifier is None:
        raise Failure("migrate-mark: classification is off ([migration] enabled = false)", MISUSE)
    try:
        classifier.mark_migrated(repository)
    except BackendUnavailable as exc:
        raise Failure(f"could not record the mark: {exc}") from None
    click.echo(f"{repository} marked as migrated (new)")
