"""The periodic purge of stale upload sessions, capped cluster-wide (``[purge_uploads]``).

Go distribution purges upload sessions in every instance; here at most
``instances`` workers run it at once, each holding a slot of the cluster
semaphore (:class:`regmw.jobs.PeriodicRunner`). An upload session is
``<root>/repositories/<name>/_uploads/<id>/`` with a ``startedat`` file; it is
stale when ``startedat`` was written more than ``max_age`` seconds ago (the
object's modification time from the listing: no object is downloaded, on the
filesystem or on GCS). The job calls ``context.check()`` before every delete,
so a holder that lost its slot stops before its next side effect. Deleting a
session twice is harmless (absent is not an error): the job is idempotent.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from regmw.config import Option, Section
from regmw.jobs import Job, JobContext
from regmw.plugins import hookimpl

log = logging.getLogger("regmw.jobs.purge")

JOB_NAME = "purge-uploads"


def stale_sessions(storage, root: str, max_age: float, now: float) -> dict[str, list[str]]:
    """Upload session prefixes under ``root`` whose ``startedat`` is older than ``max_age`` -> their object keys."""
    sessions: dict[str, list[str]] = {}
    stale: set[str] = set()
    for obj in storage.list(f"{root}/repositories/"):
        head, marker, tail = obj.key.rpartition("/_uploads/")
        if not marker:
            continue
        session = f"{head}/_uploads/{tail.split('/', 1)[0]}/"
        sessions.setdefault(session, []).append(obj.key)
        if obj.key.endswith("/startedat") and obj.key == session + "startedat" and now - obj.modified > max_age:
            stale.add(session)
    return {session: sessions[session] for session in stale}


def purge(context: JobContext, roots: list[str], max_age: float, clock: Callable[[], float] = time.time) -> int:
    """Delete every stale session under each root; returns the objects deleted."""
    storage = context.services.storage
    deleted = 0
    for root in roots:
        for session, keys in stale_sessions(storage, root, max_age, clock()).items():
            for key in sorted(keys, key=lambda k: k.endswith("/startedat")):  # startedat last: a crash retries
                context.check()
                storage.delete(key)
                deleted += 1
            log.info("purged stale upload session %s", session)
    return deleted


SECTION = Section(
    "purge_uploads",
    "Periodic purge of stale upload sessions (`regmw worker`; at most `instances` workers at once, cluster-wide).",
    {
        "enabled": Option("bool", False, "Run the purge in `regmw worker` (and the embedded in-process runner)."),
        "roots": Option("list", ["docker/registry/v2"], "Layout roots (relative to the storage root) to purge."),
        "max_age": Option("float", 7 * 24 * 3600.0, "Seconds after `startedat` an upload session is stale.",
                          minimum=1),
        "every": Option("float", 3600.0, "Seconds between purge runs of one worker.", minimum=0.01),
        "instances": Option("int", 1, "Workers running the purge at once, cluster-wide (N >= 1).", minimum=1),
        "lease_ttl": Option("float", 30.0, "Seconds a purge's cluster slot lasts without renewal.", minimum=0.3),
    },
)


@hookimpl
def regmw_config_sections():
    return [SECTION]


@hookimpl
def regmw_jobs(config):
    section = config["purge_uploads"]
    if not section["enabled"]:
        return []
    roots = [root.strip("/") for root in section["roots"]]
    max_age = section["max_age"]

    def run(context: JobContext) -> None:
        purge(context, roots, max_age)

    return [Job(JOB_NAME, run, every=section["every"], instances=section["instances"],
                lease_ttl=section["lease_ttl"], description="delete upload sessions older than max_age")]
