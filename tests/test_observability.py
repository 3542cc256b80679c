"""Metrics, refusal reasons, the access log, health and ready, in-process through the real middleware.

The same flows as real processes (gunicorn workers, docker-registry, a Redis
that goes down) are in tests/test_server.py.
"""
from __future__ import annotations

import json
import logging

import pytest
from werkzeug.test import Client

from regmw import RegistryMiddleware, StorageError, hookimpl, metrics
from regmw.errors import unavailable


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


class Buffered(Client):
    """The test client, closing each response body at once (so regmw_finish and the metrics run)."""

    def open(self, *args, **kwargs):
        kwargs.setdefault("buffered", True)
        return super().open(*args, **kwargs)


def make(config=None, plugins=(), **kwargs) -> Client:
    base = {"regmw": {"entry_points": False}}
    for section, values in (config or {}).items():
        base.setdefault(section, {}).update(values)
    return Buffered(RegistryMiddleware(app, base, plugins=plugins, environ={}, **kwargs))


class BrokenStorage:
    """A storage that cannot answer: classification must refuse with 503, never guess."""

    def prefix_exists(self, prefix):
        raise StorageError("bucket unreachable")

    def stat(self, path):
        raise StorageError("bucket unreachable")

    def ready(self):
        raise StorageError("bucket unreachable")


class BrokenStoragePlugin:
    @hookimpl
    def regmw_storage(self, config):
        return BrokenStorage()


def test_refusals_counted_by_reason():
    limited = make({"ratelimit": {"rules": [{"by": "client", "limit": "1/minute"}]}})
    before = {reason: sample("regmw_refusals_total", reason=reason)
              for reason in ("rate_limit", "read_only", "invalid", "storage_unavailable")}
    limited.get("/v2/a/tags/list")
    assert limited.get("/v2/a/tags/list").status_code == 429

    locked = RegistryMiddleware(app, {"regmw": {"entry_points": False}}, environ={})
    locked.services.locks.set_read_only("team/app", 60, "test")
    assert Buffered(locked).put("/v2/team/app/manifests/v1", data=b"{}").status_code == 503

    assert make().get("/v2/Bad..Name/tags/list").status_code == 400

    broken = make({"regmw": {"plugins": ["migration"]}, "migration": {"new_root": "new"}}, plugins=[BrokenStoragePlugin()])
    answer = broken.get("/v2/team/app/manifests/v1")
    assert answer.status_code == 503 and answer.json["errors"][0]["code"] == "UNAVAILABLE"

    for reason in before:
        assert sample("regmw_refusals_total", reason=reason) == before[reason] + 1, reason


def test_request_duration_by_resource_method_status_class_and_path(tmp_path):
    (tmp_path / "docker/registry/v2/repositories/team/old/_layers").mkdir(parents=True)  # an own entry
    (tmp_path / "docker/registry/v2/repositories/team/old/_layers/x").write_text("x")
    client = make({"regmw": {"plugins": ["migration"]}, "migration": {"new_root": "new"}, "storage": {"root": str(tmp_path)}})
    labels = {"resource": "manifests", "method": "GET", "status": "2xx", "path": "old"}
    before = sample("regmw_request_duration_seconds_count", **labels)
    hits, misses = sample("regmw_classification_cache_total", result="hit"), sample(
        "regmw_classification_cache_total", result="miss")
    for _ in range(3):
        assert client.get("/v2/team/old/manifests/v1").status_code == 200
    assert sample("regmw_request_duration_seconds_count", **labels) == before + 3
    # first look-up asks storage, the next two are answered by the cache
    assert sample("regmw_classification_cache_total", result="miss") == misses + 1
    assert sample("regmw_classification_cache_total", result="hit") == hits + 2
    assert sample("regmw_storage_request_duration_seconds_count", driver="filesystem", operation="prefix_exists",
                  outcome="ok") >= 1
    before_none = sample("regmw_request_duration_seconds_count", resource="base", method="GET", status="2xx",
                         path="none")
    client.get("/v2/")
    assert sample("regmw_request_duration_seconds_count", resource="base", method="GET", status="2xx",
                  path="none") == before_none + 1


