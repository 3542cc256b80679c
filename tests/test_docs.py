"""The examples in the README and docs run as printed, and each does what its text says.

Every plugin example in docs/hooks.md and docs/writing-plugins.md starts with
``# example: <name>``; :data:`CHECKS` holds one check per name (a test fails
when an example has none), and every example must also survive the
repository-less requests (``/v2/``, ``/v2/_catalog``). Nothing here reads the
real date: the Friday example gets a Friday clock and a Thursday clock.
"""
from __future__ import annotations

import datetime
import json
import logging
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path
from wsgiref.validate import validator

import pytest
from werkzeug.test import Client

from regmw import ConfigError, RegistryMiddleware, StorageError, build, hookimpl, repository_key

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("docs/hooks.md", "docs/writing-plugins.md")
MIGRATION_HEADER = "Regmw-Migration-Path"
FRIDAY, THURSDAY = datetime.date(2026, 11, 27), datetime.date(2026, 11, 26)


def python_blocks(doc: str) -> list[str]:
    text = (ROOT / doc).read_text()
    return [block for block in re.findall(r"```python\n(.*?)```", text, re.DOTALL) if "@hookimpl" in block]


def examples() -> dict[str, str]:
    found: dict[str, str] = {}
    for doc in DOCS:
        for block in python_blocks(doc):
            match = re.match(r"# example: ([\w-]+)\n", block)
            assert match, f"{doc}: a plugin example without '# example: <name>' as its first line:\n{block}"
            assert match.group(1) not in found, f"example name {match.group(1)} used twice"
            found[match.group(1)] = block
    return found


