"""The repository migration job: old root → new root, crash-safe, fenced, announced once.

One run (:func:`migrate_repository`), each step through the contract only
(``services.locks``, ``services.storage``, ``services.classifier``,
``services.jobs`` state, ``services.events``)::

    1 lock      set_read_only(repo, lock_ttl, owner) → fencing token T; state "locked" written with T
                (a compare-and-set: a run holding an older token can never write the state again)
    2 copy      the repository's files (links, tags) and every blob they reference, server-side;
                extra files under the new prefix (a crashed earlier run's) are removed
    3 verify    a fresh listing of both sides: same keys, sizes, checksums; every referenced
                manifest/blob present under the new root with its digest (or the old one's checksum)
    4 mark      state "marked", then classifier.mark_migrated(repo): the repository is new
    5 unlock    clear_read_only(repo, owner)
    6 announce  services.events.emit(event "migrated"), id derived from (repository, new root),
                then state "done"

Crash behaviour. Until step 4 the repository is classified old (it still
exists under the old prefix, and nothing marks it new), and reads go there;
whatever the run copied is invisible. From step 4 on it is new and complete
(verified before the mark). The lock expires ``lock_ttl`` after the last
renewal, so a dead run blocks writes at most that long. A rerun reads the
state: "done" → nothing to do; "marked" → it finishes steps 4-6 (clearing
the dead run's lock by its recorded owner); otherwise it waits for the dead
run's lock to expire (:class:`~regmw.jobs.RetryLater`, retried with backoff)
and starts over from step 1 (copies are idempotent; blobs, being
content-addressed, are skipped when already there with the right size).

The lock is renewed between copies, and during the drain, the listing and
the verification; a run that cannot renew it, or whose last renewal is older
than ``lock_ttl`` minus a margin, or whose token is no longer the state's, or
whose worker is stopping, stops before its next copy (:class:`~regmw.jobs.LeaseLost`).
Writes admitted just before the lock may still be finishing; the run waits
``drain`` seconds before listing, and the verification lists the old side
afresh, so a late write is caught (copied on a second pass) rather than lost.
One that finishes later still is never acknowledged: the middleware asks
again before its success goes out (``[readonly] confirm_writes``) and answers
503, and the client retries on the new side.

The event's id is the same for every run of one repository, so a run that
died between emitting and writing "done" re-emits the same event: receivers
de-duplicate on the id (the notifications system is at-least-once anyway).
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from regmw import events
from regmw.backends import StoredObject
from regmw.errors import ConfigError
from regmw.jobs import JobContext, LeaseLost, RetryLater

from .classifier import own_entries

log = logging.getLogger("regmw.migration.job")

JOB_NAME = "migrate-repository"
EVENT_ACTION = events.MIGRATED
EVENT_NAMESPACE = uuid.UUID("6c1c3f52-8d0e-4a3e-9a53-0b7c3c8a5e21")
LINK_RE = re.compile(r"(?:_layers|_manifests/revisions)/sha256/([a-f0-9]{64})/link")
#: a repository's own entries (child repositories are other entries of the same directory); upload
#: sessions in progress (``_uploads/``) are not migrated: the client restarts them (docs)
OWN_ENTRIES = ("_layers/", "_manifests/")
MAX_PASSES = 3


class MigrationFailed(RuntimeError):
    """The copy could not be verified (or the old data is incomplete); the repository stays old."""


@dataclass
class Plan:
    """What one migration copies: the repository's files and the blobs they reference."""

    repository: str
    old_prefix: str  # <old_root>/repositories/<name>/
    new_prefix: str
    files: dict[str, StoredObject]  # relative path under the prefix -> old object
    blobs: dict[str, StoredObject | None]  # hex digest -> the old blob object (None: missing in old storage)
    old_root: str = ""
    new_root: str = ""

    @property
    def objects(self) -> int:
        return len(self.files) + len(self.blobs)

    @property
    def bytes(self) -> int:
        return sum(o.size for o in self.files.values()) + sum(o.size for o in self.blobs.values() if o)

    def blob_key(self, root: str, hex_: str) -> str:
        return f"{root}/blobs/sha256/{hex_[:2]}/{hex_}/data"


