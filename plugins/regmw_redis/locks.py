"""Read-only locks and cluster semaphores shared by every instance through Redis.

Same contract as :class:`regmw.defaults.local_locks.LocalLockManager`:

- ``set_read_only`` takes the lock atomically (``SET NX PX``); only its owner
  may extend it, and it expires on its own if the holder dies;
- ``clear_read_only(repo, owner)`` is a compare-and-delete (Lua), so a holder
  whose lock expired and was re-taken cannot delete the new holder's lock;
  ``owner=None`` is the operator's override and clears whoever holds it;
- every lease carries a fencing token from ``INCR`` that only grows, per
  repository (per semaphore), so storage can reject a stale holder's writes;
- ``cluster_slot`` is a counting semaphore (a sorted set of owners scored by
  expiry, taken in one script), renewed in a background thread while held;
  ``lease.lost`` is set when renewal fails, ``ttl / 3`` BEFORE the slot could
  expire on the server, so the worker can stop before anyone else may start.

Key layout (``<ns>`` = ``[redis] namespace``)::

    <ns>:{repository:<name>}:readonly        owner, with PX expiry
    <ns>:{repository:<name>}:readonly:fence  fencing counter
    <ns>:{slot:<name>}:holders               zset owner -> expiry (server ms)
    <ns>:{slot:<name>}:fence                 fencing counter
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

from regmw.backends import Lease, repository_key
from regmw.errors import BackendUnavailable, SlotUnavailable

from . import scripts
from .errors import REDIS_DOWN

log = logging.getLogger("regmw.redis.locks")

__all__ = ["LeaseRenewer", "RedisLockManager", "SlotUnavailable"]

_GLOB_SPECIAL = str.maketrans({c: "\\" + c for c in "*?[]\\"})


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def default_owner() -> str:
    """``<host>:<pid>``: one process's locks are its own, and say where they came from."""
    return f"{socket.gethostname()}:{os.getpid()}"


class LeaseRenewer(threading.Thread):
    """Renews a lease every ``ttl / 3`` until stopped; sets ``lost`` BEFORE Redis could drop it.

    A renewal sent at local time ``s`` makes the server keep the lease until at
    least ``s + ttl`` (the server executes it no earlier than it was sent), so
    the last renewal Redis is known to have accepted bounds the expiry from
    below. The lease is declared lost, locally:

    - at once when ``renew()`` returns False (Redis no longer lists it);
    - on the second consecutive failed renewal (a Redis error);
    - at the latest ``ttl - interval`` after the last successful renewal (or the
      acquisition) was SENT, whatever the renew call is doing: a watchdog
      thread enforces that deadline, so a renewal stuck in a socket timeout
      cannot delay it. The remaining ``interval`` is the margin for pauses and
      clock drift, during which no one else can have taken the lease.

    ``sent_at``: ``time.monotonic()`` taken just before the acquiring command
    was sent.
    """

    def __init__(
        self, renew: Callable[[], bool], ttl: float, lost: threading.Event, name: str,
        sent_at: float | None = None, socket_timeout: float | None = None,
    ) -> None:
        super().__init__(name=f"regmw-lease-{name}", daemon=True)
        self.renew = renew
        self.ttl = ttl
        self.interval = ttl / 3
        self.lost = lost
        self.stopped = threading.Event()
        self._cond = threading.Condition()
        self.deadline = (time.monotonic() if sent_at is None else sent_at) + self.ttl - self.interval
        self._watchdog = threading.Thread(target=self._watch, name=f"regmw-lease-watch-{name}", daemon=True)
        if socket_timeout is not None and socket_timeout >= self.interval:
            log.warning(
                "lease %s: Redis socket timeout %.3fs is not below the %.3fs loss margin (ttl/3): a stuck renewal "
                "cannot delay the loss, but it leaves fewer chances to renew; use a longer ttl", name,
                socket_timeout, self.interval,
            )

    def start(self) -> None:
        self._watchdog.start()
        super().start()

    def _declare_lost(self, why: str) -> None:
        if not self.lost.is_set() and not self.stopped.is_set():
            log.warning("lease %s lost: %s", self.name, why)
            self.lost.set()
        with self._cond:
            self._cond.notify_all()

    def _watch(self) -> None:
        with self._cond:
            while not self.stopped.is_set() and not self.lost.is_set():
                left = self.deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        if not self.stopped.is_set() and not self.lost.is_set():
            self._declare_lost(f"no renewal accepted within {self.ttl - self.interval:.3f}s of sending it")

    def run(self) -> None:
        failures = 0
        while not self.stopped.wait(self.interval) and not self.lost.is_set():
            sent = time.monotonic()  # BEFORE sending: the server's expiry is at least sent + ttl
            try:
                ok = self.renew()
            except REDIS_DOWN as exc:
                failures += 1
                if failures >= 2:
                    self._declare_lost(f"{failures} consecutive renewals failed ({exc})")
                    return
                log.warning("lease %s not renewed (%s); retrying", self.name, exc)
                continue
            if not ok:
                self._declare_lost("Redis no longer lists it")
                return
            failures = 0
            with self._cond:
                if not self.lost.is_set():
                    self.deadline = max(self.deadline, sent + self.ttl - self.interval)
                    self._cond.notify_all()

    def stop(self) -> None:
        self.stopped.set()
        with self._cond:
            self._cond.notify_all()
        if self is not threading.current_thread():
            self.join()
            self._watchdog.join()


