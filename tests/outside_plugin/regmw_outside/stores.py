"""The three shared stores of regmw-outside, on any Redis client, keys under its own namespace.

Each states its capabilities the way the contract asks (regmw/backends.py):
``shared = True``; ``connection`` plus ``redis_key`` / ``read_only_key`` so an
admission on the same connection can read them in its own round trip; the
rate limiter's ``rules`` are declarative, so such an admission may count them.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from regmw import Lease, RateLimitResult, SlotUnavailable, repository_key
from regmw.backends import tightest

DOWN = (redis.RedisError, OSError)

# Take a lock only if free (or already ours), and bump its fencing counter. KEYS: lock, fence. ARGV: owner, ttl ms.
_TAKE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return false end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return redis.call('INCR', KEYS[2])
"""
# Delete a lock only if ``owner`` holds it. KEYS: lock. ARGV: owner.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Namespace:
    """The Redis this plugin uses: ``services.redis`` when some plugin provides it, else its own client."""

    cluster = False

    def __init__(self, client: Any, namespace: str) -> None:
        self.client = client
        self.namespace = namespace

    def key(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    def ping(self) -> None:
        self.client.ping()


class OutsideCache:
    """A shared cache: raw bytes under ``outside:cache:<key>``; a Redis error is a miss."""

    shared = True

    def __init__(self, connection: Any, namespace: str) -> None:
        self.connection = connection
        self.client = connection.client
        self.prefix = f"{namespace}:cache:"

    def redis_key(self, key: str) -> str:
        return self.prefix + key

    def get(self, key: str) -> bytes | None:
        try:
            return self.client.get(self.prefix + key)
        except DOWN:
            return None

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        try:
            self.client.set(self.prefix + key, value, px=int(ttl * 1000) if ttl else None)
        except DOWN:
            pass

    def add(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        try:
            return bool(self.client.set(self.prefix + key, value, nx=True, px=int(ttl * 1000) if ttl else None))
        except DOWN:
            return False

    def delete(self, key: str) -> None:
        try:
            self.client.delete(self.prefix + key)
        except DOWN:
            pass


class OutsideLocks:
    """Shared read-only locks (``outside:{repository:<name>}:readonly``) and naive cluster slots."""

    shared = True

    def __init__(self, connection: Any, namespace: str) -> None:
        self.connection = connection
        self.client = connection.client
        self.namespace = namespace
        self._take = self.client.register_script(_TAKE)
        self._release = self.client.register_script(_RELEASE)

    def read_only_key(self, repository: str) -> str:
        return f"{self.namespace}:{repository_key(repository, 'readonly')}"

    def read_only(self, repository: str) -> bool:
        return bool(self.client.exists(self.read_only_key(repository)))

    def set_read_only(self, repository: str, ttl: float, owner: str | None = None) -> Lease | None:
        owner = owner or "outside"
        key = self.read_only_key(repository)
        token = self._take(keys=[key, key + ":fence"], args=[owner, max(1, int(ttl * 1000))])
        return Lease(repository, owner, int(token), ttl) if token else None

    def clear_read_only(self, repository: str, owner: str | None = None) -> bool:
        key = self.read_only_key(repository)
        if owner is None:
            return bool(self.client.delete(key))
        return bool(self._release(keys=[key], args=[owner]))

    def list_read_only(self) -> dict[str, float]:
        head, tail = f"{self.namespace}:{{repository:", "}:readonly"
        found = {}
        for raw in self.client.scan_iter(match=f"{self.namespace}:*:readonly"):
            key = raw.decode()
            ttl = self.client.pttl(key)
            if key.startswith(head) and key.endswith(tail) and ttl > 0:
                found[key[len(head):-len(tail)]] = ttl / 1000.0
        return found

    @contextmanager
    def cluster_slot(self, name: str, max_holders: int, ttl: float = 30.0) -> Iterator[Lease]:
        owner = uuid.uuid4().hex
        for index in range(max_holders):
            key = f"{self.namespace}:{{slot:{name}}}:{index}"
            if self.client.set(key, owner, nx=True, px=max(1, int(ttl * 1000))):
                try:
                    yield Lease(name, owner, index + 1, ttl)
                finally:
                    self._release(keys=[key], args=[owner])
                return
        raise SlotUnavailable(f"all {max_holders} slots of {name!r} are held")


class OutsideRateLimiter:
    """Fixed windows counted in Redis under ``outside:ratelimit:``, for the rules it declares.

    The rules are declarative (``rules``): an admission that talks to Redis
    anyway may count them in its own round trip instead of calling ``hit``.
    """

    shared = True

    def __init__(self, connection: Any, namespace: str, rules: list[Any]) -> None:
        self.connection = connection
        self.client = connection.client
        self.prefix = f"{namespace}:ratelimit:"
        self.rules = rules
        self.calls = 0  # how often hit() ran (the tests check who counted)

    def hit(self, context: Any) -> RateLimitResult:
        self.calls += 1
        return tightest(self._count(context)) or RateLimitResult(True)

    def _count(self, context: Any) -> Iterator[RateLimitResult]:
        for rule in self.rules:
            identity = rule.identity(context)
            if identity is None:
                continue
            for item in rule.items:
                window = item.get_expiry()
                key = f"{self.prefix}{rule.name}:{identity}:{item.amount}/{window}"
                pipe = self.client.pipeline(transaction=False)
                pipe.set(key, 0, ex=window, nx=True)  # the window starts at its first hit
                pipe.incr(key)
                pipe.pttl(key)
                _, count, pttl = pipe.execute()
                yield RateLimitResult(count <= item.amount, item.amount, item.amount - count, max(pttl, 0) / 1000,
                                      rule.name)