@dataclass
class Settings:
    old_root: str
    new_root: str
    lock_ttl: float = 30.0
    drain: float = 1.0

    @classmethod
    def from_config(cls, config: Any) -> Settings:
        section, job = config["migration"], config["migration_job"]
        return cls(section["old_root"], section["new_root"], job["lock_ttl"], job["drain"])


def event_id(repository: str, new_root: str) -> str:
    """The id of a repository's "migrated" event: the same in every run, so duplicates collapse."""
    return str(uuid.uuid5(EVENT_NAMESPACE, f"{new_root}\n{repository}"))


def state_key(repository: str) -> str:
    return f"migration:{repository}"


def _kept(relative: str) -> bool:
    """A file the migration copies: the repository's own links, not a child repository's, not an upload."""
    return relative.startswith(OWN_ENTRIES)


def _no_check() -> None:
    pass


def plan(storage: Any, settings: Settings, repository: str, check: Callable[[], None] = _no_check) -> Plan:
    """List what migrating ``repository`` copies (``regmw migrate --dry-run`` prints it).

    ``check`` runs before each blob's ``head`` (a run passes :meth:`Fence.check`,
    so a repository with many blobs keeps its lock while it is planned).
    """
    old_prefix = f"{settings.old_root}/repositories/{repository}/"
    new_prefix = f"{settings.new_root}/repositories/{repository}/"
    files = {o.key[len(old_prefix):]: o for o in storage.list(old_prefix) if _kept(o.key[len(old_prefix):])}
    result = Plan(repository, old_prefix, new_prefix, files, {}, settings.old_root, settings.new_root)
    for relative in files:
        match = LINK_RE.fullmatch(relative)
        if match and match.group(1) not in result.blobs:
            hex_ = match.group(1)
            check()
            result.blobs[hex_] = storage.head(result.blob_key(settings.old_root, hex_))
    return result


class Fence:
    """The run's read-only lock: renewed between side effects, checked against the state's token.

    ``stop`` (the job's ``context.stop``, set when its worker shuts down) also ends the run at the next
    check: it then releases the lock at once, rather than leave writes refused until ``lock_ttl``.
    """

    def __init__(self, services: Any, repository: str, ttl: float, owner: str,
                 stop: threading.Event | None = None) -> None:
        self.locks = services.locks
        self.stop = stop
        self.jobs = services.jobs
        self.repository = repository
        self.ttl = ttl
        self.owner = owner
        self.token = 0
        self.renewed = 0.0  # monotonic time the last successful (re)acquisition was SENT

    def acquire(self) -> bool:
        sent = time.monotonic()
        lease = self.locks.set_read_only(self.repository, self.ttl, self.owner)
        if lease is None:
            return False
        self.token = self.token or lease.token
        self.renewed = sent
        return True

    def check(self) -> None:
        """Before each side effect: renew when a third of the TTL passed; stop if the lock or the token is gone."""
        if self.stop is not None and self.stop.is_set():
            raise LeaseLost(f"{self.repository}: worker stopping")
        now = time.monotonic()
        if now - self.renewed > self.ttl * 2 / 3:
            raise LeaseLost(f"{self.repository}: lock not renewed for {now - self.renewed:.1f}s")
        if now - self.renewed > self.ttl / 3:
            if not self.acquire():
                raise LeaseLost(f"{self.repository}: the read-only lock is held by another owner")
            state = self.jobs.get_state(state_key(self.repository)) or {}
            if state.get("token", 0) != self.token:
                raise LeaseLost(f"{self.repository}: a newer run (token {state.get('token')}) took over")

    def wait(self, seconds: float) -> None:
        """Wait ``seconds`` holding the lock: a ``drain`` as long as ``lock_ttl`` or longer must not let it
        lapse (the first copy's check would then stop every run)."""
        stop = self.stop or threading.Event()
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0 and not stop.wait(min(left, self.ttl / 6)):
            self.check()
        self.check()

    def release(self) -> None:
        self.locks.clear_read_only(self.repository, self.owner)


