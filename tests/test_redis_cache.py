"""The Redis cache: bytes with a TTL, namespaced keys, errors are misses (logged, counted)."""
from __future__ import annotations

import time

import redis

from regmw import build, metrics, repository_key
from regmw_redis.cache import RedisCache
from tests.servers._util import stop


def _cache(url: str, **redis_section) -> RedisCache:
    runtime = build(
        {"regmw": {"plugins": ["redis"], "entry_points": False}, "redis": {"url": url, **redis_section}}, environ={}
    )
    assert isinstance(runtime.services.cache, RedisCache)
    return runtime.services.cache


def _errors(action: str) -> float:
    return metrics.REGISTRY.get_sample_value("regmw_backend_errors_total", {"backend": "cache", "action": action}) or 0.0


def test_get_set_delete_with_namespace_and_hash_tag(redis_server):
    _, url = redis_server
    cache = _cache(url, namespace="fleet1")
    key = repository_key("group/app", "class")
    assert cache.get(key) is None
    cache.set(key, b"\x01", ttl=60)
    assert cache.get(key) == b"\x01"
    raw = redis.Redis.from_url(url)
    assert raw.get("fleet1:cache:{repository:group/app}:class") == b"\x01"  # raw bytes, no pickle
    assert 0 < raw.pttl("fleet1:cache:{repository:group/app}:class") <= 60_000
    cache.delete(key)
    assert cache.get(key) is None


def test_ttl_expires_and_default_ttl_applies(redis_server):
    _, url = redis_server
    cache = _cache(url, cache_ttl=42)
    cache.set("short", b"x", ttl=0.05)
    cache.set("default", b"y")
    raw = redis.Redis.from_url(url)
    assert 40_000 < raw.pttl("regmw:cache:default") <= 42_000
    deadline = time.monotonic() + 5
    while cache.get("short") is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.get("short") is None


def test_redis_down_is_a_miss_counted_in_metrics(redis_server):
    proc, url = redis_server
    cache = _cache(url)
    cache.set("k", b"v")
    assert cache.get("k") == b"v"
    stop(proc)
    misses, dropped = _errors("miss"), _errors("dropped")
    assert cache.get("k") is None
    cache.set("k", b"w")  # dropped, not raised
    cache.delete("k")
    assert _errors("miss") == misses + 1
    assert _errors("dropped") == dropped + 1


def test_add_stores_only_if_absent(redis_server):
    _, url = redis_server
    cache = _cache(url, cache_ttl=42)
    raw = redis.Redis.from_url(url)
    key = repository_key("group/app", "migration")
    full = "regmw:cache:{repository:group/app}:migration"
    assert cache.add(key, b"new", ttl=0) is True  # ttl 0: no expiry
    assert raw.pttl(full) == -1
    assert cache.add(key, b"old", ttl=60) is False  # present: not overwritten, TTL untouched
    assert cache.get(key) == b"new" and raw.pttl(full) == -1
    cache.delete(key)
    assert cache.add(key, b"old", ttl=60) is True
    assert 0 < raw.pttl(full) <= 60_000
    assert cache.add("default", b"x") is True  # ttl None: the default TTL
    assert 40_000 < raw.pttl("regmw:cache:default") <= 42_000
    cache.set("short", b"a", ttl=0.05)  # an expired entry is absent
    deadline = time.monotonic() + 5
    while not cache.add("short", b"b", ttl=60) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cache.get("short") == b"b"


def test_add_with_redis_down_is_false_and_counted(redis_server):
    proc, url = redis_server
    cache = _cache(url)
    stop(proc)
    failed = _errors("add_failed")
    assert cache.add("k", b"v") is False
    assert _errors("add_failed") == failed + 1