def as_module(source: str, name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(compile(source, name, "exec"), module.__dict__)
    return module


def app(environ, start_response):
    start_response("201 Created" if environ["REQUEST_METHOD"] in ("PUT", "POST") else "200 OK",
                   [("Content-Type", "text/plain")])
    return [b"ok"]


class Seen:
    """An app that keeps the last request's context and ``regmw.db``."""

    def __init__(self):
        self.context = None
        self.db = None

    def __call__(self, environ, start_response):
        self.context, self.db = environ["regmw.context"], environ.get("regmw.db")
        return app(environ, start_response)


def middleware(plugin, config=None, registry=app) -> RegistryMiddleware:
    config = dict(config or {})
    config.setdefault("regmw", {}).setdefault("entry_points", False)
    return RegistryMiddleware(registry, config, plugins=[plugin], environ={})


class BufferedClient(Client):
    """Reads and closes every response (so ``regmw_finish`` has run when a call returns)."""

    def open(self, *args, **kwargs):
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


def client_at(mw, address: str = "10.0.0.1") -> Client:
    def from_address(environ, start_response):
        environ["REMOTE_ADDR"] = address
        return mw(environ, start_response)

    return BufferedClient(validator(from_address))


def old_layout(tmp_path: Path, *repositories: str) -> dict:
    for name in repositories:
        (tmp_path / "old" / "repositories" / name / "_manifests").mkdir(parents=True)
    return {"regmw": {"plugins": ["migration"]}, "storage": {"root": str(tmp_path)},
            "migration": {"old_root": "old", "new_root": "new"}}


def round_trips() -> float:
    from regmw_redis.connection import ROUND_TRIPS  # what the test measures: the redis plugin's connection

    return ROUND_TRIPS._value.get()


CHECKS: dict[str, Callable] = {}


def check(name: str):
    def register(function):
        CHECKS[name] = function
        return function
    return register


def test_readme_plugin_example_works_when_pasted():
    (source,) = python_blocks("README.md")
    plugin = as_module(source, "my_plugin")
    client = Client(validator(RegistryMiddleware(app, {}, plugins=[plugin], environ={})))
    assert client.get("/v2/", buffered=True).status_code == 200  # no repository: the example must cope
    assert client.post("/v2/_catalog", buffered=True).status_code == 201
    refused = client.put("/v2/archive/old/manifests/v1", data=b"{}", buffered=True)
    assert refused.status_code == 403
    assert refused.json["errors"][0]["code"] == "DENIED"
    served = client.get("/v2/archive/old/manifests/v1", buffered=True)
    assert served.status_code == 200 and served.headers["X-Served-Repository"] == "archive/old"


def test_every_example_has_a_check_of_what_it_does():
    assert set(examples()) == set(CHECKS)


@pytest.mark.parametrize("name", sorted(examples()))
def test_every_example_copes_with_repository_less_requests(name):
    plugin = as_module(examples()[name], name)
    config = {"quota": {"full": ["big/monorepo"]}} if name == "quota" else {}
    client = client_at(middleware(plugin, config))
    for response in (client.get("/v2/", buffered=True), client.post("/v2/_catalog", buffered=True)):
        assert response.status_code < 500, (name, response.data)
        if response.status_code >= 400:
            assert response.json["errors"][0]["code"]


@pytest.mark.parametrize("name", sorted(examples()))
def test_every_example_does_what_the_docs_say(name, request):
    CHECKS[name](as_module(examples()[name], name), request)


# --- one check per example ---------------------------------------------------------------


@check("config-section")
def _(plugin, request):
    assert build({"regmw": {"entry_points": False}}, plugins=[plugin], environ={}).config["audit"]["path"] == \
        "/var/log/regmw-audit.log"
    with pytest.raises(ConfigError, match="audit.pth"):
        build({"regmw": {"entry_points": False}, "audit": {"pth": "/tmp/x"}}, plugins=[plugin], environ={})
    for bad, message in [({"format": "xml"}, "audit.format: must be one of json, text"),
                         ({"max_bytes": -1}, "audit.max_bytes: must be at least 0"),
                         ({"rotate": True}, "audit.rotate needs audit.max_bytes > 0")]:
        with pytest.raises(ConfigError, match=message):
            build({"regmw": {"entry_points": False}, "audit": bad}, plugins=[plugin], environ={})
    assert build({"regmw": {"entry_points": False}, "audit": {"rotate": True, "max_bytes": 10}},
                 plugins=[plugin], environ={}).config["audit"]["rotate"] is True


@check("redis-connection")
def _(plugin, request):
    runtime = build({"regmw": {"entry_points": False}}, plugins=[plugin], environ={})  # redis.example.com: never dialled
    connection = runtime.services.redis
    assert type(connection).__name__ == "TeamRedis" and connection.key("a", "b") == "team:a:b"
    with_builtin = build({"regmw": {"plugins": ["redis"], "entry_points": False}}, plugins=[plugin], environ={})
    assert type(with_builtin.services.redis).__name__ == "RedisConnection"  # trylast: the built-in wins


@check("no-cache")
def _(plugin, request):
    mw = middleware(plugin, old_layout(request.getfixturevalue("tmp_path"), "group/app"))
    mw.services.cache.set("k", b"v")
    assert mw.services.cache.get("k") is None
    asked = []
    storage = mw.services.classifier.storage
    mw.services.classifier.storage = type("Counting", (), {
        "prefix_exists": lambda self, prefix: asked.append(prefix) or storage.prefix_exists(prefix)})()
    client = client_at(mw)
    for _ in range(2):
        assert client.get("/v2/group/app/manifests/latest").headers[MIGRATION_HEADER] == "old"
    assert len(asked) == 2  # nothing remembered: storage asked every time


@check("frozen-namespaces")
def _(plugin, request):
    client = client_at(middleware(plugin))
    refused = client.put("/v2/legacy/app/manifests/v1", data=b"{}")
    assert refused.status_code == 503 and refused.json["errors"][0]["code"] == "UNAVAILABLE"
    assert client.get("/v2/legacy/app/manifests/v1").status_code == 200
    assert client.put("/v2/team/app/manifests/v1", data=b"{}").status_code == 201


@check("no-pushes-on-friday")
def _(plugin, request):
    rules = {"ratelimit": {"rules": [{"by": "client", "limit": "2/hour", "methods": "read", "name": "reads"}]}}
    mw = middleware(plugin, rules)
    friday_rule = mw.services.rate_limiter.parts[-1]
    assert friday_rule.today == datetime.date.today  # the real clock by default; injected here
    friday_rule.today = lambda: FRIDAY
    client = client_at(mw)
    refused = client.put("/v2/team/app/manifests/v1", data=b"{}")
    assert refused.status_code == 429 and "friday" in refused.json["errors"][0]["message"]
    assert [client.get("/v2/team/app/manifests/latest").status_code for _ in range(3)] == [200, 200, 429]
    friday_rule.today = lambda: THURSDAY
    assert client_at(mw, "10.0.0.2").put("/v2/team/app/manifests/v1", data=b"{}").status_code == 201


@check("inventory-storage")
def _(plugin, request):
    mw = middleware(plugin, {"regmw": {"plugins": ["migration"]}, "migration": {"new_root": "new"}})
    storage = mw.services.storage
    assert storage.prefix_exists("docker/registry/v2/repositories/group/app/")
    assert not storage.prefix_exists("docker/registry/v2/repositories/group/other/")
    assert client_at(mw).get("/v2/group/app/manifests/latest").headers[MIGRATION_HEADER] == "old"
    storage.paths = None
    with pytest.raises(StorageError):
        storage.prefix_exists("docker/registry/v2/repositories/group/app/")
    unavailable = client_at(mw).get("/v2/group/other/manifests/latest")
    assert unavailable.status_code == 503 and unavailable.json["errors"][0]["code"] == "UNAVAILABLE"


@check("migrated-list")
def _(plugin, request):
    mw = middleware(plugin, {"regmw": {"plugins": ["migration"]}, "migration": {"new_root": "new"}})
    client = client_at(mw)
    assert client.get("/v2/group/app/manifests/latest").headers[MIGRATION_HEADER] == "new"
    assert client.get("/v2/team/app/manifests/latest").headers[MIGRATION_HEADER] == "old"
    mw.services.classifier.mark_migrated("team/app")
    assert client.get("/v2/team/app/manifests/latest").headers[MIGRATION_HEADER] == "new"


@check("counted-positions")
def _(plugin, request):
    config = {"regmw": {"plugins": ["dbroute"], "entry_points": False},
              "database": {"primary": "postgresql://registry@127.0.0.1:1/registry", "store": "memory",
                           "connect_timeout": 1}}
    runtime = build(config, plugins=[plugin], environ={})  # nothing listens on port 1: checks fail, routing waits
    try:
        positions = runtime.services.positions
        assert type(positions).__name__ == "CountedPositions"
        assert runtime.services.db_router.store is positions
        assert positions.advance("team/app", 100, 60) == 100 and positions.advance("team/app", 50, 60) == 100
        assert positions.recorded == 2 and positions.get("team/app").repository == 100
    finally:
        runtime.services.db_router.close()
    assert build({"regmw": {"entry_points": False}}, plugins=[plugin], environ={}).services.positions is None


@check("skip-pulls")
def _(plugin, request):
    spool_dir = request.getfixturevalue("tmp_path") / "spool"
    mw = middleware(plugin, {"regmw": {"plugins": ["notifications"]}, "notifications": {"spool_dir": str(spool_dir)}})
    sink = mw.services.events
    assert type(sink).__name__ == "SkipPulls"
    client = client_at(mw)
    assert client.put("/v2/team/app/manifests/v1", data=b"{}").status_code == 201
    assert client.get("/v2/team/app/manifests/v1").status_code == 200
    queued = sink.inner.spool.read(0, 10)  # the notifications plugin's embedded queue, behind the wrapper
    assert [json.loads(row.data)["action"] for row in queued] == ["push"]
    sink.inner.close()


def check_banner(plugin, request, redis_backend: bool):
    config = {}
    if redis_backend:
        _, url = request.getfixturevalue("redis_server")
        config = {"regmw": {"plugins": ["redis"]}, "redis": {"url": url}}
    mw = middleware(plugin, config)
    mw.services.cache.set(repository_key("team/app", "banner"), b"read-only on Sunday")
    client = client_at(mw)
    before = round_trips() if redis_backend else 0
    assert client.get("/v2/team/app/manifests/latest").headers["X-Banner"] == "read-only on Sunday"
    if redis_backend:  # read by the admission's one script call, not by a GET of its own
        assert round_trips() - before == 1
    assert "X-Banner" not in client.get("/v2/team/other/manifests/latest").headers


@check("banner-prefetch")
def _(plugin, request):
    check_banner(plugin, request, False)
    check_banner(plugin, request, True)


def check_maintenance(plugin, request, redis_backend: bool):
    """The issue's case: replacing admission as the docs showed gave 200 four times where 429s were due."""
    config = {"ratelimit": {"rules": [{"by": "client", "limit": "3/hour", "name": "three"}]}}
    if redis_backend:
        _, url = request.getfixturevalue("redis_server")
        config.update({"regmw": {"plugins": ["redis"]}, "redis": {"url": url}})
    mw = middleware(plugin, config)
    reader = client_at(mw, "10.0.0.1")
    before = round_trips() if redis_backend else 0
    assert [reader.get("/v2/team/app/manifests/latest").status_code for _ in range(4)] == [200, 200, 200, 429]
    if redis_backend:
        assert round_trips() - before == 4  # still one round trip per request
    paused = client_at(mw, "10.0.0.2").put("/v2/team/app/manifests/v1", data=b"{}")
    assert paused.status_code == 403 and paused.json["errors"][0]["code"] == "DENIED"
    assert paused.headers["Retry-After"] == "600"
    mw.services.admission.active = False
    mw.services.locks.set_read_only("team/locked", 60, owner="docs")
    writer = client_at(mw, "10.0.0.3")
    assert writer.put("/v2/team/locked/manifests/v1", data=b"{}").status_code == 503
    assert writer.put("/v2/team/app/manifests/v1", data=b"{}").status_code == 201


@check("maintenance-window")
def _(plugin, request):
    check_maintenance(plugin, request, False)
    check_maintenance(plugin, request, True)


@check("one-database")
def _(plugin, request):
    seen = Seen()
    client_at(middleware(plugin, registry=seen)).get("/v2/team/app/manifests/latest")
    assert seen.db == "postgresql://registry@db.example.com/registry"


@check("startup")
def _(plugin, request):
    capsys = request.getfixturevalue("capsys")
    middleware(plugin)
    assert capsys.readouterr().out == "regmw ready; cache backend: MemoryCache\n"


@check("cli-command")
def _(plugin, request):
    """The command exists once the configuration loads the plugin, and answers from the configured lock manager."""
    from regmw.cli import main

    monkeypatch, tmp_path = request.getfixturevalue("monkeypatch"), request.getfixturevalue("tmp_path")
    locks = types.ModuleType("docs_examples.locks")
    exec("from regmw import hookimpl\n"
         "class Locks:\n    def read_only(self, repository):\n        return repository == 'team/locked'\n"
         "@hookimpl\ndef regmw_lock_manager(config):\n    return Locks()\n", locks.__dict__)
    monkeypatch.setitem(sys.modules, "docs_examples", types.ModuleType("docs_examples"))
    monkeypatch.setitem(sys.modules, "docs_examples.cli_command", plugin)
    monkeypatch.setitem(sys.modules, "docs_examples.locks", locks)
    config = tmp_path / "regmw.toml"
    config.write_text('[regmw]\nplugins = ["docs_examples.locks", "docs_examples.cli_command"]\nentry_points = false\n')
    capsys = request.getfixturevalue("capsys")
    assert main(["is-read-only", "team/app", "-c", str(config)]) == 1
    assert capsys.readouterr().err == "regmw: team/app is writable\n"
    assert main(["-c", str(config), "is-read-only", "team/locked"]) == 0
    assert capsys.readouterr().out == "team/locked is read-only\n"
    assert main(["is-read-only", "team/app"]) == 2  # the plugin is not loaded: no such command


@check("read-only-mirrors")
def _(plugin, request):
    client = client_at(middleware(plugin))
    refused = client.put("/v2/mirror/alpine/manifests/v1", data=b"{}")
    assert refused.status_code == 403 and refused.json["errors"][0]["code"] == "DENIED"
    assert client.get("/v2/mirror/alpine/manifests/v1").status_code == 200
    assert client.put("/v2/team/app/manifests/v1", data=b"{}").status_code == 201


@check("classify-by-prefix")
def _(plugin, request):
    seen = Seen()
    client = client_at(middleware(plugin, registry=seen))
    client.get("/v2/fresh/app/manifests/latest")
    assert seen.context.migration_path == "new"
    client.get("/v2/team/app/manifests/latest")
    assert seen.context.migration_path == "old"


@check("route-by-method")
def _(plugin, request):
    seen = Seen()
    client = client_at(middleware(plugin, registry=seen))
    client.put("/v2/team/app/manifests/v1", data=b"{}")
    assert seen.db == "primary"
    client.get("/v2/team/app/manifests/v1")
    assert seen.db == "replica"


@check("repository-header")
def _(plugin, request):
    client = client_at(middleware(plugin))
    assert client.get("/v2/team/app/tags/list").headers["X-Repository"] == "team/app"
    assert "X-Repository" not in client.get("/v2/").headers


@check("audit-log")
def _(plugin, request):
    caplog = request.getfixturevalue("caplog")
    with caplog.at_level(logging.INFO, logger="audit"):
        client_at(middleware(plugin)).get("/v2/team/app/manifests/latest")
    assert [record.getMessage() for record in caplog.records if record.name == "audit"] == ["GET team/app -> 200"]


@check("quota")
def _(plugin, request):
    client = client_at(middleware(plugin, {"quota": {"full": ["big/monorepo"]}}))
    refused = client.put("/v2/big/monorepo/manifests/latest", data=b"{}")
    assert refused.status_code == 403 and refused.json["errors"][0]["code"] == "DENIED"
    assert refused.json["errors"][0]["detail"] == {"name": "big/monorepo"}
    assert client.get("/v2/big/monorepo/manifests/latest").status_code == 200
    assert client.put("/v2/small/app/manifests/latest", data=b"{}").status_code == 201
    for raw, message in [({"ful": []}, "unknown key quota.ful"), ({"full": 3}, "quota.full: must be a list of strings")]:
        with pytest.raises(ConfigError, match=message):
            build({"regmw": {"entry_points": False}, "quota": raw}, plugins=[plugin], environ={})


@check("periodic-job")
def _(plugin, request):
    import threading

    from regmw.jobs import PeriodicRunner, collect_jobs

    runtime = build({"regmw": {"entry_points": False}}, plugins=[plugin], environ={})
    runtime.services.cache.set("a", b"1")
    job = collect_jobs(runtime.config, runtime.pm)["sweep-cache"]
    assert job.every == 600 and job.instances == 1
    assert PeriodicRunner(runtime.services, [job], threading.Event()).run_once(job)
    assert runtime.services.cache.get("a") is None


@check("batched-migration")
def _(plugin, request):
    from regmw.batched import collect_migrations

    runtime = build({"regmw": {"entry_points": False}}, plugins=[plugin], environ={})
    migration = collect_migrations(runtime.config, runtime.pm)["backfill-manifest-size"]
    assert (migration.table, migration.key, migration.batch_size) == ("manifests", "id", 10_000)

    class Connection:
        def execute(self, statement, params):
            self.seen = (str(statement), params)

    connection = Connection()
    migration.run(connection, 1, 10_001)
    assert "UPDATE manifests" in connection.seen[0] and connection.seen[1] == {"start": 1, "stop": 10_001}


@check("counted-jobs")
def _(plugin, request):
    tmp = request.getfixturevalue("tmp_path")
    runtime = build({"regmw": {"plugins": ["migration"], "entry_points": False}, "migration": {"new_root": "new"},
                     "jobs": {"queue_path": str(tmp / "jobs.sqlite3")}}, plugins=[plugin], environ={})
    queue = runtime.services.jobs
    assert type(queue).__name__ == "CountedQueue"
    queue.enqueue("migrate-repository", repository="team/app")
    assert queue.enqueued == 1 and [r.state for r in queue.status("migrate-repository")] == ["queued"]



class ProviderOrder:
    """Wraps every provider hook (and regmw_startup), recording the order start-up calls them in."""

    def __init__(self):
        self.called = []

    def _record(self, name):
        self.called.append(name)
        return (yield)

    @hookimpl(wrapper=True)
    def regmw_redis(self, config):
        return (yield from self._record("regmw_redis"))

    @hookimpl(wrapper=True)
    def regmw_cache(self, config, services):
        return (yield from self._record("regmw_cache"))

    @hookimpl(wrapper=True)
    def regmw_lock_manager(self, config, services):
        return (yield from self._record("regmw_lock_manager"))

    @hookimpl(wrapper=True)
    def regmw_rate_limiter(self, config, services):
        return (yield from self._record("regmw_rate_limiter"))

    @hookimpl(wrapper=True)
    def regmw_storage(self, config, services):
        return (yield from self._record("regmw_storage"))

    @hookimpl(wrapper=True)
    def regmw_classifier(self, config, services):
        return (yield from self._record("regmw_classifier"))

    @hookimpl(wrapper=True)
    def regmw_position_store(self, config, services):
        return (yield from self._record("regmw_position_store"))

    @hookimpl(wrapper=True)
    def regmw_event_sink(self, config, services):
        return (yield from self._record("regmw_event_sink"))

    @hookimpl(wrapper=True)
    def regmw_job_queue(self, config, services):
        return (yield from self._record("regmw_job_queue"))

    @hookimpl(wrapper=True)
    def regmw_prefetch(self, config, services):
        return (yield from self._record("regmw_prefetch"))

    @hookimpl(wrapper=True)
    def regmw_admission(self, config, services):
        return (yield from self._record("regmw_admission"))

    @hookimpl(wrapper=True)
    def regmw_db_router(self, config, services):
        return (yield from self._record("regmw_db_router"))

    @hookimpl(wrapper=True)
    def regmw_startup(self, services):
        return (yield from self._record("regmw_startup"))


@pytest.mark.parametrize("doc", ["docs/hooks.md", "docs/architecture.md"])
def test_the_documented_provider_order_is_the_order_start_up_calls_them(doc):
    """hooks.md and architecture.md draw the provider order a plugin relies on (each provider sees in
    `services` what the ones before it built): it is the order start-up calls them in."""
    recorder = ProviderOrder()
    build({}, environ={}, plugins=[recorder])
    diagram = next(block for block in re.findall(r"```\n(.*?)```", Path(doc).read_text(), re.DOTALL)
                   if "regmw_redis →" in block)
    documented = [name for name in re.findall(r"regmw_\w+", diagram) if name != "regmw_config_sections"]
    assert documented == recorder.called