@dataclass
class Outcome:
    repository: str
    result: str  # "migrated", "already new", "nothing to migrate"
    objects: int = 0
    bytes: int = 0
    copied: int = 0
    locked_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def process_local(services: Any) -> list[str]:
    """The services the migration shares with the serving processes that live inside this process only.

    The read-only lock (``services.locks``) and the "new" mark (``services.cache``)
    must be seen by every process serving the repository: taken or written in a
    ``regmw worker`` that serves nothing, they would hold nowhere else.
    """
    return [f"{name} ({type(getattr(services, name)).__name__})" for name in ("locks", "cache")
            if not getattr(getattr(services, name), "shared", False)]


def check_shared(services: Any) -> None:
    """Refuse to migrate where the lock and the mark would not reach the requests (see :func:`process_local`)."""
    local = process_local(services)
    if local and not getattr(services, "serving", False):
        raise ConfigError(
            f"migration job: {' and '.join(local)} live inside this process, which serves no requests: the serving "
            "processes would neither refuse writes during the copy nor see the repository marked new. Use shared "
            "ones (the redis plugin), or run the jobs in the one serving process ([jobs] run_in_process = true)")
    processes = getattr(services, "serving_processes", None) or 1
    if local and processes > 1:
        raise ConfigError(
            f"migration job: {' and '.join(local)} live inside this process, one of {processes} serving processes: "
            "the others would neither refuse writes during the copy nor see the repository marked new. Use shared "
            "ones (the redis plugin), or one serving process ([serve] workers = 1)")


def own_entries_under(storage: Any, root: str, repository: str) -> bool:
    """Whether ``repository`` has its own entries under ``root`` (the classifier's notion of existing there)."""
    return bool(storage.prefix_exists(own_entries(root, repository)))


def migrate_repository(context: JobContext, repository: str) -> Outcome:
    """The job (``migrate-repository``): one repository, old → new. Idempotent; see the module docstring."""
    services = context.services
    settings = Settings.from_config(services.config)
    storage, jobs, classifier = services.storage, services.jobs, services.classifier
    if classifier is None or storage is None or not hasattr(storage, "copy"):
        raise ConfigError("migration job: needs the migration plugin's classifier and a storage with list/copy")
    check_shared(services)
    key = state_key(repository)
    state = jobs.get_state(key) or {}
    if state.get("phase") == "done":
        log.info("%s: already migrated", repository)
        return Outcome(repository, "already new")
    if state.get("phase") == "marked":
        return _finish(context, settings, repository, state, state.get("owner"), state["token"], 0.0)
    if not own_entries_under(storage, settings.old_root, repository):
        # nothing to lock, copy or mark: the old side never deletes, so no earlier run is half-way here
        if own_entries_under(storage, settings.new_root, repository):
            log.info("%s: nothing under the old root, already new", repository)
            return Outcome(repository, "already new")
        raise MigrationFailed(f"{repository}: no such repository (nothing under {settings.old_root} "
                              f"or {settings.new_root})")

    owner = f"migration:{os.uname().nodename}:{os.getpid()}:{context.job_id}:{uuid.uuid4().hex[:8]}"
    fence = Fence(services, repository, settings.lock_ttl, owner, context.stop)
    if not fence.acquire():
        raise RetryLater(f"{repository} is read-only under another owner (an earlier run's lock expires by itself)")
    locked_at = time.monotonic()
    events.emit(services, events.repository_event(events.LOCKED, repository, actor=owner, reason="migration",
                                                  token=fence.token))
    try:
        if not jobs.set_state(key, {"phase": "locked", "owner": owner, "token": fence.token}, fence.token):
            raise LeaseLost(f"{repository}: a newer run holds the migration")
        fence.wait(settings.drain)  # writes admitted before the lock finish first
        work = plan(storage, settings, repository, fence.check)
        if not work.files:
            raise MigrationFailed(f"{repository}: nothing under {work.old_prefix} (not an old repository)")
        missing = sorted(hex_ for hex_, obj in work.blobs.items() if obj is None)
        if missing:
            raise MigrationFailed(f"{repository}: {len(missing)} referenced blobs missing from the old storage "
                                  f"(first: sha256:{missing[0]})")
        copied = 0
        for _ in range(MAX_PASSES):
            copied += copy(storage, work, fence)
            fence.check()
            problems = verify(storage, work, fence.check)
            if not problems:
                break
            log.warning("%s: verification found %d differences (a write finishing late?); copying again: %s",
                        repository, len(problems), problems[:3])
            work = plan(storage, settings, repository, fence.check)
        else:
            raise MigrationFailed(f"{repository}: copy not verified after {MAX_PASSES} passes: {problems[:5]}")
        fence.check()
        if not jobs.set_state(key, {"phase": "marked", "owner": owner, "token": fence.token,
                                    "objects": work.objects, "bytes": work.bytes}, fence.token):
            raise LeaseLost(f"{repository}: a newer run holds the migration")
    except Exception:
        fence.release()  # a failed run leaves the repository old and writable (a rerun locks it again)
        events.emit(services, events.repository_event(events.UNLOCKED, repository, actor=owner,
                                                      reason="migration failed"))
        raise
    outcome = _finish(context, settings, repository, {"objects": work.objects, "bytes": work.bytes}, owner,
                      fence.token, locked_at, fence.renewed)
    outcome.copied = copied
    return outcome


