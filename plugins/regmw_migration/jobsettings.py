"""The ``[migration_job]`` section: how the repository migration job runs (docs/migration-workflow.md)."""
from __future__ import annotations

from regmw.config import Option, Section

SECTION = Section(
    "migration_job",
    "The repository migration job (`regmw migrate REPO...`, run by `regmw worker`; the `migration` plugin).",
    {
        "lock_ttl": Option(
            "float", 30.0,
            "Seconds the repository's read-only lock lasts without renewal (renewed every third of it while "
            "copying); a run that died blocks writes at most this long.", minimum=1,
        ),
        "drain": Option(
            "float", 1.0,
            "Seconds waited after taking the lock, so writes admitted just before it finish before the listing "
            "(a later one is caught by the verification, or answered 503 by `[readonly] confirm_writes`: keep "
            "it above your usual write request so that this stays rare).",
            minimum=0,
        ),
        "rate_per_minute": Option(
            "float", 0.0,
            "Repositories started per minute by one `regmw migrate` (jobs are spaced by 60/rate seconds); "
            "0 = no limit.", minimum=0,
        ),
        "max_retries": Option("int", 20, "Attempts after the first before a migration job is failed.", minimum=0),
    },
)
