"""A write's success is confirmed before the client hears it (``[readonly] confirm_writes``).

docs/migration-workflow.md: a migration locks the repository, waits ``drain``,
copies, verifies, marks it new and unlocks. A write admitted before the lock
and slower than all of that lands on the old side after the copy; if the client
were told 201 it would be lost. These tests run that interleaving exactly: the
app itself (the registry, mid-write) lets the migration step happen before it
answers. In process (werkzeug's client), embedded defaults, filesystem storage.
"""
from __future__ import annotations

import os

import pytest
from werkzeug.test import Client

from regmw import RegistryMiddleware, metrics
from tests.servers.redis_server import redis_server  # noqa: F401 - a fixture

REPOSITORY = "group/app"
MANIFEST = f"/v2/{REPOSITORY}/manifests/v1"


def middleware(tmp_path, during_write, redis_url=None, namespace="regmw", **readonly):
    os.makedirs(tmp_path / "old" / "repositories" / REPOSITORY / "_manifests")  # an old repository
    config = {"regmw": {"plugins": ["migration"] + (["redis"] if redis_url else []), "entry_points": False},
              "storage": {"root": str(tmp_path)},
              "migration": {"old_root": "old", "new_root": "new"}, "readonly": readonly}
    if redis_url:
        config["redis"] = {"url": redis_url, "namespace": namespace}
    holder = {}

    def registry(environ, start_response):
        if environ["REQUEST_METHOD"] in ("PUT", "DELETE"):
            during_write(holder["services"])  # the write is under way: the migration moves on meanwhile
        start_response("201 Created" if environ["REQUEST_METHOD"] == "PUT" else "202 Accepted",
                       [("Content-Type", "text/plain")])
        return [b"stored"]

    app = RegistryMiddleware(registry, config, environ={})
    holder["services"] = app.services
    return Client(app)


def migrate(services) -> None:
    services.classifier.mark_migrated(REPOSITORY)


def lock(services) -> None:
    services.locks.set_read_only(REPOSITORY, 30, "migration:test")


def nothing(services) -> None:
    pass


def refused_because(response, what: str) -> bool:
    error = response.json["errors"][0]
    return (response.status_code == 503 and error["code"] == "UNAVAILABLE" and what in error["message"]
            and error["detail"] == {"name": REPOSITORY} and "Retry-After" in response.headers)


def test_a_write_that_finishes_after_its_repository_migrated_is_not_acknowledged(tmp_path):
    client = middleware(tmp_path, migrate)
    response = client.put(MANIFEST, data=b"{}")
    assert refused_because(response, "moved (old -> new)") and response.data != b"stored"
    # the client's retry is classified new, and acknowledged
    retry = client.put(MANIFEST, data=b"{}")
    assert retry.status_code == 201 and retry.headers["Regmw-Migration-Path"] == "new"


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
def test_a_write_that_finishes_while_its_repository_is_locked_is_not_acknowledged(tmp_path, method):
    client = middleware(tmp_path, lock)
    response = client.open(MANIFEST, method=method, data=b"{}")
    assert refused_because(response, "became read-only")


def test_an_undisturbed_write_is_acknowledged_and_classified_once(tmp_path):
    client = middleware(tmp_path, nothing)
    before = metrics.REGISTRY.get_sample_value("regmw_classifications_total", {"path": "old", "source": "cache"}) or 0
    assert client.put(MANIFEST, data=b"{}").status_code == 201
    assert client.put(MANIFEST, data=b"{}").status_code == 201  # the second from the cache
    after = metrics.REGISTRY.get_sample_value("regmw_classifications_total", {"path": "old", "source": "cache"}) or 0
    assert after - before == 1  # the confirmation's own look-up is not counted as a classification


def test_with_confirm_writes_off_the_success_goes_out_as_the_app_said(tmp_path):
    client = middleware(tmp_path, migrate, confirm_writes=False)
    assert client.put(MANIFEST, data=b"{}").status_code == 201


def test_on_redis_the_lock_and_the_mark_are_read_again_not_the_admissions_prefetch(tmp_path, redis_server):  # noqa: F811
    """The redis plugin's admission reads the lock and the classification in its one round trip; the
    confirmation must ask again (a migration or a lock that came meanwhile is visible only there)."""
    _, url = redis_server
    migrated = middleware(tmp_path / "a", migrate, url, namespace="a")
    assert refused_because(migrated.put(MANIFEST, data=b"{}"), "moved (old -> new)")
    locked = middleware(tmp_path / "b", lock, url, namespace="b")
    assert refused_because(locked.put(MANIFEST, data=b"{}"), "became read-only")
