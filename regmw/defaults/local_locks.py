"""In-process read-only locks and semaphores, for a single instance.

Same contract as the Redis lock manager (owner-checked release, fencing tokens,
expiry), so code written against one runs against the other; only the scope
differs: these locks are seen by one process.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from regmw.backends import Lease
from regmw.errors import SlotUnavailable
from regmw.plugins import hookimpl


class LocalLockManager:
    """A :class:`regmw.backends.LockManager` in this process: a lock set here binds this process only."""

    shared = False  # capability: state seen by this process only

    def __init__(self) -> None:
        self._read_only: dict[str, tuple[str, int, float]] = {}  # repo -> (owner, token, expires)
        self._slots: dict[str, dict[str, float]] = {}
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()

    def read_only(self, repository: str) -> bool:
        entry = self._read_only.get(repository)
        if entry is None:
            return False
        if entry[2] < time.monotonic():
            with self._lock:
                if self._read_only.get(repository) is entry:
                    del self._read_only[repository]
            return False
        return True

    def set_read_only(self, repository: str, ttl: float, owner: str | None = None) -> Lease | None:
        owner = owner or "local"
        with self._lock:
            current = self._read_only.get(repository)
            if current and current[2] >= time.monotonic() and current[0] != owner:
                return None
            token = next(self._tokens)
            self._read_only[repository] = (owner, token, time.monotonic() + ttl)
        return Lease(repository, owner, token, ttl)

    def clear_read_only(self, repository: str, owner: str | None = None) -> bool:
        with self._lock:
            current = self._read_only.get(repository)
            if current is None or (owner is not None and current[0] != owner):
                return False
            del self._read_only[repository]
            return True

    def list_read_only(self) -> dict[str, float]:
        now = time.monotonic()
        return {repo: entry[2] - now for repo, entry in list(self._read_only.items()) if entry[2] >= now}

    @contextmanager
    def cluster_slot(self, name: str, max_holders: int, ttl: float = 30.0) -> Iterator[Lease]:
        owner = f"{threading.get_ident()}-{next(self._tokens)}"
        with self._lock:
            holders = self._slots.setdefault(name, {})
            now = time.monotonic()
            for key in [key for key, expires in holders.items() if expires < now]:
                del holders[key]
            if len(holders) >= max_holders:
                raise SlotUnavailable(f"all {max_holders} slots of {name!r} are held")
            holders[owner] = float("inf")  # a local holder cannot die without the process
            token = next(self._tokens)
        try:
            yield Lease(name, owner, token, ttl, threading.Event())
        finally:
            with self._lock:
                self._slots.get(name, {}).pop(owner, None)


@hookimpl
def regmw_lock_manager(config):
    return LocalLockManager()
