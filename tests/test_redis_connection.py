"""The Redis connection layer: URLs, one shared client per config, namespacing, counting."""
from __future__ import annotations

import pytest

from regmw import ConfigError, build, repository_key
from regmw_redis.connection import ROUND_TRIPS, close_client, limits_storage, namespaced, parse_url, redis_client
from tests.servers.redis_server import start_redis

from tests.servers._util import stop


def test_parse_plain_tls_and_unix_urls():
    plain = parse_url("redis://u:s%40cret@127.0.0.1:6380/3")
    assert (plain.db, plain.username, plain.password, plain.tls, plain.is_sentinel) == (3, "u", "s@cret", False, False)
    assert parse_url("rediss://127.0.0.1:6380").tls
    assert parse_url("unix:///run/redis.sock?db=2").db == 2
    assert parse_url("redis://h:1/1", {"db": 5, "password": "p"}).db == 5


def test_parse_sentinel_url():
    target = parse_url("redis+sentinel://:pw@127.0.0.1:26379,[::1]:26380/mymaster/2")
    assert target.sentinels == (("127.0.0.1", 26379), ("::1", 26380))
    assert (target.service_name, target.db, target.password) == ("mymaster", 2, "pw")
    assert parse_url("redis+sentinel://127.0.0.1:1", {"service_name": "m"}).service_name == "m"
    with pytest.raises(ValueError, match="service name"):
        parse_url("redis+sentinel://127.0.0.1:1")
    with pytest.raises(ValueError, match="host:port"):
        parse_url("redis+sentinel://127.0.0.1/m")


def test_bad_url_and_namespace_are_config_errors():
    with pytest.raises(ConfigError, match="redis.url"):
        build({"regmw": {"plugins": ["redis"]}, "redis": {"url": "memcached://x:1"}}, environ={})
    with pytest.raises(ConfigError, match="redis.namespace"):
        build({"regmw": {"plugins": ["redis"]}, "redis": {"namespace": "a{b}"}}, environ={})


def test_env_override_of_url(redis_server):
    _, url = redis_server
    runtime = build({"regmw": {"plugins": ["redis"], "entry_points": False}}, environ={"REGMW_REDIS_URL": url})
    assert runtime.config["redis"]["url"] == url
    assert redis_client(runtime.config).ping()


def test_one_client_per_config_shared_by_every_feature(redis_server):
    _, url = redis_server
    runtime = build({"regmw": {"plugins": ["redis"], "entry_points": False}, "redis": {"url": url}}, environ={})
    client = redis_client(runtime.config)
    assert client is redis_client(runtime.config)
    services = runtime.services
    assert services.cache.client is client and services.locks.client is client
    uri, options = limits_storage(runtime.config)
    assert options["connection_pool"] is client.connection_pool and options["key_prefix"] == "regmw:ratelimit"
    other = build({"regmw": {"plugins": ["redis"], "entry_points": False}, "redis": {"url": url}}, environ={})
    assert redis_client(other.config) is not client


def test_namespaced_keys_keep_the_repository_hash_tag():
    config = {"redis": {"namespace": "reg"}}
    assert namespaced(config, repository_key("group/app", "wal")) == "reg:{repository:group/app}:wal"


def test_unix_socket_url_and_round_trip_counter(tmp_path):
    socket_path = tmp_path / "redis.sock"
    proc, _ = start_redis(tmp_path, "--unixsocket", str(socket_path), "--unixsocketperm", "700")
    config = {"redis": {**_defaults(), "url": f"unix://{socket_path}?db=1"}}
    try:
        client = redis_client(config)
        client.ping()  # connect first: the handshake is counted too
        before = ROUND_TRIPS._value.get()
        client.set("k", b"v")
        pipe = client.pipeline(transaction=False)
        pipe.get("k").get("k").get("k")
        assert pipe.execute() == [b"v"] * 3
        assert ROUND_TRIPS._value.get() - before == 2  # one SET, one pipeline
        assert client.connection_pool.connection_kwargs.get("db") == 1
    finally:
        close_client(config)
        stop(proc)


def _defaults() -> dict:
    from regmw_redis.settings import SECTION

    return {key: option.default for key, option in SECTION.options.items()}
