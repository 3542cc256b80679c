"""The embedded cache against the naive dict and against cachetools, side by side in one run.

The Go registry's per-instance caches were effectively unbounded and got pods
OOM-killed. This pushes N distinct keys (repository classification entries)
through three caches and reports, for each, the memory still held afterwards
(tracemalloc) and set+get throughput:

- ``dict``: the naive unbounded cache;
- ``cachetools.TTLCache``: what a Python user would reach for (bounded by entry count only);
- ``regmw MemoryCache``: LRU + TTL bounded by entries AND bytes.

Usage: ``python benchmarks/cache_bench.py [--keys N] [--json]``
"""
from __future__ import annotations

import argparse
import gc
import json
import time
import tracemalloc

from cachetools import TTLCache

from regmw.defaults.memory_cache import MemoryCache

MAX_BYTES = 8 * 1024 * 1024
VALUE = b"old"


class DictCache:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        self.data[key] = value


class CachetoolsCache:
    def __init__(self, maxsize: int) -> None:
        self.data = TTLCache(maxsize=maxsize, ttl=300)

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        self.data[key] = value


def fill(cache, keys: int) -> float:
    """Set and get ``keys`` distinct keys; the seconds it took."""
    started = time.perf_counter()
    for index in range(keys):
        key = f"{{repository:group/project-{index}}}:migration"
        cache.set(key, VALUE)
        cache.get(key)
    return time.perf_counter() - started


def measure(factory, keys: int) -> dict:
    """Throughput on one fresh cache (no tracing), memory held on another (traced)."""
    gc.collect()
    elapsed = fill(factory(), keys)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    cache = factory()
    fill(cache, keys)
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return {"held_mb": round(held / 2**20, 2), "ops_per_s": round(2 * keys / elapsed), "cache": cache}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    # cachetools bounded to the same number of entries regmw ends up holding, for a fair memory comparison
    regmw = measure(lambda: MemoryCache(max_entries=10**9, max_bytes=MAX_BYTES), args.keys)
    entries = len(regmw.pop("cache"))
    results = {
        "regmw_memory_cache": {**regmw, "entries": entries},
        "cachetools_ttlcache": measure(lambda: CachetoolsCache(entries), args.keys),
        "naive_dict": measure(DictCache, args.keys),
    }
    for name in ("cachetools_ttlcache", "naive_dict"):
        results[name]["entries"] = len(results[name].pop("cache").data)
    print(f"{args.keys:,} distinct keys through each cache (regmw capped at {MAX_BYTES >> 20} MiB):")
    for name, row in results.items():
        print(f"  {name:22} held {row['held_mb']:8.2f} MiB  {row['entries']:>9,} entries  {row['ops_per_s']:>9,} ops/s")
    summary = {
        "keys": args.keys,
        **results,
        "naive_vs_regmw_memory_ratio": round(results["naive_dict"]["held_mb"] / results["regmw_memory_cache"]["held_mb"], 1),
        "regmw_vs_cachetools_ops_ratio": round(
            results["regmw_memory_cache"]["ops_per_s"] / results["cachetools_ttlcache"]["ops_per_s"], 2),
    }
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
