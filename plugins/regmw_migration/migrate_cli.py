"""``regmw migrate REPO...`` (enqueue), ``--dry-run`` (list what would be copied), ``regmw migrate status``.

Contributed by the migration plugin through ``regmw_cli_commands``. It works
through the contract: ``services.jobs`` (whichever queue is configured) and
``services.storage``. A repository literally named ``status`` is given with
``--repository status``.
"""
from __future__ import annotations

import click

from regmw.cli import Failure, FiniteFloatRange, config_option, get_runtime
from regmw.errors import Refusal
from regmw.routes import check_name

from .migrate import JOB_NAME, Settings, enqueue, own_entries_under, plan, process_local, state_key

MISUSE = 2


def _names(names: tuple[str, ...]) -> list[str]:
    out = []
    for name in names:
        try:
            out.append(check_name(name))
        except Refusal as refusal:
            raise Failure(f"{refusal.message}: {name!r}", MISUSE) from None
    return out


@click.command("migrate")
@click.argument("repositories", nargs=-1)
@click.option("--repository", "extra", multiple=True, help="a repository (also one named 'status')")
@click.option("--dry-run", is_flag=True, help="list what would be copied; enqueue nothing")
@click.option("--rate", type=FiniteFloatRange(min=0), default=None, help="repositories per minute (default: [migration_job] rate_per_minute)")
@config_option
def migrate(repositories: tuple[str, ...], extra: tuple[str, ...], dry_run: bool, rate: float | None) -> None:
    """Migrate REPOSITORIES from the old root to the new one (as jobs); `regmw migrate status` lists them."""
    runtime = get_runtime()
    services = runtime.services
    if repositories == ("status",) and not extra:
        return _status(services)
    names = _names(repositories + extra)
    if not names:
        raise Failure("name at least one repository (or: regmw migrate status)", MISUSE)
    if services.classifier is None:
        raise Failure("migrate: classification is off ([migration] enabled = false)", MISUSE)
    settings = Settings.from_config(runtime.config)
    unknown = [name for name in names if not _known(services, settings, name)]
    if unknown:  # a typo, with or without --dry-run (where it looked like "0 objects would be copied")
        raise Failure(f"no such repository (nothing under {settings.old_root} or {settings.new_root}): "
                      f"{', '.join(unknown)}; nothing {'listed' if dry_run else 'enqueued'}", MISUSE)
    if dry_run:
        for name in names:
            work = plan(services.storage, settings, name)
            for relative, obj in sorted(work.files.items()):
                click.echo(f"{name}\tfile\t{obj.size}\t{work.old_prefix}{relative} -> {work.new_prefix}{relative}")
            for hex_, obj in sorted(work.blobs.items()):
                size = "MISSING" if obj is None else str(obj.size)
                click.echo(f"{name}\tblob\t{size}\t{work.blob_key(settings.old_root, hex_)} -> "
                           f"{work.blob_key(settings.new_root, hex_)}")
            click.echo(f"{name}: {work.objects} objects, {work.bytes} bytes would be copied")
        return
    local = process_local(services)
    if local and not runtime.config["jobs"]["run_in_process"]:
        raise Failure(f"migrate: {' and '.join(local)} live inside each process, so a `regmw worker` would take the "
                      "read-only lock and mark the repository new where no request sees them; use shared ones "
                      "(the redis plugin), or [jobs] run_in_process = true with one serving process", MISUSE)
    rate = runtime.config["migration_job"]["rate_per_minute"] if rate is None else rate
    ids = enqueue(services, names, rate)
    for name, job_id in zip(names, ids, strict=True):
        click.echo(f"{name}\tqueued\t{job_id}")


def _known(services, settings: Settings, name: str) -> bool:
    """A repository worth a job: under the old root, under the new one (a no-op), or already migrated."""
    if services.jobs is not None and (services.jobs.get_state(state_key(name)) or {}).get("phase") == "done":
        return True
    return any(own_entries_under(services.storage, root, name) for root in (settings.old_root, settings.new_root))


def _status(services) -> None:
    if services.jobs is None:
        raise Failure("no job queue is configured", MISUSE)
    records = services.jobs.status(JOB_NAME)
    counts = dict.fromkeys(("queued", "running", "done", "failed"), 0)
    for record in records:
        counts[record.state] = counts.get(record.state, 0) + 1
        error = f"\t{record.error.splitlines()[0]}" if record.error and record.state != "done" else ""
        click.echo(f"{record.kwargs.get('repository', '?')}\t{record.state}\tattempts={record.attempts}{error}")
    click.echo(" ".join(f"{state}={count}" for state, count in counts.items()))