class RedisLockManager:
    """A :class:`regmw.backends.LockManager` on one Redis (single node or Sentinel master).

    Capabilities: ``shared``, ``connection`` and ``read_only_key`` (a Redis
    admission on the same connection checks the lock in its own round trip).
    """

    shared = True

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.client: redis.Redis = connection.client
        self.namespace: str = connection.namespace
        client = connection.client
        self._set_read_only = client.register_script(scripts.SET_READ_ONLY)
        self._release = client.register_script(scripts.RELEASE_IF_OWNER)
        self._renew = client.register_script(scripts.RENEW_IF_OWNER)
        self._acquire_slot = client.register_script(scripts.ACQUIRE_SLOT)
        self._renew_slot = client.register_script(scripts.RENEW_SLOT)
        self._count_slots = client.register_script(scripts.COUNT_SLOTS)

    def ready(self) -> None:
        """For ``/-/regmw/ready``: one PING (raises when Redis does not answer)."""
        self.client.ping()

    # --- keys ---------------------------------------------------------------

    def read_only_key(self, repository: str) -> str:
        return self.connection.key(repository_key(repository, "readonly"))

    def _fence_key(self, repository: str) -> str:
        return self.connection.key(repository_key(repository, "readonly", "fence"))

    def _slot_keys(self, name: str) -> list[str]:
        return [self.connection.key(f"{{slot:{name}}}", "holders"), self.connection.key(f"{{slot:{name}}}", "fence")]

    # --- read-only mode -------------------------------------------------------

    def read_only(self, repository: str) -> bool:
        """Raises a Redis error when Redis cannot answer (the caller's failure policy applies)."""
        return bool(self.client.exists(self.read_only_key(repository)))

    def set_read_only(self, repository: str, ttl: float, owner: str | None = None) -> Lease | None:
        """Lock ``repository`` for ``ttl`` seconds; None when another owner holds it."""
        owner = owner or default_owner()
        token = self._set_read_only(
            keys=[self.read_only_key(repository), self._fence_key(repository)], args=[owner, _ms(ttl)]
        )
        if token is None:
            return None
        return Lease(repository, owner, int(token), ttl)

    def clear_read_only(self, repository: str, owner: str | None = None) -> bool:
        """Release the lock; only ``owner``'s lock when given (compare-and-delete), any when None."""
        key = self.read_only_key(repository)
        if owner is None:
            return bool(self.client.delete(key))
        return bool(self._release(keys=[key], args=[owner]))

    def list_read_only(self) -> dict[str, float]:
        """Every locked repository and its seconds left (SCAN: an operator's command, not a hot path)."""
        head = f"{self.namespace}:{{repository:"
        tail = "}:readonly"
        pattern = head.translate(_GLOB_SPECIAL) + "*" + tail
        keys = [key.decode() for key in self.client.scan_iter(match=pattern, count=1000)]
        if not keys:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.pttl(key)
        found = {}
        for key, ttl in zip(keys, pipe.execute(), strict=True):
            if ttl is not None and ttl > 0:
                found[key[len(head):-len(tail)]] = ttl / 1000.0
        return found

    @contextmanager
    def hold_read_only(self, repository: str, ttl: float = 60.0, owner: str | None = None) -> Iterator[Lease]:
        """Python API: keep ``repository`` read-only while the block runs (renewed; released after).

        If this process dies, the lock expires ``ttl`` seconds later. Raises
        :class:`SlotUnavailable` when another owner holds the lock.
        """
        owner = owner or f"{default_owner()}:{uuid.uuid4().hex[:8]}"
        sent = time.monotonic()
        lease = self.set_read_only(repository, ttl, owner)
        if lease is None:
            raise SlotUnavailable(f"{repository} is read-only under another owner")
        lease.lost = threading.Event()
        with self._renewed(
            lease, sent,
            renew=lambda: self._renew(keys=[self.read_only_key(repository)], args=[owner, _ms(ttl)]) == 1,
            release=lambda: self.clear_read_only(repository, owner),
        ):
            yield lease

    # --- cluster semaphores ------------------------------------------------------

    @contextmanager
    def cluster_slot(self, name: str, max_holders: int, ttl: float = 30.0) -> Iterator[Lease]:
        """Hold one of ``max_holders`` slots of ``name`` across every process using this Redis.

        Raises :class:`SlotUnavailable` when all are held and
        :class:`regmw.errors.BackendUnavailable` when Redis cannot answer.
        While held, the slot is renewed every ``ttl / 3``; ``lease.lost`` is set
        when renewal fails (see :class:`LeaseRenewer`: before the server could
        drop the slot), and the holder must then stop its work.
        """
        holders, fence = self._slot_keys(name)
        owner = f"{default_owner()}:{uuid.uuid4().hex[:12]}"
        sent = time.monotonic()  # before sending: the slot's expiry is at least sent + ttl
        try:
            token = self._acquire_slot(keys=[holders, fence], args=[owner, max_holders, _ms(ttl)])
        except REDIS_DOWN as exc:
            raise BackendUnavailable(f"cannot take a slot of {name!r}: {exc}") from exc
        if token is None:
            raise SlotUnavailable(f"all {max_holders} slots of {name!r} are held")
        lease = Lease(name, owner, int(token), ttl, threading.Event())
        with self._renewed(
            lease, sent,
            renew=lambda: self._renew_slot(keys=[holders], args=[owner, _ms(ttl)]) == 1,
            release=lambda: self.client.zrem(holders, owner),
        ):
            yield lease

    @contextmanager
    def _renewed(self, lease: Lease, sent: float, renew, release) -> Iterator[None]:
        """Renew ``lease`` in the background while the block runs, then release it (best effort).

        ``sent`` is when the acquiring command was sent: the server-side expiry
        is at least ``sent + ttl``, which is what loss detection counts from.
        """
        renewer = LeaseRenewer(renew, lease.ttl, lease.lost, lease.name, sent, self.connection.command_deadline)
        renewer.start()
        try:
            yield
        finally:
            renewer.stop()
            try:
                release()
            except REDIS_DOWN as exc:
                log.warning("could not release %s (expires in %.0fs): %s", lease.name, lease.ttl, exc)

    def slot_holders(self, name: str) -> int:
        """How many live holders ``name`` has now."""
        return int(self._count_slots(keys=[self._slot_keys(name)[0]]))
