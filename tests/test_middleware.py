"""The middleware's request flow: hook order, refusals, pass-through, streaming."""
import json
import logging

import pytest
from werkzeug.test import Client

from regmw import Refusal, RegistryMiddleware, hookimpl, metrics


def plain_app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"app:" + environ["PATH_INFO"].encode()]


class Recorder:
    """A plugin that records every decision hook call, in order."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def regmw_admit(self, context):
        self.calls.append(("admit", context.repository))

    @hookimpl
    def regmw_classify(self, context):
        self.calls.append(("classify", context.repository))
        return "new"

    @hookimpl
    def regmw_route_db(self, context):
        self.calls.append(("route_db", context.migration_path))
        return "db-handle"

    @hookimpl
    def regmw_response_started(self, context, status, headers):
        self.calls.append(("response_started", status))
        headers.append(("X-Seen", "1"))

    @hookimpl
    def regmw_finish(self, context, status):
        self.calls.append(("finish", status))


def make(app=plain_app, config=None, plugins=(), **kwargs):
    return RegistryMiddleware(app, config or {}, plugins=plugins, environ={}, **kwargs)


def test_hooks_run_in_order_and_the_app_sees_the_decisions():
    recorder = Recorder()
    seen = {}

    def app(environ, start_response):
        context = environ["regmw.context"]
        seen.update(path=context.migration_path, db=environ["regmw.db"], repo=context.repository)
        recorder.calls.append(("app", None))
        return plain_app(environ, start_response)

    response = Client(make(app, plugins=[recorder])).get("/v2/group/project/manifests/latest", buffered=True)
    assert response.status_code == 200
    assert response.headers["X-Seen"] == "1"
    assert [name for name, _ in recorder.calls] == [
        "admit", "classify", "route_db", "app", "response_started", "finish",
    ]
    assert seen == {"path": "new", "db": "db-handle", "repo": "group/project"}


def test_finish_runs_after_the_streamed_body_closes():
    recorder = Recorder()
    events = []

    def streaming_app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream")])

        def body():
            for index in range(3):
                events.append(f"chunk{index}")
                yield b"x"
        return body()

    middleware = make(streaming_app, plugins=[recorder])
    iterator = middleware({"REQUEST_METHOD": "GET", "PATH_INFO": "/v2/a/blobs/sha256:" + "0" * 64,
                           "wsgi.input": None}, lambda status, headers, exc_info=None: None)
    first = next(iter(iterator))
    assert first == b"x"
    assert ("finish", 200) not in recorder.calls  # body still streaming
    list(iterator)
    iterator.close()
    assert recorder.calls[-1] == ("finish", 200)
    assert events == ["chunk0", "chunk1", "chunk2"]


def test_paths_outside_v2_pass_through_untouched():
    recorder = Recorder()
    response = Client(make(plugins=[recorder])).get("/healthz")
    assert response.data == b"app:/healthz"
    assert recorder.calls == []


def test_refusal_from_admit_is_an_oci_body_and_the_app_is_not_called():
    class Deny:
        @hookimpl
        def regmw_admit(self, context):
            return Refusal(403, "DENIED", "no entry", retry_after=7)

    called = []

    def app(environ, start_response):
        called.append(True)
        return plain_app(environ, start_response)

    recorder = Recorder()
    response = Client(make(app, plugins=[recorder, Deny()])).put("/v2/a/manifests/latest")
    assert response.status_code == 403
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Retry-After"] == "7"
    assert json.loads(response.data) == {"errors": [{"code": "DENIED", "message": "no entry"}]}
    assert called == []
    # the first refusal wins: the recorder (registered earlier, called later) never saw admit
    assert ("admit", "a") not in recorder.calls
    assert recorder.calls == [("finish", 403)]


def test_refusal_raised_in_classify_becomes_503():
    class Broken:
        @hookimpl
        def regmw_classify(self, context):
            raise Refusal(503, "UNAVAILABLE", "storage down", retry_after=3)

    response = Client(make(plugins=[Broken()])).get("/v2/a/manifests/latest")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "3"
    assert json.loads(response.data)["errors"][0]["code"] == "UNAVAILABLE"


def test_a_bug_in_a_hook_is_an_oci_500_not_a_traceback():
    class Buggy:
        @hookimpl
        def regmw_route_db(self, context):
            raise KeyError("oops")

    response = Client(make(plugins=[Buggy()])).get("/v2/a/manifests/latest")
    assert response.status_code == 500
    body = json.loads(response.data)
    assert body["errors"][0]["code"] == "UNKNOWN"
    assert "oops" not in response.get_data(as_text=True)
    assert "Traceback" not in response.get_data(as_text=True)


class RaisesAfterTheApp:
    """A third-party plugin with a bug in both observing hooks (registered last: pluggy calls it first)."""

    @hookimpl
    def regmw_response_started(self, context, status, headers):
        raise RuntimeError("secret detail")

    @hookimpl
    def regmw_finish(self, context, status):
        raise RuntimeError("secret detail")


class WrapsTheObservingHooks:
    """A third-party plugin timing the observing hooks with wrappers (pluggy's caller runs the hook then)."""

    def __init__(self):
        self.wrapped = []

    @hookimpl(wrapper=True)
    def regmw_response_started(self, context, status, headers):
        try:
            return (yield)
        finally:
            self.wrapped.append("response_started")

    @hookimpl(wrapper=True)
    def regmw_finish(self, context, status):
        try:
            return (yield)
        finally:
            self.wrapped.append("finish")


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "with-a-wrapper"])
@pytest.mark.parametrize("method, status", [("GET", 200), ("PUT", 403)], ids=["answered", "refused"])
def test_a_bug_in_one_plugins_observing_hook_skips_no_other_plugin(caplog, method, status, wrapped):
    """regmw_response_started and regmw_finish: the failing plugin is logged, every other one still runs.

    The built-ins do work there that must not depend on a third-party
    plugin's health: notifications store the event, dbroute records the write
    position, in regmw_response_started. Also when another plugin wraps those
    hooks (a wrapper makes pluggy's own caller run them).
    """
    class DenyPuts:
        @hookimpl
        def regmw_admit(self, context):
            if context.is_write:
                return Refusal(403, "DENIED", "no writes")

    recorder = Recorder()
    wrapper = WrapsTheObservingHooks()
    client = Client(make(plugins=[recorder, DenyPuts(), *([wrapper] if wrapped else []), RaisesAfterTheApp()]))
    with caplog.at_level("ERROR", logger="regmw"):
        response = client.open("/v2/a/manifests/latest", method=method, buffered=True)
    assert response.status_code == status
    assert "secret detail" not in response.get_data(as_text=True)
    observed = [call for call in recorder.calls if call[0] in ("response_started", "finish")]
    if status == 200:
        assert response.headers["X-Seen"] == "1"
        assert observed == [("response_started", 200), ("finish", 200)]
    else:
        assert observed == [("finish", 403)]  # a refusal is regmw's own answer: no regmw_response_started
    failures = [record for record in caplog.records if record.exc_info]
    hooks = ["regmw_response_started", "regmw_finish"] if status == 200 else ["regmw_finish"]
    assert [hook for record in failures for hook in hooks if hook in record.getMessage()] == hooks
    assert all("RaisesAfterTheApp" in record.getMessage() for record in failures)
    if wrapped:
        assert wrapper.wrapped == [hook.removeprefix("regmw_") for hook in hooks]


