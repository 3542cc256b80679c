"""The admission hot path on Redis: one round trip, refusals, prefetch, failure policies."""
from __future__ import annotations

import os
import signal

import pytest
import redis
from werkzeug.test import Client

from regmw import ConfigError, RegistryMiddleware, metrics, repository_key
from regmw_redis.admission import RedisAdmission
from regmw_redis.connection import ROUND_TRIPS
from tests.servers._util import stop
from tests.servers.redis_apps import PrefetchClassification, make_middleware, redis_config, registry_app

MANIFEST = "/v2/team/app/manifests/latest"
RULES = [
    {"name": "per-client", "by": "client", "limit": "100/hour"},
    {"name": "per-repo-writes", "by": "repository", "limit": "50/hour", "methods": "write"},
]


def _round_trips(client: Client, method: str, path: str, **kwargs) -> tuple[int, float]:
    before = ROUND_TRIPS._value.get()
    response = client.open(path, method=method, **kwargs)
    return response.status_code, ROUND_TRIPS._value.get() - before


def _errors(backend: str, action: str) -> float:
    return metrics.REGISTRY.get_sample_value("regmw_backend_errors_total", {"backend": backend, "action": action}) or 0.0


def test_hot_path_is_one_round_trip_for_reads_and_writes(redis_server):
    _, url = redis_server
    middleware = make_middleware(url, ratelimit={"rules": RULES})
    assert isinstance(middleware.services.admission, RedisAdmission)
    client = Client(middleware)
    client.get(MANIFEST)  # warm: pool connection made
    assert _round_trips(client, "GET", MANIFEST) == (200, 1)
    # a successful write: the admission, then its confirmation (the lock read again before the 201 goes out)
    assert _round_trips(client, "PUT", MANIFEST, data=b"{}") == (201, 2)
    assert _round_trips(client, "HEAD", "/v2/team/app/blobs/sha256:" + "a" * 64) == (200, 1)
    unconfirmed = Client(make_middleware(url, ratelimit={"rules": RULES}, readonly={"confirm_writes": False}))
    unconfirmed.get(MANIFEST)
    assert _round_trips(unconfirmed, "PUT", MANIFEST, data=b"{}") == (201, 1)
    # the limits path pays per feature: hit + window stats per rule, lock check, cache read
    limits_path = make_middleware(url, redis={"hot_path": "limits"}, ratelimit={"rules": RULES})
    assert not isinstance(limits_path.services.admission, RedisAdmission)
    other = Client(limits_path)
    other.get(MANIFEST)
    status, trips = _round_trips(other, "GET", MANIFEST)
    assert status == 200 and trips == 3  # INCR script, GET, TTL (the cache read happens in the classifier)
    status, trips = _round_trips(other, "PUT", MANIFEST, data=b"{}")
    assert status == 201 and trips == 8  # two rules x 3, plus EXISTS, plus EXISTS again (the confirmation)


def test_prefetched_classification_reaches_the_app(redis_server):
    _, url = redis_server
    seen = {}

    def app(environ, start_response):
        seen.update(environ["regmw.context"].prefetched)
        start_response("200 OK", [])
        return [b""]

    middleware = RegistryMiddleware(app, redis_config(url), plugins=[PrefetchClassification()], environ={})
    middleware.services.cache.set(repository_key("team/app", "class"), b"new")
    client = Client(middleware)
    assert _round_trips(client, "GET", MANIFEST) == (200, 1)
    assert seen == {repository_key("team/app", "class"): b"new"}
    seen.clear()
    client.get("/v2/team/other/tags/list")
    assert seen == {repository_key("team/other", "class"): None}  # a miss is recorded, not re-asked


@pytest.mark.parametrize("hot_path", ["script", "limits"])
def test_read_only_repository_refuses_writes_only(redis_server, hot_path):
    _, url = redis_server
    middleware = make_middleware(url, redis={"hot_path": hot_path}, readonly={"retry_after": 30})
    client = Client(middleware)
    lease = middleware.services.locks.set_read_only("team/app", 60, "migrator")
    assert lease is not None
    response = client.put(MANIFEST, data=b"{}")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "30"
    assert response.json == {"errors": [{
        "code": "UNAVAILABLE", "message": "repository is read-only (migration in progress)", "detail": {"name": "team/app"},
    }]}
    assert client.get(MANIFEST).status_code == 200
    assert client.put("/v2/team/other/manifests/latest", data=b"{}").status_code == 201
    assert middleware.services.locks.clear_read_only("team/app", "migrator")
    assert client.put(MANIFEST, data=b"{}").status_code == 201


