"""The Redis connection layer: URLs, one connection per runtime (services.redis), namespacing, counting."""
from __future__ import annotations

import re

import pytest
import redis

from regmw import ConfigError, build, repository_key
from regmw_redis.connection import ROUND_TRIPS, RedisConnection, limits_storage, parse_url
from tests.servers.redis_server import start_redis

from tests.servers._util import stop


def test_parse_plain_tls_and_unix_urls():
    plain = parse_url("redis://u:s%40cret@127.0.0.1:6380/3")
    assert (plain.db, plain.username, plain.password, plain.tls, plain.is_sentinel) == (3, "u", "s@cret", False, False)
    assert parse_url("rediss://127.0.0.1:6380").tls
    assert parse_url("unix:///run/redis.sock?db=2").db == 2
    assert parse_url("redis://h:1/1", {"db": 5, "password": "p"}).db == 5


@pytest.mark.parametrize("url, message", [
    ("redis://127.0.0.1:6379/abc", "database 'abc' in the URL is not a number"),
    ("redis://127.0.0.1:6379/-1", "database '-1' in the URL is not a number"),
    ("redis://127.0.0.1:6379/0?db=x", "database 'x' in the URL is not a number"),
    ("unix://", "a unix:// URL needs the socket's path"),
    ("redis+sentinel://h:1/svc/x", "database 'x' in the URL is not a number"),
    ("redis+sentinel://h:1/svc/0/extra", "a redis+sentinel:// URL's path is /<service>[/db]"),
    ("redis+cluster://h:1?db=2", "a Redis Cluster has only database 0"),
    # redis-py would let these win over [redis]: no TLS verification, another timeout
    ("rediss://127.0.0.1:6380/0?ssl_cert_reqs=none", "URL query parameter 'ssl_cert_reqs' is not supported"),
    ("unix:///run/redis.sock?db=1&socket_timeout=30", "URL query parameter 'socket_timeout' is not supported"),
    ("rediss+cluster://h:1?ssl_check_hostname=false", "URL query parameter 'ssl_check_hostname' is not supported"),
    ("rediss+sentinel://h:1/registry?ssl=false", "URL query parameter 'ssl' is not supported"),
    ("redis+sentinel://h:1/3 service_name=registry", "the URL names master '3' and [redis] service_name 'registry'"),
])
def test_malformed_urls_are_one_line_config_errors(url, message):
    url, _, option = url.partition(" ")
    extra = dict([option.split("=")]) if option else {}
    with pytest.raises(ConfigError, match=f"redis.url: {re.escape(message)}") as info:
        build({"regmw": {"plugins": ["redis"], "entry_points": False}, "redis": {"url": url, **extra}}, environ={})
    assert "\n" not in str(info.value) and "invalid literal" not in str(info.value)


def test_section_password_and_db_win_over_the_urls(tmp_path):
    """docs/redis.md: `password`, `db` win over the URL's (redis-py's from_url lets the URL win)."""
    proc, port = start_redis(tmp_path, "--requirepass", "right")
    try:
        for url in (f"redis://:wrong@127.0.0.1:{port}/3", f"redis://:wrong@127.0.0.1:{port}/0?db=3"):
            connection = RedisConnection({**_defaults(), "url": url, "password": "right", "db": 5})
            try:
                connection.client.set("regmw-test:k", b"v")
            finally:
                connection.close()
        counts = {db: redis.Redis(port=port, password="right", db=db).dbsize() for db in (0, 3, 5)}
        assert counts == {0: 0, 3: 0, 5: 1}
    finally:
        stop(proc)


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
    runtime.services.redis.ping()


def test_one_connection_per_runtime_shared_by_every_feature(redis_server):
    _, url = redis_server
    config = {"regmw": {"plugins": ["redis"], "entry_points": False}, "redis": {"url": url},
              "ratelimit": {"rules": [{"by": "client", "limit": "5/minute"}]}}
    runtime = build(config, environ={})
    services = runtime.services
    connection = services.redis
    client = connection.client
    assert services.cache.connection is connection and services.locks.connection is connection
    assert services.cache.client is client and services.locks.client is client
    assert services.admission.connection is connection
    uri, options = limits_storage(connection)
    assert options["connection_pool"] is client.connection_pool and options["key_prefix"] == "regmw:ratelimit"
    assert services.rate_limiter.shared and services.cache.shared and services.locks.shared
    other = build(config, environ={})  # a second runtime in the same process: its own connection
    assert other.services.redis is not connection and other.services.redis.client is not client


