"""Every Redis feature on a real Redis Cluster (3 masters + 3 replicas on loopback).

The module's cluster is shared (each test uses its own ``[redis] namespace``);
tests that kill nodes or move slots are in tests/test_redis_cluster_topology.py
with a cluster of their own.
"""
from __future__ import annotations

import itertools
import time
import uuid
from collections import Counter

import pytest
import redis
from redis.commands.core import Script
from werkzeug.test import Client

from regmw import RegistryMiddleware, build, metrics, repository_key
from regmw_redis.admission import RedisAdmission
from regmw_redis.cluster import NODES, ClusterConnection, SlotGroups, parse_cluster_url, slot_of
from regmw_redis.connection import ROUND_TRIPS
from regmw_redis.locks import SlotUnavailable
from tests.servers import redis_apps
from tests.servers.redis_apps import PrefetchClassification, make_middleware, redis_config

MANIFEST = "/v2/team/app/manifests/latest"
RULES = [
    {"name": "per-client", "by": "client", "limit": "100/hour"},
    {"name": "per-repo-writes", "by": "repository", "limit": "50/hour", "methods": "write"},
]


def _ns() -> str:
    return "t" + uuid.uuid4().hex[:10]


def _middleware(group, namespace: str, **sections) -> RegistryMiddleware:
    redis_section = {"namespace": namespace, **sections.pop("redis", {})}
    return make_middleware(group.url, redis=redis_section, **sections)


# --- URLs and laziness (no server) ------------------------------------------------------


def test_cluster_url_parsing():
    target = parse_cluster_url("rediss+cluster://u:p%40ss@127.0.0.1:7000,[::1]:7001")
    assert target.nodes == (("127.0.0.1", 7000), ("::1", 7001))
    assert (target.username, target.password, target.tls) == ("u", "p@ss", True)
    assert not parse_cluster_url("redis+cluster://h:1").tls
    with pytest.raises(ValueError, match="host:port"):
        parse_cluster_url("redis+cluster://h")
    with pytest.raises(ValueError, match="database 0"):
        parse_cluster_url("redis+cluster://h:1/3")


def test_building_a_cluster_connection_opens_none_and_a_dead_cluster_is_a_redis_error():
    """check-config stays offline; at first use, no node answering is one ConnectionError line (fail-open applies)."""
    from regmw_redis.settings import SECTION

    section = {key: option.default for key, option in SECTION.options.items()}
    connection = ClusterConnection({**section, "url": "redis+cluster://127.0.0.1:1,127.0.0.1:2"})
    assert connection.cluster and not connection.client.built  # constructed, nothing dialled
    with pytest.raises(redis.ConnectionError) as caught:
        connection.ping()
    assert "Redis Cluster 127.0.0.1:1,127.0.0.1:2 unreachable" in str(caught.value)
    assert "\n" not in str(caught.value)
    config = redis_config("redis+cluster://127.0.0.1:1,127.0.0.1:2", ratelimit={"rules": RULES},
                          readonly={"fail_closed_writes": False})
    client = Client(RegistryMiddleware(redis_apps.registry_app, config, environ={}))
    assert client.get(MANIFEST).status_code == 200  # rate limit fails open, as on one node


# --- the key layout ----------------------------------------------------------------------


def _record_script_calls(monkeypatch) -> list[tuple[str, list[str]]]:
    """Record (script's first line, KEYS) of every Lua script call: through redis-py's Script, and the admission's per-slot calls."""
    calls: list[tuple[str, list[str]]] = []
    original = Script.__call__

    def recording(self, keys=None, args=None, client=None):
        calls.append((self.script.strip().splitlines()[0], [k.decode() if isinstance(k, bytes) else k for k in keys or []]))
        return original(self, keys=keys, args=args, client=client)

    monkeypatch.setattr(Script, "__call__", recording)
    split = SlotGroups.split

    def recording_split(keys, args):  # the admission's per-slot calls (sent in one cluster pipeline)
        groups = split(keys, args)
        calls.extend(("local check_lock = ARGV[1] == '1'", list(call_keys)) for call_keys, _, _ in groups)
        return groups

    monkeypatch.setattr(SlotGroups, "split", staticmethod(recording_split))
    return calls


