"""Background jobs: what a plugin declares, and what every queue runs the same way.

A plugin declares jobs through the ``regmw_jobs`` hook; a queue (``services.jobs``,
from ``regmw_job_queue``: the embedded SQLite one, or dramatiq on Redis from the
``jobs`` plugin) stores and delivers them; ``regmw worker`` runs them. This
module holds the part both queues share, so a job behaves the same on either:

- :class:`Job`: the declaration (name, function, retries, periodic settings);
- :class:`JobContext`: what a running job gets (services, its id, its lease);
- :class:`PeriodicRunner`: periodic jobs, each holding one slot of the cluster
  semaphore (``services.locks.cluster_slot``) while it runs.

Delivery is at least once (a worker that dies mid-job has its job run again),
so a job must be idempotent: running it twice must leave what running it once
leaves. That is the contract; docs/jobs.md says how the built-ins meet it.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .backends import Lease, Services
from .errors import BackendUnavailable, ConfigError, SlotUnavailable

log = logging.getLogger("regmw.jobs")


class LeaseLost(RuntimeError):
    """The job's slot (or lock) was lost: it must stop before its next side effect."""


class RetryLater(RuntimeError):
    """Raised by a job that cannot proceed now (a lock held elsewhere); the queue retries it with backoff."""


@dataclass(frozen=True)
class Job:
    """A job declaration (returned in a list by ``regmw_jobs``).

    ``run(context, **kwargs)`` does the work. ``max_retries``: attempts after
    the first before the job is ``failed``. ``every`` (seconds) makes it
    periodic: every worker tries to run it that often, but at most
    ``instances`` (N >= 1) run at once across the cluster, each holding a slot
    of ``locks.cluster_slot(name, instances, lease_ttl)``.
    """

    name: str
    run: Callable[..., Any]
    max_retries: int = 5
    every: float | None = None
    instances: int = 1
    lease_ttl: float = 30.0
    description: str = ""

    @property
    def periodic(self) -> bool:
        return self.every is not None


@dataclass
class JobContext:
    """What a running job receives as its first argument."""

    services: Services
    job_id: str
    name: str
    attempt: int = 0
    lease: Lease | None = None  # periodic jobs: the cluster slot held while running
    stop: threading.Event = field(default_factory=threading.Event)

    def check(self) -> None:
        """Raise :class:`LeaseLost` when the slot is lost or the worker stops: call it before each side effect."""
        if self.lease is not None and self.lease.lost is not None and self.lease.lost.is_set():
            raise LeaseLost(f"{self.name}: slot {self.lease.token} lost")
        if self.stop.is_set():
            raise LeaseLost(f"{self.name}: worker stopping")


class FinishedRecords:
    """When a queue deletes the records of finished jobs: older than ``[jobs] keep_finished``, looked for at most
    once a minute per process (on a job's outcome), so ``regmw jobs status`` and the store do not grow forever."""

    INTERVAL = 60.0

    def __init__(self, keep: float) -> None:
        self.keep = keep
        self._next = 0.0

    def cutoff(self, now: float) -> float | None:
        """The ``updated`` time before which finished records go, or None when it is not time to look."""
        if not self.keep or now < self._next:
            return None
        self._next = now + self.INTERVAL
        return now - self.keep


def collect_jobs(config: Any, pm: Any) -> dict[str, Job]:
    """Every plugin's job declarations by name; a name declared twice or a bad N is a ConfigError."""
    jobs: dict[str, Job] = {}
    for group in pm.hook.regmw_jobs(config=config):
        for job in group or ():
            if not isinstance(job, Job):
                raise ConfigError(f"regmw_jobs: {job!r} is not a regmw.jobs.Job")
            if job.name in jobs:
                raise ConfigError(f"regmw_jobs: job {job.name!r} is declared twice")
            if job.periodic and (job.instances < 1 or (job.every or 0) <= 0 or job.lease_ttl <= 0):
                raise ConfigError(f"regmw_jobs: periodic job {job.name!r} needs instances >= 1, every > 0, lease_ttl > 0")
            jobs[job.name] = job
    return jobs


class PeriodicRunner:
    """Runs each periodic job in its own thread, capped cluster-wide by the cluster semaphore.

    Every ``every`` seconds a thread tries to take one of the job's
    ``instances`` slots; without one it waits for the next turn. With one, it
    runs the job with ``context.lease`` set; the lock manager renews the slot
    and sets ``lease.lost`` before the slot could expire on the server, and
    :meth:`JobContext.check` turns that into :class:`LeaseLost` at the job's
    next side effect. A holder that dies stops renewing, so its slot expires
    ``lease_ttl`` later and another worker takes it on its next turn.
    """

    def __init__(self, services: Services, jobs: Iterable[Job], stop: threading.Event) -> None:
        self.services = services
        self.jobs = [job for job in jobs if job.periodic]
        self.stop = stop
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for job in self.jobs:
            thread = threading.Thread(target=self._loop, args=(job,), name=f"regmw-periodic-{job.name}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def join(self, timeout: float | None = None) -> None:
        for thread in self.threads:
            thread.join(timeout)

    def _loop(self, job: Job) -> None:
        while not self.stop.is_set():
            self.run_once(job)
            self.stop.wait(job.every)

    def run_once(self, job: Job) -> bool:
        """One turn: take a slot and run the job; False when every slot was held (or the lock store is down)."""
        try:
            with self.services.locks.cluster_slot(job.name, job.instances, job.lease_ttl) as lease:
                context = JobContext(self.services, f"{job.name}:{lease.token}", job.name, lease=lease, stop=self.stop)
                try:
                    job.run(context)
                except LeaseLost as exc:
                    log.warning("periodic job %s stopped: %s", job.name, exc)
                except Exception:
                    log.exception("periodic job %s failed", job.name)
                return True
        except SlotUnavailable:
            return False
        except BackendUnavailable as exc:
            log.warning("periodic job %s: no slot (%s)", job.name, exc)
            return False