@pytest.mark.parametrize(
    "path, raw",
    [
        ("/v2/Upper/manifests/latest", None),
        ("/v2/../secret/manifests/latest", None),
        ("/v2/a/b/manifests/latest", "/v2/a%2Fb/manifests/latest"),
        ("/v2/a/../b/manifests/latest", "/v2/a/%2e%2e/b/manifests/latest"),
    ],
)
def test_hostile_names_get_name_invalid_and_never_reach_the_app(path, raw):
    called = []

    def app(environ, start_response):
        called.append(True)
        return plain_app(environ, start_response)

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path}
    if raw:
        environ["RAW_URI"] = raw
    status = []
    body = b"".join(make(app)(environ, lambda s, h, e=None: status.append(s)))
    assert status[0].startswith("400")
    assert json.loads(body)["errors"][0]["code"] == "NAME_INVALID"
    assert called == []


def test_head_refusal_has_no_body():
    response = Client(make()).head("/v2/UPPER/manifests/latest")
    assert response.status_code == 400
    assert response.data == b""


def test_dispatch_by_migration_path():
    class Classifier:
        @hookimpl
        def regmw_classify(self, context):
            return "old" if context.repository.startswith("legacy/") else "new"

    def named(name):
        def app(environ, start_response):
            start_response("200 OK", [])
            return [name.encode()]
        return app

    client = Client(make(named("default"), plugins=[Classifier()], apps={"old": named("old"), "new": named("new")}))
    assert client.get("/v2/legacy/x/tags/list").data == b"old"
    assert client.get("/v2/fresh/x/tags/list").data == b"new"
    assert client.get("/v2/").data == b"default"  # no repository: not classified