def test_sentinel_tls_ca_reaches_both_hot_paths(tmp_path):
    """rediss+sentinel:// with [redis] tls_ca_file: the client's pool and limits' own storage verify with it."""
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    connection = RedisConnection({**_defaults(), "url": "rediss+sentinel://127.0.0.1:1/registry", "tls_ca_file": ca})
    assert connection.client.connection_pool.connection_kwargs["ssl_ca_certs"] == ca
    uri, options = limits_storage(connection)  # hot_path = "limits": limits builds its own Sentinel
    assert uri == "redis+sentinel://127.0.0.1:1" and options["ssl"] is True
    assert options["ssl_ca_certs"] == str(ca)  # else limits verifies against the system store and never connects


def test_building_a_connection_opens_none():
    """Checking a configuration must stay offline: redis-py dials on the first command, not before."""
    connection = RedisConnection({**_defaults(), "url": "redis://127.0.0.1:1/0"})  # nothing listens on port 1
    with pytest.raises(redis.ConnectionError):  # only the first command dials (and fails)
        connection.ping()


def test_keys_keep_the_repository_hash_tag():
    connection = RedisConnection({**_defaults(), "namespace": "reg"})
    assert connection.key(repository_key("group/app", "wal")) == "reg:{repository:group/app}:wal"
    assert connection.key("cache", "x") == "reg:cache:x"


def test_unix_socket_url_and_round_trip_counter(tmp_path):
    socket_path = tmp_path / "redis.sock"
    proc, _ = start_redis(tmp_path, "--unixsocket", str(socket_path), "--unixsocketperm", "700")
    connection = RedisConnection({**_defaults(), "url": f"unix://{socket_path}?db=1"})
    try:
        client = connection.client
        client.ping()  # connect first: the handshake is counted too
        before = ROUND_TRIPS._value.get()
        client.set("k", b"v")
        pipe = client.pipeline(transaction=False)
        pipe.get("k").get("k").get("k")
        assert pipe.execute() == [b"v"] * 3
        assert ROUND_TRIPS._value.get() - before == 2  # one SET, one pipeline
        assert client.connection_pool.connection_kwargs.get("db") == 1
    finally:
        connection.close()
        stop(proc)


def _defaults() -> dict:
    from regmw_redis.settings import SECTION

    return {key: option.default for key, option in SECTION.options.items()}


def test_execute_redials_a_killed_connection_and_keeps_error_replies_pooled(redis_server):
    """The lean request-path call keeps the client's failure rule (re-dial once) and its pool."""
    _, url = redis_server
    connection = RedisConnection({**_defaults(), "url": url})
    try:
        assert connection.execute("SET", "regmw-test:k", b"v") in (b"OK", "OK")
        assert connection.execute("GET", "regmw-test:k") == b"v"
        # the server drops every client connection (a restart, a failover): the pooled one is dead
        killer = redis.Redis.from_url(url)
        assert killer.client_kill_filter(_type="normal", skipme=True) >= 1
        assert connection.execute("GET", "regmw-test:k") == b"v"  # re-dialled, not raised
        clients_before = killer.info("clients")["connected_clients"]
        for _ in range(20):
            with pytest.raises(redis.ResponseError):
                connection.execute("INCR", "regmw-test:k")  # an error reply: raised as is
        # the connection went back to the pool each time: no new connections were dialled
        assert killer.info("clients")["connected_clients"] == clients_before
        assert connection.execute("GET", "regmw-test:k") == b"v"
    finally:
        connection.close()


def test_run_script_reloads_a_script_redis_forgot(redis_server):
    _, url = redis_server
    connection = RedisConnection({**_defaults(), "url": url})
    try:
        script = connection.client.register_script("return tonumber(ARGV[1]) + #KEYS")
        assert connection.run_script(script, ["a", "b"], [40]) == 42
        connection.execute("SCRIPT", "FLUSH")  # Redis restarted without its script cache
        assert connection.run_script(script, ["a"], [1]) == 2
    finally:
        connection.close()
