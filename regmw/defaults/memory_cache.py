"""A bounded in-process cache: LRU + TTL with a hard cap on entries and bytes.

The Go registry's per-instance caches grew without bound and got pods
OOM-killed; this one evicts the least recently used entries as soon as either
cap is reached, so its memory is bounded whatever keys go through it.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

from regmw.config import Option, Section
from regmw.plugins import hookimpl

# Per-entry bookkeeping beyond the key's and value's characters: the str and
# bytes object headers, the (value, expiry) tuple and float, the OrderedDict
# slot, link and the hash table's spare room. Measured with tracemalloc on
# CPython 3.11 (tests/test_memory_cache.py holds it to this): with a distinct
# value object per entry the process holds 98% of max_bytes at the cap, with a
# shared one (b"old"/b"new") 88%; never more than max_bytes.
ENTRY_OVERHEAD = 330


class LRUBook:
    """The books of a bounded in-process store: entries in least-recently-used order and their bytes.

    Shared by the cache here and the embedded rate limiter
    (:mod:`regmw.defaults.ratelimit`), so both bound their memory the same way:
    every entry is charged ``cost(key, value)`` bytes (its characters plus a
    measured per-entry overhead), and as soon as either cap is passed the least
    recently used entries go, with no background sweep. Nothing here locks:
    the owner holds its own lock around every call (it usually has more to do
    under it).
    """

    __slots__ = ("bytes", "cost", "data", "max_bytes", "max_entries")

    def __init__(self, max_entries: int, max_bytes: int, cost: Callable[[Any, Any], int]) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.cost = cost
        self.data: OrderedDict[Hashable, Any] = OrderedDict()
        self.bytes = 0

    def add(self, key: Hashable, value: Any) -> None:
        """Insert an absent ``key`` as the most recently used, then evict down to the caps."""
        data = self.data
        data[key] = value
        self.bytes += self.cost(key, value)
        while len(data) > self.max_entries or self.bytes > self.max_bytes:
            oldest, evicted = data.popitem(last=False)
            self.bytes -= self.cost(oldest, evicted)

    def remove(self, key: Hashable) -> None:
        value = self.data.pop(key)
        self.bytes -= self.cost(key, value)


class MemoryCache:
    """A :class:`regmw.backends.Cache` in this process: other processes do not see its entries."""

    shared = False  # capability: state seen by this process only

    def __init__(self, max_entries: int = 10_000, max_bytes: int = 64 * 1024 * 1024, default_ttl: float | None = 300.0):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.default_ttl = default_ttl
        self._book = LRUBook(max_entries, max_bytes, lambda key, item: self._cost(key, item[0]))
        self._data: OrderedDict[str, tuple[bytes, float]] = self._book.data
        self._lock = threading.Lock()

    @staticmethod
    def _cost(key: str, value: bytes) -> int:
        return len(key) + len(value) + ENTRY_OVERHEAD

    def get(self, key: str) -> bytes | None:
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            value, expires = item
            if expires and expires < time.monotonic():
                self._book.remove(key)
                return None
            self._data.move_to_end(key)
            return value

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        self._store(key, value, ttl, replace=True)

    def add(self, key: str, value: bytes, ttl: float | None = None) -> bool:
        return self._store(key, value, ttl, replace=False)

    def _store(self, key: str, value: bytes, ttl: float | None, replace: bool) -> bool:
        ttl = self.default_ttl if ttl is None else ttl
        expires = time.monotonic() + ttl if ttl else 0.0
        cost = self._cost(key, value)
        if cost > self.max_bytes:
            return False  # larger than the whole cache: not cached at all
        with self._lock:
            if key in self._data:
                current_expiry = self._data[key][1]
                if not replace and not (current_expiry and current_expiry < time.monotonic()):
                    return False
                self._book.remove(key)
            self._book.add(key, (value, expires))
        return True

    def delete(self, key: str) -> None:
        with self._lock:
            if key in self._data:
                self._book.remove(key)

    def __len__(self) -> int:
        return len(self._data)

    @property
    def size_bytes(self) -> int:
        return self._book.bytes


SECTION = Section(
    "cache",
    "The embedded in-process cache, used when no shared cache plugin (redis) is enabled.",
    {
        "max_entries": Option("int", 10_000, "Most entries kept; the least recently used go first.", minimum=1),
        "max_bytes": Option("int", 64 * 1024 * 1024, "Most bytes kept (keys + values + per-entry overhead).", minimum=1024),
        "default_ttl": Option("float", 300.0, "Seconds an entry lives when the caller gives no TTL; 0 = until evicted.", minimum=0),
    },
)


@hookimpl
def regmw_config_sections():
    return [SECTION]


@hookimpl
def regmw_cache(config):
    section = config["cache"]
    return MemoryCache(section["max_entries"], section["max_bytes"], section["default_ttl"] or None)


