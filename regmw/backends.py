"""The backend interfaces that provider hooks return.

A provider hook (``regmw_cache``, ``regmw_lock_manager``, ...) is called once
at start-up and returns one of these objects; the per-request decision hooks
then use them through ``context.services``. Embedded defaults live in
:mod:`regmw.defaults`; Redis, GCS and PostgreSQL versions in ``plugins/``.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

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
        if not self.limit:
            return []
        return [
            ("RateLimit-Limit", str(self.limit)),
            ("RateLimit-Remaining", str(max(0, self.remaining))),
            ("RateLimit-Reset", str(max(1, int(self.reset_after + 0.999)))),
        ]


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
    def hit(self, context: RequestContext) -> RateLimitResult: ...


@runtime_checkable
class Storage(Protocol):
    """Answers existence questions about a registry's storage, cheaply.

    Both raise :class:`regmw.errors.StorageError` when storage cannot answer;
    an error is never reported as "does not exist".
    """

    def prefix_exists(self, prefix: str) -> bool: ...

    def stat(self, path: str) -> StatResult | None: ...


@dataclass(frozen=True)
class StatResult:
    path: str
    is_dir: bool
    size: int = 0
    modified: float | None = None


@runtime_checkable
class Admission(Protocol):
    """Everything that must be decided before a request is let in.

    The default composes the rate limiter and the read-only check; a backend
    that can answer all of it in one round trip (the Redis plugin) provides its
    own and may fill ``context.prefetched`` with cache values it read on the way.
    """

    def admit(self, context: RequestContext) -> Refusal | None: ...


@runtime_checkable
class EventSink(Protocol):
    """Where registry events go (issue 11): a webhook queue, a log, a filter in front of one.

    ``event`` is one event of distribution's notification format (a dict with
    ``id``, ``timestamp``, ``action``, ``target``, ``request``, ``actor``,
    ``source``). ``emit`` returns only once the event is durable (it survives
    this process dying), or raises: an event is never dropped silently.
    """

    def emit(self, event: dict[str, Any]) -> None: ...


@dataclass
class Services:
    """The backends built at start-up, shared by every request."""

    config: Any
    pm: Any
    cache: Cache
    locks: LockManager
    rate_limiter: RateLimiter | None
    storage: Storage | None
    admission: Admission | None = None
    db_router: Any = None
    events: EventSink | None = None  # regmw_event_sink: notifications
    token_verifier: Any = None
    clients: Any = None  # regmw.clients.ClientResolver: who the client is, for rate limits
    #: functions ``context -> cache key | None`` whose values an Admission that
    #: talks to the cache anyway should read on the same round trip into
    #: ``context.prefetched[key]`` (the classification plugin registers one).
    prefetch: list[Callable[[Any], str | None]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
