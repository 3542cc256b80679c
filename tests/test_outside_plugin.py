"""The plugin contract's test: a package outside plugins/ supplies its own shared stores and gets the whole behaviour.

``tests/outside_plugin`` is a distribution of its own (pyproject.toml, entry
point ``outside`` in the ``regmw`` group). It is pip-installed, offline, into a
throwaway directory put on ``sys.path``, which is what a ``pip install`` leaves
behind; regmw finds it through ``importlib.metadata`` entry points. It
replaces the cache, the lock manager and the rate limiter with its own Redis
ones, declares a prefetch key, and imports no built-in plugin
(tests/test_contract.py checks its import graph too).
"""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from werkzeug.test import Client

from regmw import RegistryMiddleware, repository_key

HERE = Path(__file__).resolve().parent
MIGRATION_HEADER = "Regmw-Migration-Path"


@pytest.fixture(scope="session")
def outside_dist(tmp_path_factory) -> Path:
    """tests/outside_plugin pip-installed (no index, no build isolation: no network) into a directory."""
    target = tmp_path_factory.mktemp("outside-site")
    build = tmp_path_factory.mktemp("outside-build")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(HERE / "outside_plugin")],
        check=True, cwd=build, capture_output=True, timeout=120,
    )
    assert (target / "regmw_outside-1.0.dist-info" / "entry_points.txt").is_file()
    return target


@pytest.fixture
def outside_installed(outside_dist, monkeypatch):
    monkeypatch.syspath_prepend(str(outside_dist))
    importlib.invalidate_caches()
    yield
    for name in [name for name in sys.modules if name == "regmw_outside" or name.startswith("regmw_outside.")]:
        del sys.modules[name]


@pytest.fixture
def layout(tmp_path) -> Path:
    """A filesystem registry holding ``team/app`` under the old layout only."""
    (tmp_path / "old" / "repositories" / "team" / "app" / "_manifests").mkdir(parents=True)
    (tmp_path / "new").mkdir()
    return tmp_path


def registry(environ, start_response):
    context = environ["regmw.context"]
    body = b",".join(sorted(key.encode() for key in context.prefetched))
    start_response("201 Created" if context.is_write else "200 OK", [("X-Prefetched", body.decode() or "-")])
    return [body]


def config_for(layout: Path, url: str, plugins: list[str], limit: str = "6/hour") -> dict:
    config = {
        "regmw": {"plugins": plugins},  # entry points on (the default): that is how regmw-outside loads
        "outside": {"url": url},
        "storage": {"root": str(layout)},
        "migration": {"old_root": "old", "new_root": "new"},
        "ratelimit": {"rules": [{"by": "client", "limit": limit, "name": "per-client"}]},
    }
    if "redis" in plugins:
        config["redis"] = {"url": url, "socket_timeout": 1, "connect_timeout": 1}
    return config


class CountingStorage:
    """Counts the storage look-ups the classification makes."""

    def __init__(self, storage):
        self.storage = storage
        self.calls = 0

    def prefix_exists(self, prefix):
        self.calls += 1
        return self.storage.prefix_exists(prefix)


def client_at(middleware, address: str) -> Client:
    """A test client whose requests come from ``address`` (the rate limit counts per client)."""
    def from_address(environ, start_response):
        environ["REMOTE_ADDR"] = address
        return middleware(environ, start_response)

    return Client(from_address)


