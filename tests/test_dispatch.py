"""The per-hook call plans made at start-up keep pluggy's semantics (order, firstresult, wrappers)."""
from werkzeug.test import Client

from regmw import Refusal, RegistryMiddleware, hookimpl


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


class Admit:
    def __init__(self, name, calls, answer=None):
        self.name, self.calls, self.answer = name, calls, answer

    @hookimpl
    def regmw_admit(self, context):
        self.calls.append(self.name)
        return self.answer


class First:
    def __init__(self, calls):
        self.calls = calls

    @hookimpl(tryfirst=True)
    def regmw_admit(self, context):
        self.calls.append("tryfirst")


class Finish:
    """Takes only one of the hook's arguments, as pluggy allows."""

    def __init__(self, calls):
        self.calls = calls

    @hookimpl
    def regmw_finish(self, status):
        self.calls.append(("finish", status))


def get(middleware, path="/v2/group/project/manifests/latest"):
    return Client(middleware).get(path, buffered=True)


def test_order_and_firstresult_match_pluggy():
    calls = []
    plugins = [Admit("a", calls), Admit("b", calls, Refusal(403, "DENIED", "by b")), Admit("c", calls), First(calls)]
    middleware = RegistryMiddleware(app, {}, plugins=plugins, environ={})
    response = get(middleware)
    assert response.status_code == 403 and b"by b" in response.data
    # tryfirst, then the most recently registered; b answered, so a and the default admission never ran
    assert calls == ["tryfirst", "c", "b"]
    calls.clear()
    assert middleware.runtime.pm.hook.regmw_admit(context=None) is not None
    assert calls == ["tryfirst", "c", "b"]  # pluggy's own call: the same order and stop


def test_an_implementation_receives_only_the_arguments_it_names():
    calls = []
    middleware = RegistryMiddleware(app, {}, plugins=[Finish(calls)], environ={})
    assert get(middleware).status_code == 200
    assert calls == [("finish", 200)]


def test_a_wrapper_sees_both_sides_through_pluggy():
    seen = []

    class Wrapper:
        @hookimpl(wrapper=True)
        def regmw_admit(self, context):
            seen.append("before")
            result = yield
            seen.append(("after", result))
            return result

    calls = []
    refusal = Refusal(429, "TOOMANYREQUESTS", "slow down")
    middleware = RegistryMiddleware(app, {}, plugins=[Admit("x", calls, refusal), Wrapper()], environ={})
    assert get(middleware).status_code == 429
    assert seen == ["before", ("after", refusal)] and calls == ["x"]


def test_an_exception_in_a_hook_is_an_oci_error_not_a_traceback():
    class Broken:
        @hookimpl
        def regmw_classify(self, context):
            raise RuntimeError("boom")

    response = get(RegistryMiddleware(app, {}, plugins=[Broken()], environ={}))
    assert response.status_code == 500 and response.json["errors"][0]["code"] == "UNKNOWN"
