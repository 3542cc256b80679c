"""The one-round-trip hot path: rate limits, read-only check and cache prefetch in one EVALSHA.

Without it a request through regmw on Redis would pay a round trip per
feature (``limits`` alone pays three per rule: INCR, GET, TTL). Here the
request's rate-limit counters, its repository's read-only lock (writes only)
and the cache key of every prefetch declaration (``services.prefetch``,
collected from the ``regmw_prefetch`` hook before this admission is built:
the classification, and any third-party plugin's) go to Redis as one script
call; the values read come back in ``context.prefetched`` so the plugin that
declared a key does not ask again.

What it can serve it learns from capabilities, never from classes: the
rate limiter's declarative ``rules`` (counted here, in the same windows as
``limits``), a lock manager and a cache on the same ``connection`` (their
``read_only_key`` / ``redis_key``). A lock manager elsewhere is asked
separately after the script.

Failure policy is the core's (:mod:`regmw.defaults.core`): when the script
fails, rate limiting fails open or closed per ``[ratelimit] fail_open``, the
read-only check per ``[readonly]``, and every prefetch key is a miss (stored
as None, so the cache is not asked a second time while Redis is down).

Redis Cluster: a script's keys must share one slot, and one request's keys do
not (its client's counters ``{client:...}``, its repository's lock and
classification ``{repository:...}``). There the call is split by
:class:`regmw_redis.cluster.SlotGroups`: one script per slot, sent
concurrently, the replies put back in this layout.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from regmw.backends import ADMISSION_PARTS, RateLimitResult, Services, tightest
from regmw.defaults.core import (
    ratelimit_store_down,
    read_only_refusal,
    readonly_store_down,
    refused_by_limit,
)
from regmw.defaults.ratelimit import Rule
from regmw.errors import Refusal

from . import scripts
from .cluster import SlotGroups
from .errors import REDIS_DOWN, report


class RedisAdmission:
    """A :class:`regmw.backends.Admission` that asks Redis once per request.

    ``rules``: the declarative rate-limit rules counted in the script.
    ``others``: limiters whose rules are their own code (parts of a
    :class:`regmw.backends.CompositeRateLimiter`), called after the script.
    ``lock_key`` / ``cache_key``: the Redis key of a repository's read-only
    lock / of a cache key, when the lock manager / the cache live on this
    admission's connection (None otherwise: the lock is then asked of the
    lock manager separately, and nothing is prefetched).
    """

    covers = ADMISSION_PARTS

    def __init__(
        self,
        services: Services,
        connection: Any,
        rules: list[Rule],
        ratelimit_prefix: str,
        lock_key: Callable[[str], str] | None,
        cache_key: Callable[[str], str] | None,
        others: Sequence[Any] = (),
    ) -> None:
        config = services.config
        self.connection = connection
        self.script = connection.client.register_script(scripts.ADMIT)
        # One EVALSHA; on a Redis Cluster one per slot group, sent concurrently
        # (a script's keys must share a slot; a request's need not).
        if getattr(connection, "cluster", False):
            self.call = SlotGroups(connection.client, self.script)
        else:  # through RedisConnection.execute: the client's per-command layer skipped (measured)
            self.call = lambda keys, args: connection.run_script(self.script, keys, args)
        self.rules = rules
        self.others = tuple(others)  # limiters counting by their own code: called after the script
        self.prefix = ratelimit_prefix + ":"
        # Per (rule, limit): the key around the identity, built once. The same
        # names as ``limits`` (``item.key_for(rule, identity)``), so both hot
        # paths count the same windows.
        self.counters = [
            (rule, item, *self._key_parts(rule, item), item.amount, item.get_expiry() * 1000)
            for rule in rules for item in rule.items
        ]
        self.lock_key = lock_key
        self.locks = services.locks  # used only when they are not in this Redis
        self.cache_key = cache_key
        # Every declaration, collected before this admission was built (a
        # tuple: nothing can be added behind its back).
        self.prefetch = services.prefetch if cache_key is not None else ()
        self.ratelimit_fail_open = config["ratelimit"]["fail_open"]
        self.readonly = config["readonly"]

    def admit(self, context: Any) -> Refusal | None:
        repository = context.repository
        check_lock = bool(context.is_write and repository)
        keys: list[str] = []
        args: list[Any] = ["0", 0]
        if check_lock and self.lock_key is not None:
            keys.append(self.lock_key(repository))
            args[0] = "1"
        counted = []
        identities: dict[Rule, str | None] = {}
        for rule, item, head, tail, amount, expiry_ms in self.counters:
            if rule not in identities:
                identities[rule] = rule.identity(context)
            identity = identities[rule]
            if identity is None:
                continue
            keys.append(head + identity + tail)  # = limits' item.key_for(rule.name, identity)
            args += [amount, expiry_ms]
            counted.append((rule, item))
        args[1] = len(counted)
        wanted: list[str] = []
        for function in self.prefetch:
            key = function(context)
            if key is not None and key not in context.prefetched and key not in wanted:
                wanted.append(key)
        if wanted:
            keys += [self.cache_key(key) for key in wanted]

        limit: RateLimitResult | None = None
        locked = False
        lock_checked = check_lock and self.lock_key is not None
        if keys:
            try:
                reply = self.call(keys=keys, args=args)
            except REDIS_DOWN as exc:
                self.connection.note_down()
                refusal = self._redis_down(context, exc, wanted, bool(counted), lock_checked)
                if refusal is not None:
                    return refusal
            else:
                self.connection.note_up()
                locked, n_counted = reply[0], reply[1]
                limit = tightest(
                    RateLimitResult(count <= item.amount, item.amount, item.amount - count, pttl / 1000.0, rule.name)
                    for (rule, item), count, pttl in zip(
                        counted, reply[2:2 + 2 * n_counted:2], reply[3:3 + 2 * n_counted:2], strict=True
                    )
                )
                for key, value in zip(wanted, reply[2 + 2 * n_counted:], strict=True):
                    context.prefetched[key] = value
        if self.others and (limit is None or limit.allowed):
            refusal, limit = self._count_others(context, limit)
            if refusal is not None:
                return refusal
        if limit is not None:
            context.response_headers.extend(limit.headers())
            if not limit.allowed:
                return refused_by_limit(limit)
        if locked:
            return read_only_refusal(repository, self.readonly["retry_after"])
        if check_lock and not lock_checked:
            return self._separate_lock_check(context)
        return None

    def _count_others(
        self, context: Any, limit: RateLimitResult | None
    ) -> tuple[Refusal | None, RateLimitResult | None]:
        """Count the limiters whose rules are their own code (a composite's other parts), in order.

        The first refusal stops the counting, as in
        :class:`regmw.backends.CompositeRateLimiter`; a limiter whose store
        fails gets the ``[ratelimit] fail_open`` policy.
        """
        results = [limit] if limit is not None else []
        for limiter in self.others:
            try:
                result = limiter.hit(context)
            except Exception as exc:  # noqa: BLE001 - any limiter's store failure gets the same policy
                refusal = ratelimit_store_down(exc, self.ratelimit_fail_open)
                if refusal is not None:
                    return refusal, None
                continue
            results.append(result)
            if not result.allowed:
                break
        return None, tightest(results)

    def _key_parts(self, rule: Rule, item: Any) -> tuple[str, str]:
        """``limits``' key for ``(rule, identity)`` split around the identity, through its public ``key_for``.

        ``key_for`` joins its identifiers with ``/`` after turning each into a
        string; an identity is already a string (a client key, a repository,
        a token subject, ``*``), so ``head + identity + tail`` is the same
        key (tests/test_redis_admission.py holds the two to it).
        """
        marker = "\x00identity\x00"
        head, tail = item.key_for(rule.name, marker).split(marker)
        return self.prefix + head, tail

    def _redis_down(self, context: Any, exc: Exception, wanted: list[str], limited: bool, lock: bool) -> Refusal | None:
        """The script failed: every prefetch is a known miss, then each feature's failure policy."""
        if wanted:
            report("cache", "miss", exc)
            for key in wanted:
                context.prefetched[key] = None
        if limited:
            refusal = ratelimit_store_down(exc, self.ratelimit_fail_open)
            if refusal is not None:
                return refusal
        if lock:
            return readonly_store_down(exc, context.repository, self.readonly)
        return None

    def _separate_lock_check(self, context: Any) -> Refusal | None:
        """Read-only check on a lock manager that is not this Redis (another plugin's)."""
        try:
            locked = self.locks.read_only(context.repository)
        except Exception as exc:  # noqa: BLE001 - any backend's failure gets the same policy
            return readonly_store_down(exc, context.repository, self.readonly)
        return read_only_refusal(context.repository, self.readonly["retry_after"]) if locked else None