@pytest.mark.parametrize("hot_path", ["script", "limits"])
def test_rate_limit_refusal_and_headers(redis_server, hot_path):
    _, url = redis_server
    middleware = make_middleware(
        url, redis={"hot_path": hot_path}, ratelimit={"rules": [{"name": "c", "by": "client", "limit": "3/hour"}]}
    )
    client = Client(middleware)
    remaining = []
    for _ in range(3):
        response = client.get(MANIFEST)
        assert response.status_code == 200
        assert response.headers["RateLimit-Limit"] == "3"
        assert 3500 < int(response.headers["RateLimit-Reset"]) <= 3600
        remaining.append(response.headers["RateLimit-Remaining"])
    assert remaining == ["2", "1", "0"]
    refused = client.get(MANIFEST)
    assert refused.status_code == 429
    assert refused.json["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert 3500 < int(refused.headers["Retry-After"]) <= 3600
    assert client.get("/other/path").status_code == 200  # outside /v2: not counted


def test_script_and_limits_paths_count_the_same_windows(redis_server):
    _, url = redis_server
    rules = {"rules": [{"name": "c", "by": "client", "limit": "4/hour"}]}
    script = Client(make_middleware(url, ratelimit=rules))
    limits_path = Client(make_middleware(url, redis={"hot_path": "limits"}, ratelimit=rules))
    assert script.get(MANIFEST).headers["RateLimit-Remaining"] == "3"
    assert limits_path.get(MANIFEST).headers["RateLimit-Remaining"] == "2"
    assert script.get(MANIFEST).headers["RateLimit-Remaining"] == "1"
    assert limits_path.get(MANIFEST).headers["RateLimit-Remaining"] == "0"
    assert script.get(MANIFEST).status_code == 429
    assert limits_path.get(MANIFEST).status_code == 429


def test_moving_window_needs_the_limits_path(redis_server):
    _, url = redis_server
    rules = {"rules": [{"by": "client", "limit": "2/hour"}], "strategy": "moving-window"}
    with pytest.raises(ConfigError, match="hot_path"):
        make_middleware(url, ratelimit=rules)
    client = Client(make_middleware(url, redis={"hot_path": "limits"}, ratelimit=rules))
    assert [client.get(MANIFEST).status_code for _ in range(3)] == [200, 200, 429]
    raw = redis.Redis.from_url(url)
    assert [raw.type(key) for key in raw.scan_iter("regmw:ratelimit:LIMITER/client-any-0/*/2/1/hour")] == [b"list"]


def test_trusted_proxy_forwarded_for_and_ipv6_grouping(redis_server):
    _, url = redis_server
    middleware = make_middleware(
        url, regmw={"trusted_proxies": ["10.0.0.0/8"]}, ratelimit={"rules": [{"by": "client", "limit": "2/hour"}]}
    )
    client = Client(middleware)

    def get(peer: str, forwarded: str | None = None) -> int:
        headers = {"X-Forwarded-For": forwarded} if forwarded else {}
        return client.get(MANIFEST, headers=headers, environ_overrides={"REMOTE_ADDR": peer}).status_code

    # behind the trusted proxy, the forwarded client is counted, not the proxy
    assert [get("10.1.1.1", "203.0.113.5") for _ in range(3)] == [200, 200, 429]
    assert get("10.1.1.1", "203.0.113.6") == 200
    # a client prepending a fake address to the header cannot pick its identity
    assert get("10.1.1.1", "198.51.100.1, 203.0.113.5") == 429
    # an untrusted peer's header is ignored: it is counted as itself
    assert [get("192.0.2.9", "203.0.113.77") for _ in range(3)] == [200, 200, 429]
    # IPv6 hosts in one /64 share a counter
    assert [get("2001:db8::1"), get("2001:db8::2"), get("2001:db8::3")] == [200, 200, 429]
    assert get("2001:db8:0:1::1") == 200
    keys = {key.decode() for key in redis.Redis.from_url(url).scan_iter("regmw:ratelimit:*")}
    assert "regmw:ratelimit:LIMITER/client-any-0/203.0.113.5/2/1/hour" in keys
    assert "regmw:ratelimit:LIMITER/client-any-0/2001:db8::/64/2/1/hour" in keys


def test_script_reloaded_after_script_flush(redis_server):
    _, url = redis_server
    client = Client(make_middleware(url, ratelimit={"rules": RULES}))
    assert client.get(MANIFEST).status_code == 200
    redis.Redis.from_url(url).script_flush()
    assert client.get(MANIFEST).headers["RateLimit-Remaining"] == "98"


@pytest.mark.parametrize("hot_path", ["script", "limits"])
def test_redis_down_fail_open_by_default(redis_server, hot_path):
    proc, url = redis_server
    middleware = make_middleware(
        url, redis={"hot_path": hot_path}, ratelimit={"rules": RULES}, readonly={"lockable": ["locked/*"]}
    )
    client = Client(middleware)
    assert client.get(MANIFEST).status_code == 200
    stop(proc)
    opened = _errors("ratelimit", "fail_open")
    assert client.get(MANIFEST).status_code == 200
    assert client.put(MANIFEST, data=b"{}").status_code == 201  # not a lockable repository
    assert _errors("ratelimit", "fail_open") == opened + 2
    # writes to lockable repositories fail closed (the [readonly] default), reads pass
    refused = client.put("/v2/locked/app/manifests/latest", data=b"{}")
    assert refused.status_code == 503 and refused.json["errors"][0]["code"] == "UNAVAILABLE"
    assert refused.headers["Retry-After"].isdigit()
    assert client.get("/v2/locked/app/manifests/latest").status_code == 200


@pytest.mark.parametrize("hot_path", ["script", "limits"])
def test_redis_down_fail_closed_when_configured(redis_server, hot_path):
    proc, url = redis_server
    middleware = make_middleware(
        url, redis={"hot_path": hot_path}, ratelimit={"rules": RULES, "fail_open": False},
        readonly={"fail_closed_writes": False},
    )
    client = Client(middleware)
    assert client.get(MANIFEST).status_code == 200
    stop(proc)
    closed = _errors("ratelimit", "fail_closed")
    response = client.get(MANIFEST)
    assert response.status_code == 503
    assert response.json["errors"][0] == {"code": "UNAVAILABLE", "message": "rate limiting is unavailable"}
    assert response.headers["Retry-After"] == "5"
    assert _errors("ratelimit", "fail_closed") == closed + 1
    assert client.get("/elsewhere").status_code == 200


@pytest.mark.parametrize("identity", ["10.1.2.3", "2001:db8::/64", "group/sub/app", "user@example.com", "*", "é/ü"])
def test_script_counters_have_the_keys_limits_gives_them(identity):
    """The script builds ``limits``' key around the identity once (public ``key_for``, no private helper).

    Both hot paths must count the same windows: the script's key for an
    identity is exactly what ``limits`` computes for it, for any identity a
    rule can produce (client keys, IPv6 networks, repositories, subjects, ``*``).
    """
    from regmw.defaults.ratelimit import parse_rules

    middleware = make_middleware("redis://127.0.0.1:1/0", prefetch=False, ratelimit={"rules": [  # never dialled
        {"name": "per-client", "by": "client", "limit": "10/second;100/hour"}]})
    admission = middleware.services.admission
    (rule,) = parse_rules([{"name": "per-client", "by": "client", "limit": "10/second;100/hour"}])
    assert len(admission.counters) == 2
    for (_, item, head, tail, _, _), expected in zip(admission.counters, rule.items, strict=True):
        assert head + identity + tail == "regmw:ratelimit:" + expected.key_for("per-client", identity)
        assert item.key_for("per-client", identity) == expected.key_for("per-client", identity)


def test_a_hung_redis_is_waited_for_once_per_request(tmp_path, redis_server):
    """docs/redis.md: a hung Redis costs a request at most about 2 x socket_timeout.

    The admission's EVALSHA times out once, or a new connection's handshake
    and its one retry time out (never both: that was 3 x); the classifier,
    told the prefetch missed, asks storage and must not then wait a second
    time on Redis to cache what storage said (SET NX). Once Redis answers
    again, caching resumes at the next request.
    """
    proc, url = redis_server
    (tmp_path / "docker/registry/v2/repositories/team/app/_layers").mkdir(parents=True)
    config = redis_config(url, regmw={"plugins": ["redis", "migration"]}, storage={"root": str(tmp_path)},
                          migration={"new_root": "new/docker/registry/v2"}, ratelimit={"rules": RULES})
    client = Client(RegistryMiddleware(registry_app, config, environ={}))
    assert client.get(MANIFEST).headers["Regmw-Migration-Path"] == "old"  # warm: pool, script, cached "old"
    key = "regmw:cache:" + repository_key("team/app", "migration")
    direct = redis.Redis.from_url(url)
    assert direct.get(key) == b"old"
    direct.close()  # its connection must not hold anything while Redis is stopped

    os.kill(proc.pid, signal.SIGSTOP)
    try:
        # Every packet written to a stopped Redis waits socket_timeout for its answer: round trips = waits.
        pooled = _round_trips(client, "GET", "/v2/")  # the pooled connection times out and is dropped
        admission_only = _round_trips(client, "GET", "/v2/")  # no repository: the admission's call alone
        skipped = _errors("cache", "add_failed")
        classified = _round_trips(client, "GET", MANIFEST)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    # The EVALSHA that timed out on the pooled connection is not sent again on a new one: the re-dial's
    # handshake (retried once by redis-py) would wait twice more, and the script may already have counted.
    assert pooled == (200, 1)
    assert admission_only == (200, 2)  # a new connection: its handshake and redis-py's one retry of it
    assert classified == admission_only  # fail open, classified from storage, and no SET NX after the admission
    assert _errors("cache", "add_failed") == skipped + 1  # the write not made is still counted

    redis.Redis.from_url(url).delete(key)
    assert client.get(MANIFEST).status_code == 200  # Redis answers the admission: caching resumes at once
    assert redis.Redis.from_url(url).get(key) == b"old"
