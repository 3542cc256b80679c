"""The shared cache on Redis: bytes in, bytes out, with a TTL; an error is a miss.

While Redis is failing (a command failed and none has answered since, see
:meth:`RedisConnection.note_down`), writes are dropped without asking it:
a request that already waited out one timeout does not wait for a second one
just to cache something storage can answer again.

Values are stored as the raw bytes the caller gives (callers already encode
compactly, e.g. one byte for a classification), so Redis holds no pickles and
any language can read them. Keys are ``<namespace>:cache:<key>``; a
repository's keys come in as ``{repository:<name>}:...`` (see
:func:`regmw.backends.repository_key`), so its hash tag survives the prefix.
"""
from __future__ import annotations

from typing import Any

from regmw import metrics

from .errors import REDIS_DOWN, report


class RedisCache:
    """A :class:`regmw.backends.Cache`: GET / SET PX / SET NX PX / DEL, never raising for Redis errors.

    Capabilities: ``shared`` (every instance sees it), ``connection`` and
    ``redis_key`` (a Redis admission on the same connection reads prefetch
    keys in its own round trip).
    """

    shared = True

    def __init__(self, connection: Any, prefix: str, default_ttl: float = 300.0) -> None:
        self.connection = connection
        self.client = connection.client
        self.prefix = prefix + ":"
        self.default_ttl = default_ttl

    def ready(self) -> None:
        """For ``/-/regmw/ready``: one PING (raises when Redis does not answer)."""
        self.client.ping()

    def redis_key(self, key: str) -> str:
        """The Redis key holding ``key`` (the admission script reads prefetch keys by it)."""
        return self.prefix + key

    def get(self, key: str) -> bytes | None:
        try:
            value = self.client.get(self.prefix + key)
        except REDIS_DOWN as exc:
            self.connection.note_down()
            report("cache", "miss", exc)
            return None
        self.connection.note_up()
        return value

    def _skipped(self, action: str) -> bool:
        """True (and counted under ``action``) when Redis is failing: the write is dropped unasked."""
        if self.connection.recently_down:
            metrics.backend_errors.labels("cache", action).inc()
            return True
        return False

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        ttl = self.default_ttl if ttl is None else ttl
        if self._skipped("dropped"):
            return
        try:
            self.client.set(self.prefix + key, value, px=max(1, int(ttl * 1000)) if ttl else None)  # 0: no expiry
        except REDIS_DOWN as exc:
            self.connection.note_down()
            report("cache", "dropped", exc)

    def add(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` is absent (``SET NX``); True when stored.

        A Redis error (or Redis failing since an earlier error) stores nothing
        and returns False (counted as ``add_failed``): the caller's answer is
        simply not cached.
        """
        ttl = self.default_ttl if ttl is None else ttl
        if self._skipped("add_failed"):
            return False
        try:
            return bool(
                self.client.set(self.prefix + key, value, nx=True, px=max(1, int(ttl * 1000)) if ttl else None)
            )
        except REDIS_DOWN as exc:
            self.connection.note_down()
            report("cache", "add_failed", exc)
            return False

    def delete(self, key: str) -> None:
        try:
            self.client.delete(self.prefix + key)
        except REDIS_DOWN as exc:
            # The entry may outlive its truth until its TTL: callers keep TTLs short
            # for values that can change (classification "old").
            report("cache", "delete_failed", exc)
