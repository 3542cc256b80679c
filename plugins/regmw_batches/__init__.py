"""regmw built-in plugin ``db-migrations``: batched background database migrations.

Enable with ``[regmw] plugins = ["dbroute", "db-migrations"]``. Plugins
declare migrations (a batch function over an integer key range of one table)
through ``regmw_batched_migrations``; this plugin keeps their state in three
tables on the primary (:mod:`.state`), runs each batch as a job on
``services.jobs`` (:mod:`.runner`), holds batches back while the dbroute
health checker reports replica lag near its quarantine limits
(:mod:`.throttle`, through ``services.db_router.replica_lag()`` only), and
adds ``regmw db-migrations run|status|pause|resume`` (:mod:`.cli`).
docs/db-migrations.md describes the whole.
"""
from __future__ import annotations

from regmw.jobs import Job
from regmw.plugins import hookimpl

from .cli import group
from .runner import BATCH_JOB, SCHEDULER_JOB, Runner, runner_for
from .settings import SECTION

__all__ = ["Runner", "runner_for"]


def _run_batch(context, migration: str, batch: int, after_lsn: int = 0) -> None:
    runner_for(context.services).run_batch(context, migration, batch, after_lsn)


def _schedule(context) -> None:
    runner_for(context.services).schedule(context)


@hookimpl
def regmw_config_sections():
    return [SECTION]


@hookimpl
def regmw_jobs(config):
    section = config["db_migrations"]
    return [
        Job(BATCH_JOB, _run_batch, max_retries=10,
            description="one batch of a batched background database migration (idempotent: re-checks its state)"),
        Job(SCHEDULER_JOB, _schedule, every=section["scheduler_interval"], instances=1,
            lease_ttl=max(30.0, 3 * section["scheduler_interval"]),
            description="enqueue the batch of each active migration whose job was lost"),
    ]


@hookimpl
def regmw_cli_commands():
    return [group]