def test_rate_limit_headers_and_429():
    config = {"ratelimit": {"rules": [{"by": "repository", "limit": "2/minute"}]}}
    client = Client(make(config=config))
    first = client.get("/v2/a/tags/list")
    assert first.headers["RateLimit-Limit"] == "2"
    assert first.headers["RateLimit-Remaining"] == "1"
    assert client.get("/v2/a/tags/list").status_code == 200
    refused = client.get("/v2/a/tags/list")
    assert refused.status_code == 429
    assert json.loads(refused.data)["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert refused.headers["Retry-After"].isdigit() and 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert client.get("/v2/b/tags/list").status_code == 200  # another repository has its own budget


def test_a_zero_limit_refuses_with_its_rate_limit_headers():
    # "0/minute" (e.g. freezing writes) is a limit like any other: its 429 says so in the headers too
    config = {"ratelimit": {"rules": [{"by": "repository", "limit": "0/minute", "methods": "write"}]}}
    client = Client(make(config=config))
    refused = client.put("/v2/a/manifests/latest", data=b"{}")
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "60"
    assert (refused.headers.get("RateLimit-Limit"), refused.headers.get("RateLimit-Remaining"),
            refused.headers.get("RateLimit-Reset")) == ("0", "0", "60")
    assert "RateLimit-Limit" not in client.get("/v2/a/tags/list").headers  # no rule matched: no headers


def test_read_only_lock_refuses_writes_and_passes_reads():
    middleware = make()
    middleware.services.locks.set_read_only("frozen/repo", ttl=60, owner="test")
    client = Client(middleware)
    refused = client.put("/v2/frozen/repo/manifests/latest", data=b"{}")
    assert refused.status_code == 503
    assert json.loads(refused.data)["errors"][0]["code"] == "UNAVAILABLE"
    assert int(refused.headers["Retry-After"]) >= 1
    assert client.get("/v2/frozen/repo/manifests/latest").status_code == 200
    assert client.put("/v2/other/repo/manifests/latest", data=b"{}").status_code == 200
    assert middleware.services.locks.clear_read_only("frozen/repo", owner="someone-else") is False
    assert middleware.services.locks.clear_read_only("frozen/repo", owner="test") is True
    assert client.put("/v2/frozen/repo/manifests/latest", data=b"{}").status_code == 200


def test_lock_store_down_fails_closed_for_writes_open_for_reads():
    class DownLocks:
        def read_only(self, repository):
            raise ConnectionError("lock store down")

    class DownLockStore:
        @hookimpl
        def regmw_lock_manager(self, config):
            return DownLocks()

    middleware = make(plugins=[DownLockStore()])
    client = Client(middleware)
    assert client.put("/v2/a/manifests/latest", data=b"{}").status_code == 503
    assert client.get("/v2/a/manifests/latest").status_code == 200

    open_middleware = make(config={"readonly": {"fail_closed_writes": False}}, plugins=[DownLockStore()])
    assert Client(open_middleware).put("/v2/a/manifests/latest", data=b"{}").status_code == 200


def test_metrics_endpoint_only_when_configured_and_only_to_allowed_networks():
    assert Client(make()).get("/-/regmw/metrics").data == b"app:/-/regmw/metrics"  # not configured: the app's path
    client = Client(make(config={"regmw": {"metrics_path": "/-/regmw/metrics"}}))
    client.get("/v2/a/tags/list")
    text = client.get("/-/regmw/metrics", environ_overrides={"REMOTE_ADDR": "127.0.0.1"}).get_data(as_text=True)
    assert "regmw_requests_total" in text and "regmw_request_duration_seconds_bucket" in text
    far = client.get("/-/regmw/metrics", environ_overrides={"REMOTE_ADDR": "10.1.2.3"},
                     headers={"X-Forwarded-For": "127.0.0.1"})
    assert far.status_code == 403 and far.json["errors"][0]["code"] == "DENIED"
    allowed = Client(make(config={"regmw": {"metrics_path": "/m"}, "serve": {"metrics_allow": ["10.0.0.0/8"]}}))
    assert allowed.get("/m", environ_overrides={"REMOTE_ADDR": "10.1.2.3"}).status_code == 200
    # an IPv4 peer of a server listening on :: arrives as ::ffff:a.b.c.d
    assert allowed.get("/m", environ_overrides={"REMOTE_ADDR": "::ffff:10.1.2.3"}).status_code == 200
    assert allowed.get("/m", environ_overrides={"REMOTE_ADDR": "::ffff:192.0.2.1"}).status_code == 403
    assert allowed.get("/m", environ_overrides={"REMOTE_ADDR": "127.0.0.1"}).status_code == 403
    assert allowed.get("/m").status_code == 403  # no peer address at all


@pytest.mark.parametrize("path", ["/x/../v2/a/manifests/latest", "/static/..//v2/", "//v2/a/tags/list", "/./v2/a/tags/list",
                                  "/v2x/../v2/A/manifests/latest", "/v2./../v2/a/tags/list"])
def test_dot_segments_that_lead_into_the_api_are_refused(path, caplog):
    called = []

    def app(environ, start_response):
        called.append(True)
        return plain_app(environ, start_response)

    status = []
    before = metrics.REGISTRY.get_sample_value("regmw_refusals_total", {"reason": "invalid"}) or 0
    with caplog.at_level(logging.INFO, logger="regmw.access"):
        body = b"".join(make(app)({"REQUEST_METHOD": "GET", "PATH_INFO": path, "HTTP_X_REQUEST_ID": "probe-1"},
                                  lambda s, h, e=None: status.append((s, h))))
    assert status[0][0].startswith("400") and json.loads(body)["errors"][0]["code"] == "NAME_INVALID"
    assert called == []
    # seen by the operator as every other refusal: one access log line, counted, the request id sent back
    assert ("X-Request-Id", "probe-1") in status[0][1]
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "regmw.access"]
    assert (line["path"], line["status"], line["refusal"], line["request_id"]) == (path, 400, "invalid", "probe-1")
    assert metrics.REGISTRY.get_sample_value("regmw_refusals_total", {"reason": "invalid"}) == before + 1