@pytest.mark.services
def test_outside_stores_get_the_whole_behaviour_in_one_round_trip(outside_installed, layout, redis_server):
    from regmw_redis.connection import ROUND_TRIPS  # the test counts at redis plugin's connection; the plugin never imports it

    _, url = redis_server
    raw = redis.Redis.from_url(url)
    middleware = RegistryMiddleware(registry, config_for(layout, url, ["redis", "migration"]), environ={})
    services = middleware.services
    assert {type(backend).__module__ for backend in (services.cache, services.locks, services.rate_limiter)} == {
        "regmw_outside.stores"}
    assert services.classifier is not None and len(services.prefetch) == 2  # classification + regmw-outside's note
    storage = services.classifier.storage = CountingStorage(services.storage)
    first = client_at(middleware, "10.0.0.1")

    # classification caching, in the outside cache: storage once, then never
    response = first.get("/v2/team/app/manifests/latest")
    assert response.status_code == 200 and response.headers[MIGRATION_HEADER] == "old"
    assert storage.calls == 1
    assert raw.get("outside:cache:" + repository_key("team/app", "migration")) == b"old"

    # one Redis round trip per warm request: rate limit, lock, classification and the note, together
    raw.set("outside:cache:" + repository_key("team/app", "outside-note"), b"hello")
    for _ in range(2):
        before = ROUND_TRIPS._value.get()
        response = first.get("/v2/team/app/manifests/latest")
        assert ROUND_TRIPS._value.get() - before == 1
        assert response.status_code == 200 and response.headers[MIGRATION_HEADER] == "old"
        assert response.headers["X-Prefetched"] == ",".join(sorted([
            repository_key("team/app", "migration"), repository_key("team/app", "outside-note")]))
    assert storage.calls == 1

    # rate limits: its declarative rule, counted by the admission script (6 per hour per client)
    statuses = [first.get("/v2/team/app/manifests/latest").status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    assert first.get("/v2/team/app/tags/list").json["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert client_at(middleware, "10.0.0.2").get("/v2/team/app/manifests/latest").status_code == 200

    # read-only refusals from its lock manager, in its own keys
    writer = client_at(middleware, "10.0.0.3")
    lease = services.locks.set_read_only("team/app", 60, owner="test")
    assert lease is not None and raw.exists("outside:" + repository_key("team/app", "readonly"))
    before = ROUND_TRIPS._value.get()
    refused = writer.put("/v2/team/app/manifests/v1", data=b"{}")
    assert ROUND_TRIPS._value.get() - before == 1  # the lock was checked in the same script
    assert refused.status_code == 503 and refused.json["errors"][0]["code"] == "UNAVAILABLE"
    assert writer.get("/v2/team/app/manifests/v1").status_code == 200  # reads pass
    assert services.locks.clear_read_only("team/app", owner="test")
    assert writer.put("/v2/team/app/manifests/v1", data=b"{}").status_code == 201

    # a migration mark lands in the shared outside cache: another instance sees it at once
    services.classifier.mark_migrated("team/app")
    other = RegistryMiddleware(registry, config_for(layout, url, ["redis", "migration"]), environ={})
    assert client_at(other, "10.0.0.4").get("/v2/team/app/manifests/latest").headers[MIGRATION_HEADER] == "new"
    assert services.rate_limiter.calls == 0  # the script counted its declarative rules: hit() never ran


@pytest.mark.services
def test_outside_stores_work_without_the_redis_plugin(outside_installed, layout, redis_server):
    """No built-in Redis at all: regmw-outside provides services.redis itself, the core admission calls its stores."""
    _, url = redis_server
    raw = redis.Redis.from_url(url)
    middleware = RegistryMiddleware(registry, config_for(layout, url, ["migration"], limit="3/hour"), environ={})
    services = middleware.services
    assert type(services.redis).__module__ == "regmw_outside.stores"
    storage = services.classifier.storage = CountingStorage(services.storage)
    client = client_at(middleware, "10.0.0.1")
    statuses = [client.get("/v2/team/app/manifests/latest").status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]  # counted by its own hit(), in its own keys
    assert services.rate_limiter.calls == 4
    assert raw.exists("outside:ratelimit:per-client:10.0.0.1:3/3600")
    assert storage.calls == 1  # classification cached in its cache
    services.locks.set_read_only("team/app", 60, owner="test")
    writer = client_at(middleware, "10.0.0.2")
    assert writer.put("/v2/team/app/manifests/v1", data=b"{}").status_code == 503
    assert writer.get("/v2/team/app/manifests/v1").status_code == 200
