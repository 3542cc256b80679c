"""The plugin contract: the named services provider hooks return, and what each can do.

A provider hook (``regmw_redis``, ``regmw_cache``, ``regmw_classifier``, ...)
is called once at start-up (in the order of :func:`regmw.runtime.build_services`)
and returns one of these objects; it lands in a named field of
:class:`Services`, and every later provider and per-request hook reaches it
there (``services.redis``, ``context.services.classifier``). Plugins meet only
through these fields and the hooks: never through another plugin's module, its
classes or a shared dict. Embedded defaults live in :mod:`regmw.defaults`;
Redis, GCS, PostgreSQL and migration versions in ``plugins/``.

A backend says what it is able to do with capability attributes instead of
being recognised by its class:

``shared`` (Cache, LockManager, RateLimiter)
    True when every regmw instance sees the same state (a Redis cache), False
    or absent when it lives in one process (the embedded defaults).
``rules`` (RateLimiter)
    The declarative rules (:class:`regmw.defaults.ratelimit.Rule`) it counts,
    so another store (the Redis one-round-trip script) can count them instead;
    None or absent when its rules are its own code.
``parts`` (RateLimiter)
    The limiters a composite limiter counts (:class:`CompositeRateLimiter`).
``covers`` (Admission)
    Which of ``{"ratelimit", "readonly"}`` it decides itself; start-up adds
    the rest around it (see :func:`regmw.defaults.core.complete_admission`).
``connection`` plus ``redis_key(key)`` (Cache) / ``read_only_key(repository)`` (LockManager)
    A backend living in a Redis: the :class:`RedisConnection` it uses and the
    Redis key holding a value, so a Redis admission on the same connection can
    read it on its own round trip.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .context import RequestContext
    from .errors import Refusal


def repository_key(repository: str, *parts: str) -> str:
    """A cache/lock key for one repository: ``{repository:<name>}:<parts>``.

    The braces are a Redis Cluster hash tag, so all keys of one repository land
    in one slot. Names have passed the distribution grammar (no braces, colons
    or spaces), so they are safe to embed. Backends add their own namespace
    prefix in front.
    """
    return "{repository:" + repository + "}:" + ":".join(parts)


@runtime_checkable
class Cache(Protocol):
    """A shared, bounded byte cache. Errors are misses: ``get`` returns None, ``set`` drops.

    ``set``'s ``ttl``: None = the backend's default TTL, 0 = no expiry (kept until evicted).
    ``add`` stores only if the key is absent (Redis ``SET NX``): a slow writer of
    a stale answer must not overwrite a newer one (a migration mark).
    """

    def get(self, key: str) -> bytes | None: ...

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None: ...

    def add(self, key: str, value: bytes, ttl: float | None = None) -> bool: ...

    def delete(self, key: str) -> None: ...


@dataclass
class Lease:
    """A held lock or semaphore slot. ``token`` is a fencing token: it only grows."""

    name: str
    owner: str
    token: int
    ttl: float
    lost: Any = None  # threading.Event set when renewal failed (cluster slots)


@runtime_checkable
class LockManager(Protocol):
    """Per-repository read-only mode and cluster-wide semaphores."""

    def read_only(self, repository: str) -> bool: ...

    def set_read_only(self, repository: str, ttl: float, owner: str | None = None) -> Lease | None: ...

    def clear_read_only(self, repository: str, owner: str | None = None) -> bool: ...

    def list_read_only(self) -> dict[str, float]: ...

    def cluster_slot(self, name: str, max_holders: int, ttl: float = 30.0) -> AbstractContextManager[Lease]: ...


@dataclass(frozen=True, slots=True)
class RateLimitResult:
    """The outcome of counting one request against the rules that matched it."""

    allowed: bool
    limit: int = 0
    remaining: int = 0
    reset_after: float = 0.0  # seconds until the tightest window resets
    rule: str = ""

    def headers(self) -> list[tuple[str, str]]:
        if not self.limit and self.allowed:  # no limit matched (a "0/minute" limit refuses: it has headers)
            return []
        return [
            ("RateLimit-Limit", str(self.limit)),
            ("RateLimit-Remaining", str(max(0, self.remaining))),
            ("RateLimit-Reset", str(self.reset_seconds())),
        ]

    def reset_seconds(self) -> int:
        """``reset_after`` as delta-seconds for ``RateLimit-Reset`` / ``Retry-After``: rounded up, at least 1.

        Rounded up exactly: a client waiting that long finds the window over
        (``int(x + 0.999)`` rounded 1.0005 s down to 1, and a client retrying
        after 1 s was refused again), after rounding to the microsecond: a
        window end computed as ``(now + 60) - now`` is sometimes
        60.000000000007, which is float noise, not a 61st second.
        """
        return max(1, math.ceil(round(self.reset_after, 6)))


def tightest(results: Iterable[RateLimitResult]) -> RateLimitResult | None:
    """The first refusal (later results are not drawn), else the result with the fewest requests left."""
    chosen: RateLimitResult | None = None
    for result in results:
        if not result.allowed:
            return result
        if chosen is None or result.remaining < chosen.remaining:
            chosen = result
    return chosen


@runtime_checkable
class RateLimiter(Protocol):
    """Counts a request against its limits; ``hit`` raises when its store cannot answer.

    Capabilities: ``shared``; ``rules`` (declarative rules another store may
    count instead, or None); ``parts`` (a composite's limiters).
    """

    def hit(self, context: RequestContext) -> RateLimitResult: ...


class CompositeRateLimiter:
    """Several rate limiters counted as one: the first refusal wins (later ones are not counted), else the tightest.

    How a plugin adds a limiter without dropping the configured one: wrap
    ``regmw_rate_limiter`` and return ``CompositeRateLimiter(inner, yours)``.
    A Redis admission counts the declarative parts in its one round trip and
    calls the others.
    """

    def __init__(self, *parts: RateLimiter | None) -> None:
        self.parts: tuple[RateLimiter, ...] = tuple(part for part in parts if part is not None)
        if not self.parts:
            raise ValueError("CompositeRateLimiter needs at least one limiter")
        self.shared = all(getattr(part, "shared", False) for part in self.parts)

    @property
    def rules(self) -> list[Any] | None:
        """Every part's declarative rules, or None when some part counts by its own code."""
        rules: list[Any] = []
        for part in self.parts:
            part_rules = getattr(part, "rules", None)
            if part_rules is None:
                return None
            rules.extend(part_rules)
        return rules

    def hit(self, context: RequestContext) -> RateLimitResult:
        return tightest(part.hit(context) for part in self.parts) or RateLimitResult(True)


def split_limiter(limiter: RateLimiter | None) -> tuple[list[Any], list[RateLimiter]]:
    """(declarative rules, limiters counting by their own code) of ``limiter`` and its ``parts``, in order."""
    if limiter is None:
        return [], []
    rules = getattr(limiter, "rules", None)
    if rules is not None:
        return list(rules), []
    parts = getattr(limiter, "parts", None)
    if not parts:
        return [], [limiter]
    declarative: list[Any] = []
    others: list[RateLimiter] = []
    for part in parts:
        part_rules, part_others = split_limiter(part)
        declarative += part_rules
        others += part_others
    return declarative, others


@runtime_checkable
class Storage(Protocol):
    """Answers existence questions about a registry's storage, cheaply.

    ``prefix_exists(prefix)`` is true when any object's key starts with
    ``prefix``: a plain key prefix, as GCS reads it, so a caller asking about a
    folder ends the prefix with ``/``. The classifier asks
    ``<root>/repositories/<name>/_`` (a repository's own ``_layers``,
    ``_manifests`` or ``_uploads`` entries, never its children's: see
    docs/classification.md). It raises :class:`regmw.errors.StorageError` when
    storage cannot answer; an error is never reported as "does not exist".
    """

    def prefix_exists(self, prefix: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One object found by :meth:`ObjectStorage.list`.

    ``key`` is the full key (relative to the storage root, ``/``-separated),
    ``size`` its length in bytes, ``checksum`` a content checksum the backend
    keeps server-side (GCS: crc32c; filesystem: None, compute it when needed),
    ``modified`` its modification time (seconds since the epoch).
    """

    key: str
    size: int
    checksum: str | None = None
    modified: float = 0.0


@runtime_checkable
class ObjectStorage(Storage, Protocol):
    """A :class:`Storage` that can also list, copy and delete objects (migration and purge jobs need it).

    ``list(prefix)`` yields every object under ``prefix`` (recursively, in no
    promised order). ``copy(src, dst)`` copies one object inside the storage,
    server-side where the backend can (GCS ``rewrite``: no byte passes through
    regmw), and makes ``dst`` appear whole or not at all. ``head(key)`` is the
    :class:`StoredObject` of one key or None; ``delete(key)`` removes one
    object (absent is not an error); ``digest(key)`` is the ``sha256:<hex>``
    of an object's content, or None when the backend cannot compute it
    without downloading it. Every failure raises
    :class:`regmw.errors.StorageError`.
    """

    def list(self, prefix: str) -> Iterable[StoredObject]: ...

    def head(self, key: str) -> StoredObject | None: ...

    def copy(self, src: str, dst: str) -> None: ...

    def delete(self, key: str) -> None: ...

    def digest(self, key: str) -> str | None: ...


@runtime_checkable
class Admission(Protocol):
    """Everything that must be decided before a request is let in.

    ``covers`` names what it decides itself, of ``{"ratelimit", "readonly"}``;
    start-up runs the rest around it (rate limits before, the read-only check
    after), so replacing the admission never silently drops either. A
    backend that can answer all of it in one round trip (the Redis plugin)
    covers both and fills ``context.prefetched`` with the values of every
    ``services.prefetch`` key it read on the way.
    """

    covers: frozenset[str]

    def admit(self, context: RequestContext) -> Refusal | None: ...


ADMISSION_PARTS: frozenset[str] = frozenset({"ratelimit", "readonly"})


@runtime_checkable
class RedisConnection(Protocol):
    """The shared Redis connection (``services.redis``), provided by ``regmw_redis``.

    ``client`` is a ``redis.Redis`` (or ``redis.cluster.RedisCluster`` when
    ``cluster``); building it opens no connection, the first command does.
    ``key("cache", "x")`` is ``"<namespace>:cache:x"``; put a repository's keys
    in its hash tag with :func:`repository_key`. ``ping()`` raises when Redis
    does not answer.
    """

    client: Any
    namespace: str
    cluster: bool

    def key(self, *parts: str) -> str: ...

    def ping(self) -> None: ...


@runtime_checkable
class Classifier(Protocol):
    """Old/new classification of repositories during a storage migration (``services.classifier``)."""

    def classify(self, context: RequestContext) -> Literal["old", "new"] | None: ...

    def mark_migrated(self, repository: str) -> None: ...


class StoreUnavailable(RuntimeError):
    """A position store could not answer; the router then never trusts a replica for the read."""


@dataclass(frozen=True, slots=True)
class Positions:
    """What a position store knows for one repository."""

    repository: int | None  # the latest recorded write position, if any
    floor: int | None  # the position recorded when the store was (re)initialised
    initialized: bool  # False: the store lost its data (or is new); set a floor first

    @property
    def required(self) -> int | None:
        values = [value for value in (self.repository, self.floor) if value]
        return max(values) if values else None


@runtime_checkable
class PositionStore(Protocol):
    """Shared WAL write positions per repository (``services.positions``).

    Every method raises :class:`StoreUnavailable` on failure. ``advance`` keeps
    the maximum of the stored and the given position and returns it.
    """

    def get(self, repository: str | None) -> Positions: ...

    def advance(self, repository: str, lsn: int, ttl: float) -> int: ...

    def initialize(self, floor: int, ttl: float) -> None: ...


#: a prefetch declaration: the cache key a request's admission should read, or None
PrefetchKey = Callable[["RequestContext"], "str | None"]


@runtime_checkable
class EventSink(Protocol):
    """Where registry events go (issue 11): a webhook queue, a log, a filter in front of one.

    ``event`` is one event of distribution's notification format (a dict with
    ``id``, ``timestamp``, ``action``, ``target``, ``request``, ``actor``,
    ``source``). ``emit`` returns only once the event is durable (it survives
    this process dying), or raises: an event is never dropped silently.
    """

    def emit(self, event: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class JobRecord:
    """What a job queue knows about one enqueued job (``regmw migrate status``, ``regmw jobs status``)."""

    id: str
    name: str
    kwargs: dict[str, Any]
    state: Literal["queued", "running", "done", "failed"]
    attempts: int = 0
    error: str = ""
    updated: float = 0.0


@runtime_checkable
class JobQueue(Protocol):
    """The job queue (``services.jobs``, provider hook ``regmw_job_queue``); jobs are declared by ``regmw_jobs``.

    ``enqueue(name, **kwargs)`` stores the job durably before it returns and
    returns its id; ``delay`` (seconds, a reserved keyword) holds it back.
    Jobs run at least once: a worker that dies mid-job has the job run again,
    so every job is idempotent by contract (see docs/jobs.md). ``status``
    lists the known jobs (optionally of one name); ``work(stop)`` runs jobs,
    periodic ones included, until the event is set (``regmw worker``).
    ``get_state``/``set_state`` keep a small durable record per key for jobs
    that resume: ``set_state`` writes only if ``token`` is at least the
    stored one (a fencing token), and returns False otherwise.
    ``shared``: every process sees the same queue.
    """

    shared: bool

    def enqueue(self, name: str, *, delay: float = 0.0, **kwargs: Any) -> str: ...

    def status(self, name: str | None = None) -> list[JobRecord]: ...

    def work(self, stop: Any, threads: int = 1) -> None: ...

    def get_state(self, key: str) -> dict[str, Any] | None: ...

    def set_state(self, key: str, value: dict[str, Any], token: int) -> bool: ...


@dataclass
class Services:
    """The named services built at start-up (see :func:`regmw.runtime.build_services`), shared by every request."""

    config: Any
    pm: Any
    redis: RedisConnection | None = None
    cache: Cache = None  # type: ignore[assignment]  # always set by build_services (a default exists)
    locks: LockManager = None  # type: ignore[assignment]
    rate_limiter: RateLimiter | None = None
    storage: Storage | None = None
    classifier: Classifier | None = None
    positions: PositionStore | None = None
    events: EventSink | None = None  # regmw_event_sink: notifications (emit is durable before it returns)
    jobs: JobQueue | None = None  # regmw_job_queue: jobs declared through regmw_jobs
    #: every ``regmw_prefetch`` declaration, collected before the admission is
    #: built: an Admission reading the cache anyway reads each key on the
    #: request's way in, into ``context.prefetched[key]``.
    prefetch: tuple[PrefetchKey, ...] = ()
    admission: Admission | None = None
    db_router: Any = None
    token_verifier: Any = None
    clients: Any = None  # regmw.clients.ClientResolver: who the client is, for rate limits
    #: requests are served in this process with these services (``build(serving=True)``, and
    #: :class:`~regmw.middleware.RegistryMiddleware`), so what a process-local (not ``shared``) lock or
    #: cache holds is seen by them; in-process background work (webhook delivery) runs only then
    serving: bool = False
    #: how many processes serve requests with this configuration, when known (``regmw serve``: ``[serve]
    #: workers``); None when not (an app mounting the middleware). Process-local locks and cache are one
    #: process's only: with more than one, a job relying on them (the migration) must refuse
    serving_processes: int | None = None