class Route:
    role, reason = "replica", "caught-up"


class RoutePlugin:
    @hookimpl
    def regmw_route_db(self, context):
        return Route()


def access_lines(caplog) -> list[dict]:
    return [json.loads(record.getMessage()) for record in caplog.records if record.name == "regmw.access"]


def test_access_log_line_carries_the_decisions(tmp_path, caplog):
    (tmp_path / "docker/registry/v2/repositories/team/old/_layers").mkdir(parents=True)  # an own entry
    (tmp_path / "docker/registry/v2/repositories/team/old/_layers/x").write_text("x")
    client = make({"regmw": {"plugins": ["migration"]}, "migration": {"new_root": "new"}, "storage": {"root": str(tmp_path)},
                   "ratelimit": {"rules": [{"by": "client", "limit": "10/minute"}]}}, plugins=[RoutePlugin()])
    with caplog.at_level(logging.INFO, logger="regmw.access"):
        response = client.get("/v2/team/old/manifests/v1", headers={"X-Request-Id": "abc-123"},
                              environ_overrides={"REMOTE_ADDR": "192.0.2.7"})
        weird = client.get("/v2/", headers={"X-Request-Id": "no spaces or <tags>"})
    assert response.headers["X-Request-Id"] == "abc-123"
    generated = weird.headers["X-Request-Id"]
    assert len(generated) == 32 and generated != "no spaces or <tags>"
    first, second = access_lines(caplog)
    assert first["request_id"] == "abc-123" and first["client"] == "192.0.2.7"
    assert first["method"] == "GET" and first["path"] == "/v2/team/old/manifests/v1" and first["status"] == 200
    assert first["repository"] == "team/old" and first["resource"] == "manifests"
    assert first["migration_path"] == "old" and first["classified_by"] == "storage"
    assert first["ratelimit_remaining"] == 9 and first["db"] == "replica:caught-up" and first["refusal"] is None
    assert second["request_id"] == generated and second["resource"] == "base"


def test_access_log_can_be_turned_off(caplog):
    client = make({"serve": {"access_log": False}})
    with caplog.at_level(logging.INFO, logger="regmw.access"):
        client.get("/v2/")
    assert access_lines(caplog) == []


def test_health_and_ready_in_process():
    healthy = make()
    response = healthy.get("/-/regmw/health")
    assert response.status_code == 200 and response.json == {"status": "ok"}
    ready = healthy.get("/-/regmw/ready")  # embedded defaults: nothing that can be unreachable
    assert ready.status_code == 200 and ready.json == {"status": "ready", "checks": {}}

    broken = make({"regmw": {"plugins": ["migration"]}, "migration": {"new_root": "new"}}, plugins=[BrokenStoragePlugin()]).get("/-/regmw/ready")
    assert broken.status_code == 503 and broken.json["status"] == "not ready"
    assert broken.json["checks"]["storage"] == {
        "ok": False, "ms": broken.json["checks"]["storage"]["ms"], "error": "StorageError: bucket unreachable"}


@pytest.mark.parametrize("separate_upstream", [True, False])
def test_ready_asks_every_gateway_upstream_once(separate_upstream):
    """docs/operations.md: ready asks each gateway upstream, ``upstream`` too when it is set next to old/new."""
    from regmw.runtime import build
    from regmw.serve import make_application
    from tests.servers._util import free_port

    closed = {name: f"http://127.0.0.1:{free_port()}" for name in ("upstream", "old_upstream", "new_upstream")}
    if not separate_upstream:
        del closed["upstream"]
    runtime = build(config={"regmw": {"entry_points": False}, "gateway": closed}, environ={})
    response = Client(make_application(runtime)).get("/-/regmw/ready")
    checks = response.json["checks"]
    expected = {"upstream_old", "upstream_new"} | ({"upstream"} if separate_upstream else set())
    assert response.status_code == 503 and set(checks) == expected  # the old one is not asked twice
    assert all("ConnectionRefusedError" in check["error"] for check in checks.values())


