"""The plugin contract (issue 8): the import graph, and third-party plugins composing with the built-ins.

Each composition either works fully (rate limits, read-only refusals, the one
Redis round trip where the Redis admission runs) or is refused at start-up
with one line naming the plugin and what would be lost.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from werkzeug.test import Client

from regmw import ConfigError, Refusal, RegistryMiddleware, build, hookimpl, repository_key
from regmw.backends import CompositeRateLimiter, RateLimitResult
from regmw.defaults.ratelimit import parse_rules

ROOT = Path(__file__).resolve().parent.parent
BUILTIN_PLUGINS = sorted(path.name for path in (ROOT / "plugins").iterdir() if (path / "__init__.py").is_file())


# --- the import graph ------------------------------------------------------------------


def imported_modules(source: str) -> set[str]:
    """Every module a source imports, wherever the import sits (function bodies too), plus import_module("x")."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return found


def forbidden_imports(files: list[Path], allowed: str | None) -> list[str]:
    bad = []
    for path in files:
        for module in imported_modules(path.read_text()):
            top = module.split(".")[0]
            if top in BUILTIN_PLUGINS and top != allowed:
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    return bad


def test_the_import_graph_reader_sees_function_level_imports():
    source = "import os\ndef f():\n    from regmw_redis.connection import x\n    import regmw_gcs\n"
    assert imported_modules(source) >= {"os", "regmw_redis.connection", "regmw_gcs"}
    assert "regmw_dbroute" in imported_modules("import importlib\nimportlib.import_module('regmw_dbroute')\n")


def test_no_plugin_imports_another_and_the_core_imports_none():
    assert {"regmw_redis", "regmw_migration", "regmw_dbroute", "regmw_gcs"} <= set(BUILTIN_PLUGINS)
    bad = []
    for name in BUILTIN_PLUGINS:
        bad += forbidden_imports(sorted((ROOT / "plugins" / name).rglob("*.py")), allowed=name)
    bad += forbidden_imports(sorted((ROOT / "regmw").rglob("*.py")), allowed=None)
    bad += forbidden_imports(sorted((ROOT / "tests" / "outside_plugin").rglob("*.py")), allowed=None)
    assert bad == []


# --- helpers ---------------------------------------------------------------------------------


def registry(environ, start_response):
    start_response("201 Created" if environ["REQUEST_METHOD"] in ("PUT", "POST") else "200 OK", [])
    return [b"{}"]


def config_for(backend: str, url: str | None, **sections) -> dict:
    config: dict = {"regmw": {"plugins": ["redis"] if backend == "redis" else [], "entry_points": False}}
    if backend == "redis":
        config["redis"] = {"url": url, "socket_timeout": 1, "connect_timeout": 1}
    config.update(sections)
    return config


def make(backend: str, url: str | None, plugins=(), **sections) -> RegistryMiddleware:
    return RegistryMiddleware(registry, config_for(backend, url, **sections), plugins=list(plugins), environ={})


def client_at(middleware, address: str) -> Client:
    def from_address(environ, start_response):
        environ["REMOTE_ADDR"] = address
        return middleware(environ, start_response)

    return Client(from_address)


def round_trips():
    from regmw_redis.connection import ROUND_TRIPS  # the test measures the redis plugin; plugins never import it

    return ROUND_TRIPS._value.get()


@pytest.fixture(params=["memory", "redis"])
def backend(request):
    """(backend, url): the embedded defaults, or the redis plugin on a throwaway server."""
    if request.param == "memory":
        return "memory", None
    _, url = request.getfixturevalue("redis_server")
    return "redis", url


TWO_READS = {"rules": [{"by": "client", "limit": "2/hour", "name": "two", "methods": "read"}]}