def test_no_script_call_spans_slots(redis_cluster, monkeypatch):
    """Every feature's scripts, driven for sample requests, touch one slot per call.

    The sample covers every rule identity (client, repository, subject,
    global), reads and writes, prefetch, locks with fencing and semaphores; a
    call spanning slots would also fail on the cluster (CROSSSLOT), so the
    statuses are checked too.
    """
    namespace = _ns()
    rules = RULES + [{"name": "subj", "by": "subject", "limit": "1000/hour"},
                     {"name": "all", "by": "global", "limit": "100000/hour"}]
    middleware = _middleware(redis_cluster, namespace, ratelimit={"rules": rules}, readonly={"fail_closed_writes": False})
    calls = _record_script_calls(monkeypatch)
    client = Client(middleware)
    statuses = Counter()
    for repository, peer in itertools.product(["team/app", "a/b/c", "x", "z/y_1.2"], ["10.0.0.1", "10.0.0.2", "2001:db8::1"]):
        for method in ("GET", "PUT", "HEAD"):
            response = client.open(f"/v2/{repository}/manifests/latest", method=method, data=b"{}",
                                   environ_overrides={"REMOTE_ADDR": peer})
            statuses[response.status_code] += 1
    assert set(statuses) <= {200, 201}, statuses
    locks = middleware.services.locks
    lease = locks.set_read_only("team/app", 30, "migrator")
    assert lease is not None and locks.clear_read_only("team/app", "migrator")
    with locks.cluster_slot("gc", 2, ttl=5):
        assert locks.slot_holders("gc") == 1
    from regmw_dbroute.store import make_store  # dbroute's scripts, on the same services.redis

    class Settings:
        store, store_url, store_namespace, store_timeout = "auto", None, None, 0.5

    positions = make_store(Settings(), middleware.services.redis)
    positions.initialize(1, 60)
    positions.advance("team/app", 5, 60)
    assert positions.get("team/app").repository == 5
    multi_key = [(script, keys) for script, keys in calls if len(keys) > 1]
    assert {script for script, _ in multi_key} >= {"local check_lock = ARGV[1] == '1'",
                                                    "if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then",
                                                    "local t = redis.call('TIME')"}
    for script, keys in calls:
        assert len({slot_of(key) for key in keys}) == 1, f"{script}: {keys} span slots"
    # and the layout is what docs/redis.md says: tags by repository, client, subject, global, slot name
    seen = {key for _, keys in calls for key in keys}
    assert f"{namespace}:{{repository:team/app}}:readonly" in seen
    assert f"{namespace}:ratelimit:LIMITER/per-client/{{client:10.0.0.1}}/100/1/hour" in seen
    assert f"{namespace}:ratelimit:LIMITER/per-repo-writes/{{repository:team/app}}/50/1/hour" in seen
    assert f"{namespace}:ratelimit:LIMITER/all/{{global:*}}/100000/1/hour" in seen
    assert f"{namespace}:cache:{{repository:team/app}}:class" in seen
    assert f"{namespace}:{{slot:gc}}:holders" in seen
    assert {f"{namespace}:{{dbroute}}:floor", f"{namespace}:{{repository:team/app}}:lsn"} <= seen


def test_a_request_spans_at_most_its_client_and_repository_slots():
    """One write's keys: its client's counters in one slot, its repository's lock, counter and classification in another."""
    keys = ["ns:{repository:team/app}:readonly",
            "ns:ratelimit:LIMITER/per-client/{client:10.0.0.1}/100/1/hour",
            "ns:ratelimit:LIMITER/per-client/{client:10.0.0.1}/1000/1/day",
            "ns:ratelimit:LIMITER/per-repo-writes/{repository:team/app}/50/1/hour",
            "ns:cache:{repository:team/app}:class"]
    args = ["1", 3, 100, 3_600_000, 1000, 86_400_000, 50, 3_600_000]
    calls = SlotGroups.split(keys, args)
    assert len(calls) == 2
    (repo_keys, repo_args, repo_layout), (client_keys, client_args, client_layout) = calls
    assert repo_keys == [keys[0], keys[3], keys[4]] and repo_args == ["1", 1, 50, 3_600_000]
    assert repo_layout == [("lock", 0), ("limit", 2), ("prefetch", 0)]
    assert client_keys == keys[1:3] and client_args == ["0", 2, 100, 3_600_000, 1000, 86_400_000]
    # replies put back in the single-node layout; the client group stopped after its first refusal
    merged = SlotGroups._merge(calls, [[1, 1, 7, 1000, b"old"], [0, 1, 101, 2000]], args)
    assert merged == [1, 2, 101, 2000, 7, 1000, b"old"]