@pytest.mark.parametrize("reason,expected", [(None, "admission"), ("quota", "quota")])
def test_a_plugin_refusal_is_counted_under_its_reason_or_the_step(reason, expected):
    class Quota:
        @hookimpl
        def regmw_admit(self, context):
            refusal = unavailable("over quota", 5)
            refusal.reason = reason
            return refusal

    before = sample("regmw_refusals_total", reason=expected)
    assert make(plugins=[Quota()]).get("/v2/a/tags/list").status_code == 503
    assert sample("regmw_refusals_total", reason=expected) == before + 1


@pytest.mark.services
def test_ready_asks_gcs_and_storage_latency_is_timed(gcs_emulator):
    config = {"regmw": {"plugins": ["gcs", "migration"]}, "migration": {"new_root": "new"},
              "gcs": gcs_emulator.gcs_section()}
    client = make(config)
    answer = client.get("/-/regmw/ready")
    assert answer.status_code == 200 and answer.json["checks"]["storage"]["ok"]
    before = sample("regmw_storage_request_duration_seconds_count", driver="gcs", operation="prefix_exists",
                    outcome="ok")
    assert client.get("/v2/team/fresh/manifests/v1").status_code == 200  # absent: both prefixes asked
    assert sample("regmw_storage_request_duration_seconds_count", driver="gcs", operation="prefix_exists",
                  outcome="ok") == before + 2

    missing = make({**config, "gcs": gcs_emulator.gcs_section(bucket="no-such-bucket")})
    answer = missing.get("/-/regmw/ready")
    assert answer.status_code == 503 and "no-such-bucket" in answer.json["checks"]["storage"]["error"]
    failed = sample("regmw_storage_request_duration_seconds_count", driver="gcs", operation="prefix_exists",
                    outcome="error")
    assert missing.get("/v2/team/fresh/manifests/v1").status_code == 503
    assert sample("regmw_storage_request_duration_seconds_count", driver="gcs", operation="prefix_exists",
                  outcome="error") == failed + 1


@pytest.mark.services
def test_ready_names_a_database_primary_that_is_down(pg_cluster):
    from tests.test_dbroute import db_config

    middleware = RegistryMiddleware(app, db_config(pg_cluster), environ={})
    client = Buffered(middleware)
    try:
        answer = client.get("/-/regmw/ready")
        assert answer.status_code == 200 and answer.json["checks"]["database"]["ok"], answer.json
        pg_cluster.stop_primary()
        answer = client.get("/-/regmw/ready")
        assert answer.status_code == 503 and not answer.json["checks"]["database"]["ok"]
        assert answer.json["checks"]["database"]["error"]
    finally:
        middleware.services.db_router.close()


def test_generated_request_ids_differ_across_forked_workers():
    """Ids come from Python's generator (no syscall); forked workers must not repeat each other's."""
    import os

    from regmw.accesslog import request_id

    request_id(None)  # the parent has drawn from the generator before forking, as a preloaded master may
    readers = []
    for _ in range(3):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # a worker: write its first three ids and leave at once
            os.close(read_end)
            os.write(write_end, " ".join(request_id(None) for _ in range(3)).encode())
            os._exit(0)
        os.close(write_end)
        readers.append((pid, read_end))
    ids = []
    for pid, read_end in readers:
        with os.fdopen(read_end) as handle:
            ids += handle.read().split()
        os.waitpid(pid, 0)
    assert len(ids) == 9 and len(set(ids)) == 9
    assert all(len(value) == 32 and int(value, 16) >= 0 for value in ids)
    assert request_id("client-id-1") == "client-id-1" and request_id("bad id\n") != "bad id\n"