def assert_limits_and_locks_hold(middleware, address: str = "10.0.0.1") -> None:
    """2 reads per hour per client; a read-only repository refuses writes (503)."""
    reader = client_at(middleware, address)
    statuses = [reader.get("/v2/team/app/manifests/latest").status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert middleware.services.locks.set_read_only("team/locked", 60, owner="test") is not None
    refused = client_at(middleware, "10.9.9.9").put("/v2/team/locked/manifests/v1", data=b"{}")
    assert refused.status_code == 503 and refused.json["errors"][0]["code"] == "UNAVAILABLE"
    assert client_at(middleware, "10.9.9.9").put("/v2/team/open/manifests/v1", data=b"{}").status_code == 201


# --- admission replaced ------------------------------------------------------------------------


class PausedPushes:
    """A third-party admission that decides one thing only: pushes under paused/ are refused."""

    def admit(self, context):
        if context.is_write and (context.repository or "").startswith("paused/"):
            return Refusal(403, "DENIED", "pushes are paused")
        return None


class ReplacesAdmission:
    @hookimpl
    def regmw_admission(self):
        return PausedPushes()


@pytest.mark.services
def test_a_replaced_admission_keeps_rate_limits_and_read_only_checks(backend):
    middleware = make(*backend, plugins=[ReplacesAdmission()], ratelimit=TWO_READS)
    assert middleware.services.admission.inner.__class__ is PausedPushes  # completed around, not replaced
    assert middleware.services.admission.added == {"ratelimit", "readonly"}
    paused = client_at(middleware, "10.0.0.2").put("/v2/paused/app/manifests/v1", data=b"{}")
    assert paused.status_code == 403 and paused.json["errors"][0]["code"] == "DENIED"
    assert_limits_and_locks_hold(middleware)


def test_an_admission_that_covers_a_part_takes_that_part_on():
    class CountsNothing(PausedPushes):
        covers = frozenset({"ratelimit"})  # it claims rate limiting: the core does not add it

    class Plugin:
        @hookimpl
        def regmw_admission(self):
            return CountsNothing()

    middleware = make("memory", None, plugins=[Plugin()], ratelimit=TWO_READS)
    assert middleware.services.admission.added == {"readonly"}
    reader = client_at(middleware, "10.0.0.1")
    assert [reader.get("/v2/team/app/manifests/latest").status_code for _ in range(3)] == [200, 200, 200]


def test_an_admission_naming_an_unknown_part_is_one_config_error():
    class Confused(PausedPushes):
        covers = frozenset({"ratelimit", "quota"})

    class ConfusedPlugin:
        @hookimpl
        def regmw_admission(self):
            return Confused()

    with pytest.raises(ConfigError) as error:
        build({"regmw": {"entry_points": False}}, plugins=[ConfusedPlugin()], environ={})
    assert "\n" not in str(error.value)
    assert "quota" in str(error.value) and "Confused" in str(error.value) and "test_contract" in str(error.value)


# --- admission wrapped -----------------------------------------------------------------------


class WrapsAdmission:
    """Adds a refusal in front of whichever admission was chosen, keeping everything it covers."""

    @hookimpl(wrapper=True)
    def regmw_admission(self):
        inner = yield
        return PausedInFront(inner)


class PausedInFront:
    def __init__(self, inner):
        self.inner = inner
        self.covers = inner.covers

    def admit(self, context):
        return PausedPushes().admit(context) or self.inner.admit(context)


@pytest.mark.services
def test_a_wrapped_admission_keeps_everything_and_the_one_round_trip(backend):
    middleware = make(*backend, plugins=[WrapsAdmission()], ratelimit=TWO_READS)
    assert isinstance(middleware.services.admission, PausedInFront)  # nothing added around: it covers both
    assert client_at(middleware, "10.0.0.2").put("/v2/paused/app/manifests/v1", data=b"{}").status_code == 403
    if backend[0] == "redis":
        before = round_trips()
        assert client_at(middleware, "10.0.0.3").get("/v2/team/app/manifests/latest").status_code == 200
        assert round_trips() - before == 1
    assert_limits_and_locks_hold(middleware)


# --- a second rate limiter ------------------------------------------------------------------


class PushBudget:
    """A limiter whose rule is its own code: one push per repository, counted in this process."""

    def __init__(self):
        self.pushes: dict[str, int] = {}
        self.calls = 0

    def hit(self, context):
        self.calls += 1
        if not (context.is_write and context.repository):
            return RateLimitResult(True)
        count = self.pushes[context.repository] = self.pushes.get(context.repository, 0) + 1
        return RateLimitResult(count <= 1, 1, 1 - count, 3600, "push-budget")


class AddsPushBudget:
    def __init__(self):
        self.budget = PushBudget()

    @hookimpl(wrapper=True)
    def regmw_rate_limiter(self):
        inner = yield
        return CompositeRateLimiter(inner, self.budget)


@pytest.mark.services
def test_a_second_rate_limiter_added_by_a_wrapper_counts_with_the_configured_one(backend):
    plugin = AddsPushBudget()
    middleware = make(*backend, plugins=[plugin], ratelimit=TWO_READS)
    pusher = client_at(middleware, "10.0.0.5")
    assert pusher.put("/v2/team/push/manifests/v1", data=b"{}").status_code == 201
    second = pusher.put("/v2/team/push/manifests/v1", data=b"{}")
    assert second.status_code == 429 and second.headers["RateLimit-Limit"] == "1"
    assert pusher.put("/v2/team/other/manifests/v1", data=b"{}").status_code == 201
    if backend[0] == "redis":  # the configured rule still counts in the script; the budget is asked after it
        before = round_trips()
        assert client_at(middleware, "10.0.0.6").get("/v2/team/app/manifests/latest").status_code == 200
        assert round_trips() - before == 1
    calls = plugin.budget.calls
    assert_limits_and_locks_hold(middleware)
    assert plugin.budget.calls > calls


@pytest.mark.services
def test_a_second_declarative_limiter_is_counted_in_the_same_round_trip(backend):
    class Declared(PushBudget):
        """The push budget again, but stating its rule declaratively: a Redis admission may count it."""

        shared = True
        rules = parse_rules([{"by": "repository", "limit": "1/hour", "name": "push-budget", "methods": "write"}])

    declared = Declared()

    class AddsDeclared:
        @hookimpl(wrapper=True)
        def regmw_rate_limiter(self):
            return CompositeRateLimiter((yield), declared)

    middleware = make(*backend, plugins=[AddsDeclared()], ratelimit=TWO_READS)
    writer = client_at(middleware, "10.0.0.7")
    before = round_trips() if backend[0] == "redis" else 0
    assert writer.put("/v2/team/w/manifests/v1", data=b"{}").status_code == 201
    if backend[0] == "redis":  # counted in the script, with the configured rule: one round trip, hit() unused
        assert round_trips() - before == 2  # ... and one more: the write's confirmation ([readonly] confirm_writes)
    assert writer.put("/v2/team/w/manifests/v1", data=b"{}").status_code == 429
    assert_limits_and_locks_hold(middleware)
    assert (declared.calls == 0) == (backend[0] == "redis")


def test_replacing_the_rate_limiter_while_rules_are_configured_is_refused():
    class OnlyMine:
        @hookimpl
        def regmw_rate_limiter(self):
            return PushBudget()

    with pytest.raises(ConfigError) as error:
        build({"regmw": {"entry_points": False}, **{"ratelimit": TWO_READS}}, plugins=[OnlyMine()], environ={})
    message = str(error.value)
    assert "\n" not in message
    assert "ratelimit.rules two would not be counted" in message and "PushBudget" in message
    assert "CompositeRateLimiter" in message
    # without configured rules there is nothing to lose: it is simply the limiter
    runtime = build({"regmw": {"entry_points": False}}, plugins=[OnlyMine()], environ={})
    assert isinstance(runtime.services.rate_limiter, PushBudget)


# --- prefetch declared by a third-party plugin -----------------------------------------------


class Notes:
    """Declares one cache key per repository; reads it from ``context.prefetched`` when an admission read it."""

    def __init__(self):
        self.asked_cache = 0
        self.seen: list[bytes | None] = []

    @staticmethod
    def key(context):
        return repository_key(context.repository, "note") if context.repository else None

    @hookimpl
    def regmw_prefetch(self):
        return [self.key]

    @hookimpl
    def regmw_response_started(self, context, status, headers):
        key = self.key(context)
        if key is None:
            return
        if key in context.prefetched:
            value = context.prefetched[key]
        else:
            self.asked_cache += 1
            value = context.services.cache.get(key)
        self.seen.append(value)


@pytest.mark.services
def test_prefetch_declared_by_a_third_party_plugin(backend):
    notes = Notes()
    middleware = make(*backend, plugins=[notes])
    assert Notes.key in middleware.services.prefetch
    middleware.services.cache.set(repository_key("team/app", "note"), b"hello")
    client = client_at(middleware, "10.0.0.1")
    before = round_trips() if backend[0] == "redis" else 0
    assert client.get("/v2/team/app/manifests/latest").status_code == 200
    assert notes.seen == [b"hello"]
    if backend[0] == "redis":  # read by the admission script, on its one round trip
        assert round_trips() - before == 1 and notes.asked_cache == 0
    else:  # the embedded admission reads no cache: the plugin asks the cache itself
        assert notes.asked_cache == 1


def test_a_prefetch_declaration_must_be_a_function():
    class Broken:
        @hookimpl
        def regmw_prefetch(self):
            return ["not-a-function"]

    with pytest.raises(ConfigError, match="regmw_prefetch: 'not-a-function' is not a function"):
        build({"regmw": {"entry_points": False}}, plugins=[Broken()], environ={})


def test_prefetch_is_fixed_before_the_admission_is_built():
    class Late:
        @hookimpl
        def regmw_admission(self, services):
            assert services.prefetch == (Notes.key,)  # every declaration is in, already
            return None

    class Declares:
        @hookimpl
        def regmw_prefetch(self):
            return [Notes.key]

    runtime = build({"regmw": {"entry_points": False}}, plugins=[Declares(), Late()], environ={})
    assert isinstance(runtime.services.prefetch, tuple)
