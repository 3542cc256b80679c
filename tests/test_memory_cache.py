"""The embedded cache stays under its caps whatever goes through it."""
import threading
import tracemalloc

import pytest

from regmw.defaults.memory_cache import MemoryCache

from .servers._util import in_fresh_interpreter


def test_lru_eviction_and_ttl(monkeypatch):
    cache = MemoryCache(max_entries=2, max_bytes=1 << 20, default_ttl=None)
    cache.set("a", b"1")
    cache.set("b", b"2")
    assert cache.get("a") == b"1"  # a is now most recently used
    cache.set("c", b"3")
    assert cache.get("b") is None and cache.get("a") == b"1" and cache.get("c") == b"3"

    now = [1000.0]
    monkeypatch.setattr("regmw.defaults.memory_cache.time.monotonic", lambda: now[0])
    cache.set("t", b"x", ttl=5)
    assert cache.get("t") == b"x"
    now[0] += 6
    assert cache.get("t") is None


def test_byte_cap_is_enforced():
    cache = MemoryCache(max_entries=10**9, max_bytes=50_000)
    for index in range(1000):
        cache.set(f"k{index}", b"v" * 500)
        assert cache.size_bytes <= 50_000
    assert 0 < len(cache) < 100
    cache.set("huge", b"x" * 100_000)  # bigger than the cache: not stored, nothing evicted for it
    assert cache.get("huge") is None


def million_keys_run(distinct_values: bool) -> dict:
    """A million distinct keys through a cache capped at 8 MiB: what it charges and what it really holds."""
    cap = 8 * 1024 * 1024
    cache = MemoryCache(max_entries=10**9, max_bytes=cap, default_ttl=300)
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        peak_held = 0
        for index in range(1_000_000):
            value = b"new%d" % index if distinct_values else b"new"
            cache.set(f"{{repository:group/project-{index}}}:path", value)
            if index % 10_007 == 0:
                peak_held = max(peak_held, tracemalloc.get_traced_memory()[0] - baseline)
        held = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    return {"cap": cap, "size_bytes": cache.size_bytes, "held": max(held, peak_held), "entries": len(cache)}


@pytest.mark.parametrize("distinct_values", [False, True], ids=["shared-values", "distinct-values"])
def test_a_million_distinct_keys_stay_under_the_memory_cap(distinct_values):
    result = in_fresh_interpreter(million_keys_run, distinct_values)
    assert result["size_bytes"] <= result["cap"]
    # what the process really holds for the cache stays under the cap, all the way through
    assert result["held"] <= result["cap"], result
    assert result["entries"] < 1_000_000 // 10


def test_concurrent_use_keeps_the_books_straight():
    cache = MemoryCache(max_entries=100, max_bytes=1 << 20)

    def worker(offset):
        for index in range(2000):
            cache.set(f"{offset}-{index % 150}", b"x" * (index % 7))
            cache.get(f"{offset}-{(index * 7) % 150}")
            if index % 5 == 0:
                cache.delete(f"{offset}-{index % 150}")

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(cache) <= 100
    assert cache.size_bytes == sum(cache._cost(k, v) for k, (v, _) in cache._data.items())


def test_add_only_stores_an_absent_or_expired_key(monkeypatch):
    now = [50.0]
    monkeypatch.setattr("regmw.defaults.memory_cache.time.monotonic", lambda: now[0])
    cache = MemoryCache()
    assert cache.add("k", b"new", ttl=0) is True
    assert cache.add("k", b"old", ttl=10) is False
    assert cache.get("k") == b"new"
    cache.set("t", b"old", ttl=5)
    now[0] += 6
    assert cache.add("t", b"again", ttl=5) is True  # the old entry had expired
    assert cache.get("t") == b"again"