# --- the features --------------------------------------------------------------------


def test_hot_path_one_script_per_slot_group_and_nodes_counted(redis_cluster):
    middleware = _middleware(redis_cluster, _ns(), ratelimit={"rules": RULES})
    assert isinstance(middleware.services.admission, RedisAdmission)
    client = Client(middleware)
    peer = {"REMOTE_ADDR": "10.9.9.9"}
    client.get(MANIFEST, environ_overrides=peer)  # warm: slot map read, connections made
    groups = len({slot_of("{client:10.9.9.9}"), slot_of("{repository:team/app}")})
    for method in ("GET", "PUT"):
        before, nodes = ROUND_TRIPS._value.get(), NODES._value.get()
        assert client.open(MANIFEST, method=method, data=b"{}", environ_overrides=peer).status_code in (200, 201)
        confirmation = method == "PUT"  # a write's success is confirmed: the lock read again ([readonly] confirm_writes)
        assert ROUND_TRIPS._value.get() - before == groups + confirmation  # one script per slot group, nothing else
        assert 1 <= NODES._value.get() - nodes <= groups


def test_rate_limit_refusal_headers_and_both_paths_count_the_same_windows(redis_cluster):
    namespace = _ns()
    rules = {"rules": [{"name": "c", "by": "client", "limit": "4/hour"}]}
    script = Client(_middleware(redis_cluster, namespace, ratelimit=rules))
    limits_path = Client(_middleware(redis_cluster, namespace, redis={"hot_path": "limits"}, ratelimit=rules))
    assert script.get(MANIFEST).headers["RateLimit-Remaining"] == "3"
    assert limits_path.get(MANIFEST).headers["RateLimit-Remaining"] == "2"
    assert script.get(MANIFEST).headers["RateLimit-Remaining"] == "1"
    assert limits_path.get(MANIFEST).headers["RateLimit-Remaining"] == "0"
    refused = script.get(MANIFEST)
    assert refused.status_code == 429 and refused.json["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert 3500 < int(refused.headers["Retry-After"]) <= 3600
    assert limits_path.get(MANIFEST).status_code == 429
    raw = redis_cluster.client()
    assert int(raw.get(f"{namespace}:ratelimit:LIMITER/c/{{client:unknown}}/4/1/hour")) == 6


def test_read_only_lock_fencing_and_prefetch_on_cluster(redis_cluster):
    namespace = _ns()
    seen = {}

    def app(environ, start_response):
        seen.update(environ["regmw.context"].prefetched)
        start_response("201 Created" if environ["REQUEST_METHOD"] == "PUT" else "200 OK", [])
        return [b""]

    config = redis_config(redis_cluster.url, redis={"namespace": namespace}, readonly={"retry_after": 30})
    middleware = RegistryMiddleware(app, config, plugins=[PrefetchClassification()], environ={})
    locks, cache = middleware.services.locks, middleware.services.cache
    client = Client(middleware)
    cache.set(repository_key("team/app", "class"), b"new")
    assert client.get(MANIFEST).status_code == 200
    assert seen == {repository_key("team/app", "class"): b"new"}
    first = locks.set_read_only("team/app", 30, "alice")
    assert first is not None and locks.set_read_only("team/app", 30, "bob") is None
    again = locks.set_read_only("team/app", 30, "alice")
    assert again.token > first.token
    refused = client.put(MANIFEST, data=b"{}")
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "30"
    assert client.get(MANIFEST).status_code == 200
    assert client.put("/v2/team/other/manifests/latest", data=b"{}").status_code == 201
    assert set(locks.list_read_only()) == {"team/app"}  # scanned on every master
    assert not locks.clear_read_only("team/app", "bob") and locks.clear_read_only("team/app", "alice")
    assert client.put(MANIFEST, data=b"{}").status_code == 201


def test_cache_on_cluster(redis_cluster):
    runtime = build({"regmw": {"plugins": ["redis"], "entry_points": False},
                     "redis": {"url": redis_cluster.url, "namespace": _ns(), "cache_ttl": 42}}, environ={})
    cache = runtime.services.cache
    key = repository_key("group/app", "class")
    assert cache.get(key) is None
    cache.set(key, b"\x01", ttl=60)
    assert cache.get(key) == b"\x01"
    assert cache.add(key, b"old") is False and cache.get(key) == b"\x01"
    cache.delete(key)
    assert cache.add(key, b"old") is True and cache.get(key) == b"old"


def test_semaphore_on_cluster(redis_cluster):
    runtime = build({"regmw": {"plugins": ["redis"], "entry_points": False},
                     "redis": {"url": redis_cluster.url, "namespace": _ns()}}, environ={})
    locks = runtime.services.locks
    with locks.cluster_slot("gc", 1, ttl=0.6) as lease:
        with pytest.raises(SlotUnavailable):
            with locks.cluster_slot("gc", 1, ttl=5):
                pass
        start = time.monotonic()
        deadline = start + 5
        while time.monotonic() - start < 1.0 and time.monotonic() < deadline:  # renewed past its TTL
            assert locks.slot_holders("gc") == 1
            time.sleep(0.05)
        assert not lease.lost.is_set()
    assert locks.slot_holders("gc") == 0


def test_dbroute_positions_on_the_cluster_connection(redis_cluster):
    """dbroute gets its Redis from services.redis: built by its own make_store, each of its scripts stays in one slot."""
    from regmw_dbroute.store import make_store

    connection = build({"regmw": {"plugins": ["redis"], "entry_points": False},
                        "redis": {"url": redis_cluster.url, "namespace": _ns()}}, environ={}).services.redis

    class Settings:
        store, store_url, store_namespace, store_timeout = "auto", None, None, 0.5

    store = make_store(Settings(), connection)
    assert slot_of(store.key("team/app")) != slot_of(store._floor_key)  # a repository's position and the floor: two slots
    assert not store.get("team/app").initialized
    store.initialize(100, 60)
    assert store.advance("team/app", 500, 60) == 500
    assert store.advance("team/app", 300, 60) == 500  # keeps the maximum
    positions = store.get("team/app")
    assert (positions.repository, positions.floor, positions.initialized) == (500, 100, True)


# --- across processes ---------------------------------------------------------------


def cluster_worker(url: str, namespace: str, rule: dict, reads: int, writes: int, results) -> None:
    """``reads`` GETs counted by ``rule``, then ``writes`` PUTs to the repository the test keeps read-only."""
    middleware = make_middleware(url, prefetch=False, redis={"namespace": namespace}, ratelimit={"rules": [rule]})
    client = Client(middleware)
    statuses = Counter(client.get(MANIFEST).status_code for _ in range(reads))
    statuses.update(f"PUT {client.put('/v2/team/locked/manifests/latest', data=b'{}').status_code}"
                    for _ in range(writes))
    results.put(dict(statuses))


def test_four_processes_limit_and_read_only_lock(redis_cluster):
    """4 processes: a repository limit of 25 admits exactly 25 GETs of 80; a read-only lock admits 0 of 80 writes."""
    namespace = _ns()
    rule = {"name": "repo", "by": "repository", "limit": "25/hour", "methods": "read"}
    locks = build({"regmw": {"plugins": ["redis"], "entry_points": False},
                   "redis": {"url": redis_cluster.url, "namespace": namespace}}, environ={}).services.locks
    with locks.hold_read_only("team/locked", ttl=30, owner="migrator"):
        outcomes = redis_apps.run_workers(cluster_worker, (redis_cluster.url, namespace, rule, 20, 20), 4)
    total = Counter()
    for outcome in outcomes:
        total.update(outcome)
    assert total == Counter({200: 25, 429: 55, "PUT 503": 80})  # exactly the limit; no write admitted
    raw = redis_cluster.client()
    assert int(raw.get(f"{namespace}:ratelimit:LIMITER/repo/{{repository:team/app}}/25/1/hour")) == 80
    assert not locks.read_only("team/locked")  # released at the end of the block


def _errors(backend: str, action: str) -> float:
    return metrics.REGISTRY.get_sample_value("regmw_backend_errors_total", {"backend": backend, "action": action}) or 0.0


def test_scripts_reloaded_after_script_flush_on_every_node(redis_cluster):
    """A node that lost its scripts (restart, failover, SCRIPT FLUSH) answers NOSCRIPT: reloaded, the request counts."""
    middleware = _middleware(redis_cluster, _ns(), ratelimit={"rules": RULES})
    client = Client(middleware)
    assert client.get(MANIFEST).headers["RateLimit-Remaining"] == "99"
    for port in redis_cluster.alive_ports():
        redis_cluster.node(port).script_flush()
    assert client.put(MANIFEST, data=b"{}").status_code == 201
    assert client.get(MANIFEST).headers["RateLimit-Remaining"] == "97"