@pytest.mark.parametrize("path", ["/static/./app.js", "/a//b", "/x/../y"])
def test_dot_segments_elsewhere_pass_through(path):
    assert Client(make()).get(path).data == b"app:" + path.encode()


def test_mount_source_name_is_checked():
    client = Client(make())
    digest = "sha256:" + "a" * 64
    bad = client.post(f"/v2/dest/app/blobs/uploads/?mount={digest}&from=../../etc")
    assert bad.status_code == 400 and bad.json["errors"][0]["code"] == "NAME_INVALID"
    good = client.post(f"/v2/dest/app/blobs/uploads/?mount={digest}&from=src/app")
    assert good.status_code == 200
    # the key percent-encoded: the query decodes to from=../../etc for the app and the upstream too
    for query in (f"mount={digest}&fro%6D=../../etc", f"mount={digest}&%66rom=..%2F..%2Fetc"):
        bad = client.post(f"/v2/dest/app/blobs/uploads/?{query}")
        assert bad.status_code == 400 and bad.json["errors"][0]["code"] == "NAME_INVALID", query


def test_a_backend_down_error_from_a_plain_wsgi_app_is_an_oci_503():
    """dbroute's PrimaryUnavailable/ReplicaLost subclass BackendUnavailable: a bare WSGI app gets a 503, not a 500."""
    from regmw.errors import BackendUnavailable

    finished = []

    class Finish:
        @hookimpl
        def regmw_finish(self, context, status):
            finished.append(status)

    def raising_app(environ, start_response):
        raise BackendUnavailable("primary db.example.com:5432 refused the connection")

    response = Client(make(app=raising_app, plugins=[Finish()])).get("/v2/a/manifests/latest")
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert json.loads(response.data)["errors"][0]["code"] == "UNAVAILABLE"
    assert "db.example.com" not in response.get_data(as_text=True)
    assert finished == [503]


def test_a_backend_down_error_after_the_response_started_reaches_the_server():
    from regmw.errors import BackendUnavailable

    def late_app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        raise BackendUnavailable("replica lost mid-stream")

    with pytest.raises(BackendUnavailable):
        Client(make(app=late_app)).get("/v2/a/manifests/latest")


def test_regmws_own_response_headers_replace_the_apps_of_the_same_name():
    """An upstream regmw or registry echoing X-Request-Id (or sending its own RateLimit-*) must not
    give the client two values of one header."""
    def echoing(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain"), ("x-request-id", environ["HTTP_X_REQUEST_ID"]),
                                  ("RateLimit-Limit", "7"), ("X-App", "kept")])
        return [b"ok"]

    client = Client(make(echoing, {"ratelimit": {"rules": [{"name": "per-client", "by": "client", "limit": "5/minute"}]}}))
    response = client.get("/v2/group/app/manifests/v1", headers={"X-Request-Id": "abc-123"})
    headers = [(name.lower(), value) for name, value in response.headers]
    assert [value for name, value in headers if name == "x-request-id"] == ["abc-123"]
    assert [value for name, value in headers if name == "ratelimit-limit"] == ["5"]
    assert ("x-app", "kept") in headers