def _finish(context: JobContext, settings: Settings, repository: str, state: dict, owner: str | None, token: int,
            locked_at: float, renewed: float | None = None) -> Outcome:
    """Steps 4-6 (also a rerun's, after a crash past "marked"): mark new, unlock, announce, record "done".

    ``renewed``: when the run last renewed its lock. If more than ``lock_ttl``
    has passed by the time the mark is written (the process stalled after its
    last check), the lock may have lapsed, and writes admitted meanwhile were
    acknowledged on the old side: :func:`catch_up` copies them. A rerun that
    resumes after "marked" cannot know, so it always does.
    """
    services = context.services
    services.classifier.mark_migrated(repository)
    if renewed is None or time.monotonic() - renewed > settings.lock_ttl:
        caught = catch_up(services.storage, settings, repository)
        if caught:
            log.warning("%s: the lock may have lapsed before the mark; %d objects written on the old side "
                        "meanwhile were copied after it", repository, caught)
    if owner:
        services.locks.clear_read_only(repository, owner)
    locked_ms = (time.monotonic() - locked_at) * 1000 if locked_at else 0.0
    if services.events is not None:
        services.events.emit(migrated_event(repository, settings, state))  # raises: the job reruns and re-emits
    if owner:
        events.emit(services, events.repository_event(events.UNLOCKED, repository, actor=owner, reason="migrated"))
    services.jobs.set_state(state_key(repository), {**state, "phase": "done", "owner": owner, "token": token,
                                                    "locked_ms": locked_ms}, token)
    log.info("%s migrated (%s objects, %s bytes, writes refused for %.0f ms)", repository, state.get("objects"),
             state.get("bytes"), locked_ms)
    return Outcome(repository, "migrated", state.get("objects", 0), state.get("bytes", 0), locked_ms=locked_ms)


def migrated_event(repository: str, settings: Settings, state: dict) -> dict[str, Any]:
    """The ``migrated`` event, with the same id in every run (a rerun's re-emit de-duplicates)."""
    return events.repository_event(
        EVENT_ACTION, repository, event_id=event_id(repository, settings.new_root), fromRoot=settings.old_root,
        toRoot=settings.new_root, objects=state.get("objects", 0), size=state.get("bytes", 0))


def copy(storage: Any, work: Plan, fence: Fence) -> int:
    """Copy the plan (the repository's files, then its blobs); remove new-side files the old side lacks.

    Returns how many objects were copied. Blobs already under the new root
    with the old one's size (and checksum, where the backend keeps one) are
    skipped: they are content-addressed, so an earlier run or another
    repository already copied exactly these bytes.
    """
    copied = 0
    for relative in work.files:
        fence.check()
        storage.copy(work.old_prefix + relative, work.new_prefix + relative)  # small, mutable: always
        copied += 1
    for hex_, obj in work.blobs.items():
        target = work.blob_key(work.new_root, hex_)
        there = storage.head(target)
        if there is not None and obj is not None and there.size == obj.size and (
                there.checksum is None or obj.checksum is None or there.checksum == obj.checksum):
            continue
        fence.check()
        storage.copy(work.blob_key(work.old_root, hex_), target)
        copied += 1
    for obj in list(storage.list(work.new_prefix)):
        relative = obj.key[len(work.new_prefix):]
        if _kept(relative) and relative not in work.files:
            fence.check()
            storage.delete(obj.key)
    return copied


