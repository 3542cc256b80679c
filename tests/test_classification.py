"""Old/new classification through the real middleware, the GCS emulator and real JWTs.

Every storage request counted here is a real HTTP request the google-cloud-storage
client sent to the in-process emulator.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from types import SimpleNamespace

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from regmw_migration import HEADER, mark_migrated
from werkzeug.test import Client

import regmw
from regmw import RegistryMiddleware, hookimpl, metrics, repository_key
from regmw.defaults.memory_cache import MemoryCache
from regmw.errors import ConfigError
from tests.servers._util import free_port
from tests.servers.gcs_emulator import count_requests

OLD_ROOT = "docker/registry/v2"
NEW_ROOT = "gitlab/docker/registry/v2"
ISSUER, AUDIENCE = "test-token-service", "test-registry"


# --- real tokens -------------------------------------------------------------


def _keypair():
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return private, public


SIGNER, PUBLIC_KEY = _keypair()
FORGER, _ = _keypair()


def token(*access: dict, key=SIGNER, algorithm="RS256", expires_in=300, **claims) -> str:
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": int(time.time()) + expires_in,
               "access": list(access), **claims}
    return jwt.encode(payload, key, algorithm=algorithm)


def grant(name: str, eligible=None, actions=("pull", "push")) -> dict:
    entry = {"type": "repository", "name": name, "actions": list(actions)}
    if eligible is not None:
        entry["migration_eligible"] = eligible
    return entry


def bearer(value: str) -> dict:
    return {"Authorization": f"Bearer {value}"}


# --- apps and middleware ------------------------------------------------------


def named_app(name: str):
    def app(environ, start_response):
        context = environ["regmw.context"]
        start_response("200 OK", [("X-App", name), ("X-Path", str(context.migration_path))])
        return [name.encode()]
    return app


def repo_objects(root: str, name: str) -> list[str]:
    base = f"{root}/repositories/{name}"
    return [f"{base}/_layers/sha256/aa/link", f"{base}/_manifests/tags/latest/current/link"]


class RecordingCache(MemoryCache):
    """The embedded cache, recording calls (a real cache: values and TTLs behave)."""

    def __init__(self):
        super().__init__()
        self.gets: list[str] = []
        self.sets: list[tuple[str, bytes, float | None]] = []
        self.adds: list[tuple[str, bytes, float | None]] = []

    def get(self, key):
        self.gets.append(key)
        return super().get(key)

    def set(self, key, value, ttl=None):
        self.sets.append((key, value, ttl))
        super().set(key, value, ttl)

    def add(self, key, value, ttl=None):
        self.adds.append((key, value, ttl))
        return super().add(key, value, ttl)


class RecordingCachePlugin:
    def __init__(self):
        self.cache = RecordingCache()

    @hookimpl
    def regmw_cache(self, config):
        return self.cache


def config_for(emulator, **migration) -> dict:
    return {
        "regmw": {"plugins": ["gcs", "migration"], "entry_points": False},
        "gcs": emulator.gcs_section(),
        "auth": {"key": PUBLIC_KEY, "algorithms": ["RS256"], "issuer": ISSUER, "audience": AUDIENCE},
        "migration": {"new_root": NEW_ROOT, **migration},
    }


class Harness:
    def __init__(self, emulator, plugins=(), apps=True, **migration):
        self.cache_plugin = RecordingCachePlugin()
        self.mw = RegistryMiddleware(
            named_app("main"),
            config_for(emulator, **migration),
            apps={"old": named_app("old"), "new": named_app("new")} if apps else None,
            plugins=[self.cache_plugin, *plugins],
            environ={},
        )
        self.services = self.mw.services
        self.cache = self.cache_plugin.cache
        self.classifier = self.services.classifier
        self.requests = count_requests(self.services.storage.client) if hasattr(self.services.storage, "client") else None
        self.client = Client(self.mw)

    def get(self, repository: str, headers=None, **kwargs):
        return self.client.get(f"/v2/{repository}/manifests/latest", headers=headers or {}, **kwargs)


@pytest.fixture
def layout(gcs_emulator):
    """Repositories under the old prefix, the new prefix, both, and foo/foobar neighbours."""
    gcs_emulator.put(
        *repo_objects(OLD_ROOT, "group/legacy"),
        *repo_objects(NEW_ROOT, "group/migrated"),
        *repo_objects(OLD_ROOT, "group/both"), *repo_objects(NEW_ROOT, "group/both"),
        *repo_objects(OLD_ROOT, "group/foobar"),
    )
    return gcs_emulator


@pytest.fixture
def harness(layout):
    return Harness(layout)


def assert_routed(response, path: str) -> None:
    assert response.status_code == 200, response.data
    assert response.headers["X-App"] == path
    assert response.headers["X-Path"] == path
    assert response.headers[HEADER] == path


# --- the decision, branch by branch -------------------------------------------


@pytest.mark.parametrize(
    ("repository", "access", "expected", "storage_requests"),
    [
        ("group/legacy", [grant("group/legacy", True)], "old", 1),     # old prefix wins over the flag
        ("group/both", [], "old", 1),                                  # old prefix wins over the new prefix
        ("group/fresh", [grant("group/fresh", True)], "new", 1),       # flag true
        ("group/fresh", [grant("group/fresh", False)], "old", 2),      # flag false, not under new
        ("group/migrated", [grant("group/migrated", False)], "new", 2),  # new is permanent: beats a false flag
        ("group/migrated", [grant("group/migrated")], "new", 2),       # no flag, exists under new
        ("group/fresh", [grant("group/fresh")], "old", 2),             # no flag, nowhere
        ("group/foo", [], "old", 2),                                   # foobar under old does not make foo old
        ("group/fresh", [grant("group/other", True)], "old", 2),       # another repository's flag
        ("group/fresh", [grant("group/fresh", "true")], "old", 2),     # not a boolean: no flag
    ],
    ids=["old-prefix", "old-and-new", "flag-true", "flag-false", "flag-false-new-prefix", "no-flag-new-prefix",
         "no-flag-nowhere", "foo-vs-foobar", "other-repository-flag", "non-boolean-flag"],
)
def test_decision_with_a_verified_token(harness, repository, access, expected, storage_requests):
    response = harness.get(repository, bearer(token(*access)))
    assert_routed(response, expected)
    assert harness.requests.count == storage_requests


def test_cached_new_wins_over_a_false_flag_without_storage_requests(harness):
    """A repository known new (cached, or marked migrated) stays new whatever a token says."""
    assert_routed(harness.get("group/migrated"), "new")
    mark_migrated(harness.services, "group/marked")  # new by mark, nothing in storage
    harness.requests.reset()
    before = classified("new", "cache"), classified("new", "token")
    for repository in ("group/migrated", "group/marked"):
        for flag in (False, True):  # known new: the cache decided, whatever the flag
            response = harness.get(repository, bearer(token(grant(repository, flag))))
            assert_routed(response, "new")
    assert harness.requests.count == 0
    assert (classified("new", "cache") - before[0], classified("new", "token") - before[1]) == (4, 0)


def test_cold_new_prefix_wins_over_a_false_flag(harness):
    """Not cached: a false flag costs one extra prefix check, which finds the repository under new."""
    false_flag = bearer(token(grant("group/migrated", False)))
    assert_routed(harness.get("group/migrated", false_flag), "new")
    assert harness.requests.count == 2  # old prefix, then new prefix
    key = repository_key("group/migrated", "migration")
    assert (key, b"new", 0) in harness.cache.sets  # cached as permanent
    harness.requests.reset()
    assert_routed(harness.get("group/migrated", false_flag), "new")
    assert harness.requests.count == 0


def test_no_token_is_no_flag(harness):
    assert_routed(harness.get("group/migrated"), "new")
    assert_routed(harness.get("group/fresh"), "old")


@pytest.mark.parametrize(
    "bad_token",
    [
        pytest.param(lambda: token(grant("group/fresh", True), expires_in=-60), id="expired"),
        pytest.param(lambda: token(grant("group/fresh", True), key=FORGER), id="wrongly-signed"),
        pytest.param(lambda: token(grant("group/fresh", True), key=None, algorithm="none"), id="unsigned-alg-none"),
        pytest.param(lambda: token(grant("group/fresh", True), iss="someone-else"), id="wrong-issuer"),
        pytest.param(lambda: token(grant("group/fresh", True), aud="another-registry"), id="wrong-audience"),
        pytest.param(lambda: token(grant("group/fresh", True))[:-8] + "AAAAAAAA", id="tampered"),
        pytest.param(lambda: "not.a.jwt", id="malformed"),
    ],
)
def test_unverified_tokens_count_as_no_flag(harness, bad_token, caplog):
    """The same flag that routes to new in a verified token is ignored, and logged, in any other."""
    assert_routed(harness.get("group/fresh", bearer(token(grant("group/fresh", True)))), "new")
    with caplog.at_level(logging.DEBUG, logger="regmw.tokens"):  # WARNING at most once a second, else DEBUG
        response = harness.get("group/fresh", bearer(bad_token()))
    assert_routed(response, "old")  # no flag, not under the new prefix
    assert any("does not verify" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("method", "access", "expected"),
    [
        ("GET", 5, "old"),  # access not a list: no entries, no flag
        ("GET", {"type": "repository", "name": "group/fresh", "migration_eligible": True}, "old"),
        # actions not a list grants no push; the repository's entry still counts, as a pull-only one does
        ("PUT", [{"type": "repository", "name": "group/fresh", "actions": 5, "migration_eligible": True}], "new"),
    ],
    ids=["access-int", "access-dict", "actions-int"],
)
def test_a_verified_token_with_a_malformed_access_claim_is_never_a_500(harness, method, access, expected):
    """A token that verifies but whose issuer wrote an odd ``access`` is read as far as it makes sense."""
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "exp": int(time.time()) + 300, "access": access}
    response = harness.client.open("/v2/group/fresh/manifests/latest", method=method,
                                   headers=bearer(jwt.encode(payload, SIGNER, algorithm="RS256")))
    assert_routed(response, expected)


# --- cache ---------------------------------------------------------------------


def test_cache_hit_makes_no_storage_request(harness):
    key_old, key_new = repository_key("group/legacy", "migration"), repository_key("group/migrated", "migration")
    assert_routed(harness.get("group/legacy"), "old")
    assert_routed(harness.get("group/migrated"), "new")
    assert harness.requests.count == 3
    assert (key_old, b"old", 300.0) in harness.cache.adds  # "old" expires (and is added only if absent)
    assert (key_new, b"new", 0) in harness.cache.sets     # "new" is permanent (0: no expiry)

    harness.requests.reset()
    for _ in range(5):
        assert_routed(harness.get("group/legacy"), "old")
        assert_routed(harness.get("group/migrated", bearer(token(grant("group/migrated", True)))), "new")
    assert harness.requests.count == 0


def test_cached_old_skips_the_token(harness):
    assert_routed(harness.get("group/legacy"), "old")
    harness.requests.reset()
    assert_routed(harness.get("group/legacy", bearer(token(grant("group/legacy", True)))), "old")
    assert harness.requests.count == 0


def test_absence_is_never_cached(harness, layout):
    assert_routed(harness.get("group/later"), "old")
    assert harness.requests.count == 2
    layout.put(*repo_objects(NEW_ROOT, "group/later"))  # created under new in the meantime
    harness.requests.reset()
    assert_routed(harness.get("group/later"), "new")
    assert harness.requests.count == 2
    assert not [s for s in harness.cache.sets + harness.cache.adds if s[1] not in (b"old", b"new")]


def test_old_ttl_is_configurable(layout):
    h = Harness(layout, old_ttl=42, new_ttl=7)
    h.get("group/legacy")
    h.get("group/migrated")
    assert [s[2] for s in h.cache.adds + h.cache.sets] == [42.0, 7.0]


def test_cache_outage_falls_through_to_storage(layout, caplog, monkeypatch):
    class BrokenCache:
        def get(self, key):
            raise ConnectionError("cache down")

        def set(self, key, value, ttl=None):
            raise ConnectionError("cache down")

        def add(self, key, value, ttl=None):
            raise ConnectionError("cache down")

        def delete(self, key):
            raise ConnectionError("cache down")

    class Plugin:
        @hookimpl
        def regmw_cache(self, config):
            return BrokenCache()

    h = Harness(layout, plugins=[Plugin()])
    frozen_log_clock(monkeypatch)
    with caplog.at_level(logging.DEBUG, logger="regmw.migration"):
        for _ in range(3):
            assert_routed(h.get("group/legacy"), "old")
            assert_routed(h.get("group/migrated"), "new")
    assert len(warnings_of(caplog, "regmw.migration")) == 1  # 12 cache failures, one WARNING a second


# --- prefetch by an admission -------------------------------------------------


class PrefetchingAdmission:
    """What a one-round-trip admission does: read every prefetch key with its own call."""

    def __init__(self, values: dict):
        self.values = values
        self.keys_seen = []

    @hookimpl
    def regmw_admit(self, context):
        for key_of in context.services.prefetch:
            key = key_of(context)
            if key is not None:
                self.keys_seen.append(key)
                context.prefetched[key] = self.values.get(key)
        return None


def test_prefetched_value_is_used_without_asking_the_cache(layout):
    key = repository_key("group/fresh", "migration")
    admission = PrefetchingAdmission({key: b"new"})
    h = Harness(layout, plugins=[admission])
    assert_routed(h.get("group/fresh"), "new")  # nothing in storage says new: the prefetched value did
    assert admission.keys_seen == [key]
    assert key not in h.cache.gets
    assert h.requests.count == 0


def test_prefetched_miss_is_not_asked_again(layout):
    admission = PrefetchingAdmission({})
    h = Harness(layout, plugins=[admission])
    assert_routed(h.get("group/legacy"), "old")
    assert h.cache.gets == []  # None in context.prefetched is a known miss
    assert h.requests.count == 1


# --- coalescing -------------------------------------------------------------------


def test_fifty_concurrent_lookups_share_one_storage_request(harness):
    repository, clients = "group/legacy", 50
    storage = harness.services.storage
    real_prefix_exists = storage.prefix_exists
    release = threading.Event()
    probes = []

    def gated(prefix):
        probes.append(prefix)
        assert release.wait(30), "test gate never opened"
        return real_prefix_exists(prefix)

    storage.prefix_exists = gated
    start = threading.Barrier(clients + 1)
    results: list = [None] * clients

    def worker(index):
        client = Client(harness.mw)
        start.wait(30)
        response = client.get(f"/v2/{repository}/manifests/latest")
        results[index] = (response.status_code, response.headers.get("X-App"))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    start.wait(30)
    # every other request is now waiting on the leader's look-up, which is held at the gate
    assert harness.classifier.flights.wait_for_waiters(("old", repository), clients - 1, timeout=10)
    release.set()
    for thread in threads:
        thread.join(30)
    assert results == [(200, "old")] * clients
    assert len(probes) == 1
    assert harness.requests.count == 1
    assert harness.classifier.flights.in_flight() == 0


# --- storage failure ----------------------------------------------------------------


def assert_unavailable(response, retry_after: str, repository: str) -> None:
    assert response.status_code == 503
    assert response.headers["Retry-After"] == retry_after
    body = json.loads(response.data)
    assert body["errors"][0]["code"] == "UNAVAILABLE"
    assert body["errors"][0]["detail"] == {"name": repository}
    assert "X-App" not in response.headers and HEADER not in response.headers


def frozen_log_clock(monkeypatch) -> None:
    """Stop the clock of the once-a-second backend warnings (at a time no earlier warning used)."""
    now = time.monotonic() + 10_000
    monkeypatch.setattr(metrics, "time", SimpleNamespace(monotonic=lambda: now, perf_counter=time.perf_counter))


def warnings_of(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= logging.WARNING]


def test_storage_down_is_503_never_a_guess(own_gcs_emulator, caplog, monkeypatch):
    own_gcs_emulator.put(*repo_objects(OLD_ROOT, "group/legacy"))
    h = Harness(own_gcs_emulator, retry_after=17)
    assert_routed(h.get("group/legacy"), "old")  # cached before the outage
    before = metrics.REGISTRY.get_sample_value(
        "regmw_backend_errors_total", {"backend": "storage", "action": "unavailable"}) or 0
    own_gcs_emulator.stop()
    frozen_log_clock(monkeypatch)
    with caplog.at_level(logging.DEBUG, logger="regmw.migration"):
        for access in ([], [grant("group/fresh", True)], [grant("group/fresh", False)]):
            assert_unavailable(h.get("group/fresh", bearer(token(*access))), "17", "group/fresh")
    assert metrics.REGISTRY.get_sample_value(
        "regmw_backend_errors_total", {"backend": "storage", "action": "unavailable"}) == before + 3
    # every refusal counted, but a client cannot flood the log: one WARNING a second, the rest at DEBUG
    assert len(warnings_of(caplog, "regmw.migration")) == 1
    assert sum("cannot classify group/fresh" in r.getMessage() for r in caplog.records) == 3
    assert_routed(h.get("group/legacy"), "old")  # a cache hit needs no storage


def test_storage_on_a_closed_port_is_503(layout):
    config = config_for(layout)
    config["gcs"]["endpoint"] = f"http://127.0.0.1:{free_port()}"
    client = Client(RegistryMiddleware(named_app("main"), config, apps={"old": named_app("old")}, environ={}))
    assert_unavailable(client.get("/v2/group/legacy/manifests/latest"), "5", "group/legacy")


# --- paused migration ------------------------------------------------------------


def classified(path: str, source: str) -> float:
    return metrics.REGISTRY.get_sample_value("regmw_classifications_total", {"path": path, "source": source}) or 0


def test_paused_migration_sends_no_new_repository_to_new(layout):
    h = Harness(layout, paused=True)
    eligible = lambda name: bearer(token(grant(name, True)))  # noqa: E731
    assert_routed(h.get("group/fresh", eligible("group/fresh")), "old")      # would be new unpaused
    # already new: stays new, and what decided is the storage (then the cache), never the paused flag
    before = {source: classified("new", source) for source in ("storage", "cache", "token")}
    assert_routed(h.get("group/migrated", eligible("group/migrated")), "new")
    assert_routed(h.get("group/migrated", eligible("group/migrated")), "new")
    assert {source: classified("new", source) - before[source] for source in before} == {
        "storage": 1, "cache": 1, "token": 0}
    assert_routed(h.get("group/migrated"), "new")
    assert_routed(h.get("group/legacy", eligible("group/legacy")), "old")
    mark_migrated(h.services, "group/marked")                                # new by mark, nothing in storage
    h.requests.reset()
    assert_routed(h.get("group/marked", eligible("group/marked")), "new")
    assert h.requests.count == 0

    unpaused = Harness(layout)
    assert_routed(unpaused.get("group/fresh", eligible("group/fresh")), "new")


# --- cross-repository mount ------------------------------------------------------------


def mount(client, destination: str, source: str, headers):
    digest = "sha256:" + "a" * 64
    return client.post(f"/v2/{destination}/blobs/uploads/", query_string={"mount": digest, "from": source},
                       headers=headers)


def test_mount_is_decided_by_the_repository_that_needs_push(harness):
    """The source (pull only) lives under old and is not eligible; the destination is eligible."""
    headers = bearer(token(grant("group/legacy", False, actions=["pull"]), grant("group/dest", True)))
    assert_routed(mount(harness.client, "group/dest", "group/legacy", headers), "new")

    headers = bearer(token(grant("group/migrated", True, actions=["pull"]), grant("group/dest2", False)))
    assert_routed(mount(harness.client, "group/dest2", "group/migrated", headers), "old")


def test_push_entry_wins_over_a_pull_entry_of_the_same_repository(harness):
    headers = bearer(token(grant("group/dest", False, actions=["pull"]), grant("group/dest", True, actions=["push"])))
    response = harness.client.put("/v2/group/dest/manifests/v1", data=b"{}", headers=headers)
    assert_routed(response, "new")


# --- exposure and dispatch --------------------------------------------------------------


def test_without_apps_the_main_app_reads_the_decision(layout):
    h = Harness(layout, apps=False)
    response = h.get("group/migrated")
    assert response.headers["X-App"] == "main" and response.headers["X-Path"] == "new"
    assert response.headers[HEADER] == "new"


def test_header_can_be_switched_off(layout):
    h = Harness(layout, response_header=False)
    response = h.get("group/legacy")
    assert response.headers["X-App"] == "old" and HEADER not in response.headers


def test_disabled_plugin_classifies_nothing(layout):
    h = Harness(layout, enabled=False)
    response = h.get("group/legacy")
    assert response.headers["X-App"] == "main" and response.headers["X-Path"] == "None"
    assert h.requests.count == 0


def test_decision_is_logged_and_counted(harness, caplog):
    labels = {"path": "new", "source": "storage"}
    before = metrics.REGISTRY.get_sample_value("regmw_classifications_total", labels) or 0
    with caplog.at_level(logging.DEBUG, logger="regmw.migration"):
        harness.get("group/migrated")
    assert any("group/migrated: new" in record.getMessage() for record in caplog.records)
    assert metrics.REGISTRY.get_sample_value("regmw_classifications_total", labels) == before + 1
    harness.get("group/migrated")
    assert metrics.REGISTRY.get_sample_value("regmw_classifications_total", {"path": "new", "source": "cache"})


# --- migrate-mark ---------------------------------------------------------------------


def test_mark_migrated_replaces_a_cached_old(harness):
    assert_routed(harness.get("group/both"), "old")
    mark_migrated(harness.services, "group/both")
    harness.requests.reset()
    assert_routed(harness.get("group/both"), "new")
    assert harness.requests.count == 0


def test_lookup_in_flight_cannot_overwrite_a_fresh_migration_mark(layout):
    """The look-up sees the old prefix; before it caches "old", the repository is migrated
    (old objects deleted, new ones written) and marked. Its stale "old" must not replace the mark.

    Deterministic: the storage wrapper runs the migration between the look-up's
    storage answer and its cache write.
    """
    h = Harness(layout)
    storage = h.services.storage
    real = storage.prefix_exists
    old_names = repo_objects(OLD_ROOT, "group/moving")
    layout.put(*old_names)
    migrated = []

    def migrate_while_in_flight(prefix):
        found = real(prefix)
        if prefix == h.classifier.old_prefix("group/moving") and not migrated:
            layout.put(*repo_objects(NEW_ROOT, "group/moving"))
            for name in old_names:
                layout.client.bucket(layout.bucket).blob(name).delete()
            mark_migrated(h.services, "group/moving")
            migrated.append(prefix)
        return found

    storage.prefix_exists = migrate_while_in_flight
    assert_routed(h.get("group/moving"), "old")  # this request was decided before the migration ended
    assert migrated
    h.requests.reset()
    assert_routed(h.get("group/moving"), "new")  # the mark stands
    assert h.requests.count == 0
    assert h.cache.get(repository_key("group/moving", "migration")) == b"new"


def test_mark_migrated_needs_the_plugin():
    runtime = regmw.build({}, environ={})
    with pytest.raises(ConfigError, match="migration"):
        mark_migrated(runtime.services, "group/x")


def test_app_can_mark_its_repository_migrated(layout):
    def importer(environ, start_response):
        environ["regmw.migrated"] = environ.get("QUERY_STRING") != "fail"
        status = "500 Internal Server Error" if environ.get("QUERY_STRING") == "fail" else "200 OK"
        start_response(status, [])
        return [b""]

    h = Harness(layout)
    h.mw.apps["old"] = importer
    with h.client.get("/v2/group/both/manifests/latest?fail") as response:
        assert response.status_code == 500 and response.headers[HEADER] == "old"
    with h.client.get("/v2/group/both/manifests/latest") as response:  # a failed request marked nothing
        assert response.status_code == 200 and response.headers[HEADER] == "old"
    # closing the response ran regmw_finish, which marked the repository
    assert_routed(h.get("group/both"), "new")
    assert h.requests.count == 1


# --- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("migration", "message"),
    [({}, "migration.new_root"), ({"new_root": OLD_ROOT}, "must differ"), ({"new_root": "a//b"}, "migration.new_root"),
     ({"new_root": NEW_ROOT, "old_ttl": 0}, "migration.old_ttl")],
)
def test_bad_configuration_stops_start_up(layout, migration, message):
    config = config_for(layout)
    config["migration"] = migration
    with pytest.raises(ConfigError, match=message):
        regmw.build(config, environ={})


# --- the embedded filesystem storage implements the same hooks ---------------------------


@pytest.fixture
def fs_root(tmp_path):
    for path in (*repo_objects(OLD_ROOT, "group/legacy"), *repo_objects(NEW_ROOT, "group/migrated"),
                 *repo_objects(OLD_ROOT, "group/foobar"), f"{OLD_ROOT}/repositories/flat/file"):
        full = tmp_path / path
        full.parent.mkdir(parents=True, exist_ok=True)
        full.write_bytes(b"x")
    (tmp_path / NEW_ROOT / "repositories" / "empty").mkdir(parents=True)
    loop = tmp_path / NEW_ROOT / "repositories" / "group" / "loop"
    os.symlink(loop, loop)  # a symlink to itself: listing it fails with ELOOP, a real I/O error
    return tmp_path


def test_filesystem_storage_answers_existence(fs_root):
    storage = regmw.build({"storage": {"root": str(fs_root)}}, environ={}).services.storage
    repos = f"{OLD_ROOT}/repositories"
    assert storage.prefix_exists(f"{repos}/group/legacy/") is True
    assert storage.prefix_exists(f"{repos}/flat/") is True
    assert storage.prefix_exists(f"{repos}/group/") is True          # sub-prefixes only
    assert storage.prefix_exists(f"{repos}/group/foo/") is False     # foobar exists, foo does not
    assert storage.prefix_exists(f"{repos}/nowhere/") is False
    assert storage.prefix_exists(f"{NEW_ROOT}/repositories/empty/") is False
    # plain prefixes, as on GCS: "<name>/_" asks for the repository's own entries only
    assert storage.prefix_exists(f"{repos}/group/foo") is True         # a plain prefix: foobar
    assert storage.prefix_exists(f"{repos}/group/legacy/_") is True
    assert storage.prefix_exists(f"{repos}/group/_") is False          # only child repositories
    assert storage.prefix_exists(f"{repos}/flat/_") is False           # an entry, not an own entry
    assert storage.prefix_exists(f"{repos}/nowhere/_") is False
    with pytest.raises(regmw.StorageError):
        storage.prefix_exists(f"{NEW_ROOT}/repositories/group/loop/")
    with pytest.raises(regmw.StorageError):
        storage.prefix_exists("../outside/")


def test_classification_on_filesystem_storage(fs_root):
    config = {
        "regmw": {"plugins": ["migration"], "entry_points": False},
        "storage": {"root": str(fs_root)},
        "auth": {"key": PUBLIC_KEY, "algorithms": ["RS256"], "issuer": ISSUER, "audience": AUDIENCE},
        "migration": {"new_root": NEW_ROOT},
    }
    client = Client(RegistryMiddleware(named_app("main"), config,
                                       apps={"old": named_app("old"), "new": named_app("new")}, environ={}))

    def get(name, *access):
        return client.get(f"/v2/{name}/manifests/latest", headers=bearer(token(*access)) if access else {})

    assert_routed(get("group/legacy", grant("group/legacy", True)), "old")
    assert_routed(get("group/migrated"), "new")
    assert_routed(get("group/fresh", grant("group/fresh", True)), "new")
    assert_routed(get("group/fresh", grant("group/fresh", False)), "old")
    assert_routed(get("group/foo"), "old")
    assert_unavailable(get("group/loop"), "5", "group/loop")


# --- single-flight: bounded, errors shared, waits bounded -----------------------------------


def _hold(flights, key, result=None, error=None):
    """Start a leader for ``key`` in ``flights`` (a SingleFlight) that blocks until the returned event is set."""
    entered, release = threading.Event(), threading.Event()
    outcome = {}

    def fn():
        entered.set()
        release.wait(30)
        if error is not None:
            raise error
        return result

    def leader():
        try:
            outcome["value"] = flights.do(key, fn)
        except BaseException as exc:  # noqa: BLE001 - recorded for the test
            outcome["error"] = exc

    thread = threading.Thread(target=leader)
    thread.start()
    assert entered.wait(30)
    return release, thread, outcome


def test_single_flight_is_bounded():
    from regmw_migration.singleflight import SingleFlight

    flights = SingleFlight(max_keys=1, wait_timeout=30)
    release, thread, _ = _hold(flights, "a", result=1)
    calls = []
    assert flights.do("b", lambda: calls.append("b") or 2) == 2  # over the bound: runs alone, not stored
    assert flights.in_flight() == 1
    release.set()
    thread.join(30)
    assert flights.in_flight() == 0 and calls == ["b"]


def test_single_flight_shares_the_leaders_error():
    from regmw_migration.singleflight import FlightFailed, SingleFlight

    flights = SingleFlight()
    release, thread, outcome = _hold(flights, "k", error=regmw.StorageError("gcs down"))
    errors = []
    follower = threading.Thread(target=lambda: errors.append(pytest.raises(FlightFailed, flights.do, "k", lambda: 0)))
    follower.start()
    assert flights.wait_for_waiters("k", 1, timeout=30)
    release.set()
    thread.join(30)
    follower.join(30)
    assert isinstance(outcome["error"], regmw.StorageError)
    assert isinstance(errors[0].value.__cause__, regmw.StorageError)
    assert flights.in_flight() == 0


def test_single_flight_waiters_give_up():
    from regmw_migration.singleflight import FlightTimeout, SingleFlight

    flights = SingleFlight(wait_timeout=0.01)
    release, thread, _ = _hold(flights, "k", result=1)
    with pytest.raises(FlightTimeout):
        flights.do("k", lambda: 0)  # the leader is held at its gate: the wait must end on its own
    release.set()
    thread.join(30)


# --- with the shared Redis cache and its one-round-trip admission ---------------------------


def test_redis_admission_prefetches_the_classification(layout, redis_server):
    """Warm requests: one Redis round trip (the admission script read the value), zero storage requests."""
    import redis as redis_py
    from regmw_redis.connection import ROUND_TRIPS

    _, url = redis_server
    config = config_for(layout)
    config["regmw"]["plugins"] = ["gcs", "migration", "redis"]
    config["redis"] = {"url": url}
    mw = RegistryMiddleware(named_app("main"), config, apps={"old": named_app("old"), "new": named_app("new")},
                            environ={})
    storage_requests = count_requests(mw.services.storage.client)
    client = Client(mw)
    assert_routed(client.get("/v2/group/legacy/manifests/latest"), "old")
    assert_routed(client.get("/v2/group/migrated/manifests/latest"), "new")
    assert storage_requests.count == 3

    raw = redis_py.Redis.from_url(url)
    assert raw.pttl(mw.services.cache.redis_key(repository_key("group/migrated", "migration"))) == -1  # permanent
    assert 0 < raw.pttl(mw.services.cache.redis_key(repository_key("group/legacy", "migration"))) <= 300_000

    storage_requests.reset()
    for name, path in (("group/legacy", "old"), ("group/migrated", "new")):
        before = ROUND_TRIPS._value.get()
        assert_routed(client.get(f"/v2/{name}/manifests/latest"), path)
        assert ROUND_TRIPS._value.get() - before == 1
    assert storage_requests.count == 0

    mark_migrated(mw.services, "group/legacy")  # seen by every instance sharing this Redis
    other = Client(RegistryMiddleware(named_app("main"), config, apps={"new": named_app("new")}, environ={}))
    assert_routed(other.get("/v2/group/legacy/manifests/latest"), "new")