def catch_up(storage: Any, settings: Settings, repository: str) -> int:
    """After the mark: copy what the old side holds and the new side lacks, never overwriting the new side.

    What a write acknowledged on the old side while the lock had lapsed left
    there (a new tag, its manifest and layer links, its blobs). The new side
    already serves the repository, so its files are newer than the old ones
    and stay; a write admitted on the old side that finishes after the mark
    is refused at confirmation (``[readonly] confirm_writes``), so nothing
    acknowledged is left behind. Returns how many objects it copied.
    """
    work = plan(storage, settings, repository)
    present = {o.key[len(work.new_prefix):] for o in storage.list(work.new_prefix)}
    copied = 0
    for hex_, obj in work.blobs.items():  # blobs first: a link copied before its blob would answer 404
        target = work.blob_key(work.new_root, hex_)
        if obj is not None and storage.head(target) is None:
            storage.copy(work.blob_key(work.old_root, hex_), target)
            copied += 1
    for relative in work.files:
        if relative not in present:
            storage.copy(work.old_prefix + relative, work.new_prefix + relative)
            copied += 1
    return copied


def verify(storage: Any, work: Plan, check: Callable[[], None] = _no_check) -> list[str]:
    """Differences between the old and new side (empty: verified). Lists the old side afresh.

    ``check`` runs before each object's comparison: hashing a large repository
    (filesystem digests) can take longer than ``lock_ttl``, so the run renews
    its lock here as it does between copies.
    """
    problems: list[str] = []
    old = {o.key[len(work.old_prefix):]: o for o in storage.list(work.old_prefix)}
    new = {o.key[len(work.new_prefix):]: o for o in storage.list(work.new_prefix)}
    old = {k: v for k, v in old.items() if _kept(k)}
    new = {k: v for k, v in new.items() if _kept(k)}
    if set(old) != set(work.files):
        problems.append(f"old side changed: {sorted(set(old) ^ set(work.files))[:3]}")
    if len(old) != len(new):
        problems.append(f"object count {len(new)} != {len(old)}")
    for relative, obj in old.items():
        check()
        twin = new.get(relative)
        if twin is None or twin.size != obj.size:
            problems.append(f"{relative}: missing or wrong size")
        elif twin.checksum and obj.checksum and twin.checksum != obj.checksum:
            problems.append(f"{relative}: checksum differs")
        elif twin.checksum is None and storage.digest(work.new_prefix + relative) != storage.digest(
                work.old_prefix + relative):
            problems.append(f"{relative}: content differs")
    for hex_, obj in work.blobs.items():
        check()
        key = work.blob_key(work.new_root, hex_)
        twin = storage.head(key)
        if twin is None or obj is None or twin.size != obj.size:
            problems.append(f"blob sha256:{hex_}: missing or wrong size")
            continue
        digest = storage.digest(key)
        if digest is not None:
            if digest != f"sha256:{hex_}":
                problems.append(f"blob sha256:{hex_}: digest {digest}")
        elif not (twin.checksum and obj.checksum and twin.checksum == obj.checksum):
            problems.append(f"blob sha256:{hex_}: checksum differs or unknown")
    return problems


def job(context: JobContext, repository: str) -> None:
    """The declared job function (returns nothing: the outcome is in the job state and the log)."""
    migrate_repository(context, repository)


def enqueue(services: Any, repositories: Iterable[str], rate_per_minute: float = 0.0) -> list[str]:
    """Enqueue one migration job per repository; with a rate, job i is held back i * 60/rate seconds.

    The plugin's API (``regmw migrate REPO...`` calls it). Repositories
    already migrated are enqueued anyway: the job finds them done and does nothing.
    """
    if services.jobs is None:
        raise ConfigError("migration: no job queue is configured")
    spacing = 60.0 / rate_per_minute if rate_per_minute > 0 else 0.0
    return [services.jobs.enqueue(JOB_NAME, delay=index * spacing, repository=repository)
            for index, repository in enumerate(repositories)]

