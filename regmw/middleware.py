"""The WSGI middleware: one pass per request through the decision hooks.

::

    environ ─► parse OCI route ─► RequestContext ─► regmw_admit ─► regmw_classify
            ─► regmw_route_db ─► app (or the old/new app) ─► regmw_response_started
            ─► body streamed ─► regmw_finish

Paths outside ``/v2`` go straight to the app, except the operator paths
(``/-/regmw/health``, ``/-/regmw/ready``, and ``[regmw] metrics_path`` for
``[serve] metrics_allow`` networks). A refusal at any step is answered with an
OCI error body, and the app is never called.

Every API request is measured once, when it is finished (refused, or its body
closed): one observation in ``regmw_request_duration_seconds`` and, when
``[serve] access_log`` is on, one JSON line (:mod:`regmw.accesslog`). The
per-request cost was measured with ``timeit`` on the project's (busy, 2-core)
VM and kept small by choice: label children are bound once and kept in a
dict (look-up + observe 5.2 us against 17.0 us through ``labels()`` each
time); the start time is one ``perf_counter()``; the request id is the
client's when sane, else 128 random bits from Python's generator (no
syscall; see :func:`regmw.accesslog.request_id`); the log line, one
``json.dumps``, is the largest item (52 us there) and is skipped entirely
when the ``regmw.access`` logger is off.

Under gunicorn's threads, what the request path costs is dominated less by
Python work than by syscalls that release the GIL: each release can hand the
GIL to another thread, and getting it back costs far more CPU on a VM than
the syscall (one ``os.urandom`` per request, for ``uuid4``, cost about 200 us
of server CPU per request over HTTP; docs/performance.md). With embedded
defaults and a repository already classified, the path makes none.
"""
from __future__ import annotations

import copy
import ipaddress
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import make_wsgi_app

from . import accesslog, health, metrics
from .context import RequestContext
from .defaults.core import ReadOnlyCheck
from .errors import BackendUnavailable, Refusal, name_invalid, unavailable
from .routes import NotAnApiRequest, UnknownReference, check_script_name, parse_request, reaches_api
from .runtime import Runtime, build

log = logging.getLogger("regmw")

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]

_ADMITTED, _REFUSED, _INVALID = (metrics.requests.labels(outcome) for outcome in ("admitted", "refused", "invalid"))

_INTERNAL_ERROR = Refusal(500, "UNKNOWN", "internal error in registry middleware")
#: The app raised before it started its response (its traceback goes to the ``regmw`` logger, never the client).
_APP_ERROR = Refusal(500, "UNKNOWN", "internal error in the registry", reason="app_error")
_METRICS_DENIED = Refusal(403, "DENIED", "metrics are not served to this network")

#: The refusal reason when the refusal does not name one: after the step that refused.
_STEP_REASON = {"admit": "admission", "classify": "storage_unavailable", "route_db": "database_unavailable"}
_METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "PATCH", "DELETE"})
_STATUS_CLASS = {n: f"{n}xx" for n in range(1, 6)}
_START = "regmw.start"
_REFUSAL = "regmw.refusal"
_END = object()


class RegistryMiddleware:
    """Wrap a registry WSGI app (or two: ``apps={"old": ..., "new": ...}``).

    ``config`` is a TOML path, a dict of sections, a prepared
    :class:`~regmw.runtime.Runtime`, or None (``REGMW_CONFIG`` / defaults).
    When the request was classified and ``apps`` has an entry for its path,
    that app serves it; otherwise ``app`` does. A manifest read whose reference
    breaks the grammar is answered ``404 MANIFEST_UNKNOWN`` here, unless every
    app says ``forwards_unknown_references = True`` (the gateway: its upstream
    answers such reads as it always has).
    """

    def __init__(
        self,
        app: WSGIApp,
        config: str | os.PathLike | Mapping[str, Any] | Runtime | None = None,
        *,
        apps: Mapping[str, WSGIApp] | None = None,
        plugins: Iterable[Any] = (),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.app = app
        self.apps = dict(apps or {})
        self.runtime = config if isinstance(config, Runtime) else build(config, environ=environ, plugins=plugins, serving=True)
        self.services = self.runtime.services
        self.services.serving = True  # a background job here shares this process's locks and cache with requests
        hook = self.runtime.pm.hook
        # The plugin set is fixed once the runtime is built, so each decision
        # hook's call plan is made here, once (see _call_plan): hooks nobody
        # implements are skipped outright, the others called without pluggy's
        # per-call machinery unless a wrapper needs it. A plan takes the hook's
        # arguments positionally, in its spec's order.
        self._admit = _call_plan(hook.regmw_admit)
        self._classify = _call_plan(hook.regmw_classify)
        self._route_db = _call_plan(hook.regmw_route_db)
        # Observing hooks: one plugin's bug must not skip another's work there
        # (notifications store the event, dbroute records the write position).
        self._response_started = _call_plan(hook.regmw_response_started, isolate=True)
        self._finish_hook = _call_plan(hook.regmw_finish, isolate=True)
        self._confirm_writes = self.runtime.config["readonly"]["confirm_writes"]
        self._read_only = ReadOnlyCheck(self.services)
        serve = self.runtime.config["serve"]
        self.metrics_path = self.runtime.config["regmw"]["metrics_path"] or None
        # A registry front (the gateway) forwards a manifest read whose reference breaks the
        # grammar and lets its upstream answer; an in-process app never sees one (404 here).
        self.forward_unknown_references = all(
            getattr(each, "forwards_unknown_references", False) for each in (app, *self.apps.values()))
        self._metrics_app = make_wsgi_app(metrics.exposition_registry())
        self._metrics_allow = tuple(ipaddress.ip_network(net) for net in serve["metrics_allow"])  # defaults are str
        upstreams = [("upstream", self.app)] + [(f"upstream_{name}", app) for name, app in self.apps.items()]
        self._operator = {
            health.HEALTH_PATH: health.health_app,
            health.READY_PATH: health.ready_app(health.dependencies(self.services, upstreams)),
        }
        self._access_log = serve["access_log"]
        self._rid_header = serve["request_id_header"]
        self._rid_key = "HTTP_" + self._rid_header.upper().replace("-", "_")
        self._durations = metrics.Children(metrics.request_duration)
        self._refusals = metrics.Children(metrics.refusals)

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if not path.startswith("/v2"):
            if path == self.metrics_path:
                return self._metrics(environ, start_response)
            operator = self._operator.get(path)
            if operator is not None:
                return operator(environ, start_response)
            return self._pass_through(path, environ, start_response)
        start = time.perf_counter()
        rid = environ["regmw.request_id"] = accesslog.request_id(environ.get(self._rid_key))
        environ[self._rid_key] = rid  # a gateway forwards it upstream
        try:
            route = parse_request(environ)
        except NotAnApiRequest:
            return self._pass_through(path, environ, start_response)
        except UnknownReference as unknown:
            if not (unknown.forwardable and self.forward_unknown_references):
                _INVALID.inc()
                self._record(environ, start, "manifests", unknown.status, None, "invalid")
                return unknown(environ, start_response, [(self._rid_header, rid)])
            route = unknown.route
        except Refusal as refusal:
            return self._invalid(refusal, environ, start_response, start)

        context = RequestContext(environ, route, self.services)
        environ["regmw.context"] = context
        environ[_START] = start
        context.response_headers.append((self._rid_header, rid))
        step = "admit"
        try:
            if route.resource == "uploads" and environ.get("QUERY_STRING"):  # "fro%6D=" is from= too
                context.mount_from  # noqa: B018 - validates the mount source's name (NAME_INVALID)
            refusal = self._admit(context) if self._admit else None
            if refusal is None:
                if route.repository is not None and self._classify:
                    step = "classify"
                    context.migration_path = self._classify(context)
                if self._route_db:
                    step = "route_db"
                    context.db = self._route_db(context)
        except Refusal as raised:
            refusal = raised
            if refusal.code == "NAME_INVALID":
                step = "invalid"
        except Exception:
            log.exception("regmw hook failed for %s %s", context.method, path)
            refusal, step = _INTERNAL_ERROR, "internal"
        if refusal is not None:
            _REFUSED.inc()
            context.status = refusal.status
            environ[_REFUSAL] = refusal.reason or _STEP_REASON.get(step, step)
            self._finish(context)
            return refusal(environ, start_response, context.response_headers)

        _ADMITTED.inc()
        environ["regmw.db"] = context.db
        app = self.apps.get(context.migration_path, self.app) if self.apps else self.app
        response_started = self._response_started
        started = False  # the server's start_response was called (even if it raised: its status is set)
        confirm = context.is_write and self._confirm_writes and route.repository is not None
        replaced: list[Iterable[bytes]] = []  # the answer sent instead of the app's (see _confirm_write)

        def regmw_start_response(status: str, headers: list, exc_info: Any = None):
            nonlocal started
            if replaced:
                return _ignore_write
            context.status = int(status[:3])
            if confirm and (context.status == 201 or (context.method == "DELETE" and 200 <= context.status < 300)):
                late = self._confirm_write(context)
                if late is not None:
                    context.status = late.status
                    environ[_REFUSAL] = late.reason
                    started = True
                    replaced.append(late(environ, start_response, context.response_headers))
                    return _ignore_write
            ours = context.response_headers
            if ours:
                # regmw's own headers replace the app's of the same name (an upstream regmw or registry
                # echoing X-Request-Id, another layer's RateLimit-*): one value each, never two.
                names = {name.lower() for name, _ in ours}
                headers = [header for header in headers if header[0].lower() not in names] + ours
            else:
                headers = list(headers)
            try:
                if response_started:
                    response_started(context, context.status, headers)
            except Exception:
                log.exception("regmw_response_started failed for %s %s", context.method, path)
            started = True
            return start_response(status, headers, exc_info)

        body = None
        try:
            body = app(environ, regmw_start_response)
            if started:
                iterator = None
            else:
                # A generator app starts its response on the first iteration: take that step here,
                # so that an exception before its start_response is answered like one raised above.
                iterator = iter(body)
                first = next(iterator, _END)
                if first is not _END:
                    iterator = itertools.chain((first,), iterator)
        except BackendUnavailable as exc:
            # A plugin's "backend down" error (dbroute's PrimaryUnavailable or
            # ReplicaLost, say) raised by an app that did not answer it itself:
            # before the response started it is a 503 like any refusal, never a
            # 500 with a traceback. After that the server must see it.
            _discard(body)
            if started:
                self._failed(context)
                raise
            log.warning("%s %s: %s: %s", context.method, path, type(exc).__name__, exc)
            return self._answer(backend_unavailable(), context, start_response)
        except Exception:
            _discard(body)
            if started:
                self._failed(context)  # the server answers (its own 500 while no byte is sent)
                raise
            log.exception("the app failed before answering %s %s", context.method, path)
            return self._answer(_APP_ERROR, context, start_response)
        except BaseException:
            _discard(body)
            self._finish(context)
            raise
        if replaced:
            _discard(body)  # the app's success, which the client must not see (see _confirm_write)
            return _Closing(replaced[0], self._finish, context)
        if iterator is None:
            file_wrapper = environ.get("wsgi.file_wrapper")
            if (isinstance(file_wrapper, type) and isinstance(body, file_wrapper)
                    and _finish_on_close(body, self._finish, context)):
                return body  # the server's own type: it still recognises it and sends the file with sendfile
        return _Closing(body, self._finish, context, iterator)

    def _confirm_write(self, context: RequestContext) -> Refusal | None:
        """Whether a write the app has just completed may be acknowledged, checked before the client hears.

        A migration locks the repository, waits ``drain``, copies, verifies,
        marks it new and unlocks. A write admitted before the lock and slower
        than all that landed on the old side after the copy: acknowledging it
        would lose it. So before its success goes out, the repository must
        still be writable and classify to the side it was admitted to; if not,
        the client gets 503 and retries (on the new side). The classifier
        service (``services.classifier``) is asked again for this, with
        ``environ["regmw.confirming"]`` set and nothing prefetched. A lock
        store that cannot answer gets the ``[readonly]`` failure policy; a
        classification that fails, a 503.
        """
        repository = context.repository
        refusal = self._read_only(context)  # the admission's own check, its store-down policy included
        if refusal is not None and refusal.reason == "read_only":
            return _unconfirmed("became read-only", repository, self._read_only.policy["retry_after"])
        if refusal is not None:
            return refusal
        classifier = self.services.classifier
        if classifier is None or context.migration_path is None:
            return None
        context.environ["regmw.confirming"] = True
        context.prefetched = {}
        try:
            now = classifier.classify(context)
        except Exception as exc:  # a Refusal (storage down) included: the write's side is unknown
            log.warning("%s %s: cannot confirm the write's side: %s", context.method, repository, exc)
            return _unconfirmed("could not be confirmed", repository, 5)
        if now != context.migration_path:
            return _unconfirmed(f"moved ({context.migration_path} -> {now})", repository, 1)
        return None

    def _answer(self, refusal: Refusal, context: RequestContext, start_response: Callable) -> Iterable[bytes]:
        """The app raised before its response started: regmw answers (an OCI body), finished as a refusal."""
        context.status = refusal.status
        context.environ[_REFUSAL] = refusal.reason
        self._finish(context)
        return refusal(context.environ, start_response, context.response_headers)

    def _failed(self, context: RequestContext) -> None:
        """The app raised after calling start_response: the request failed (500), whatever it had said."""
        context.status = 500
        self._finish(context)

    def _pass_through(self, path: str, environ: dict, start_response: Callable) -> Iterable[bytes]:
        """Hand a non-API path to the app untouched, unless it only looks like one.

        ``/x/../v2/...`` (or ``/v2x/../v2/...``) would skip every check here and
        then be normalised into an API call by the app or an upstream; so would
        an API path that starts in ``SCRIPT_NAME``, which the gateway forwards in
        front of ``PATH_INFO`` (:func:`regmw.routes.check_script_name`).
        """
        if ("/." in path or "//" in path) and reaches_api(path):
            return self._invalid(name_invalid("path with dot or empty segments"), environ, start_response)
        script = environ.get("SCRIPT_NAME")
        if script:
            try:
                check_script_name(script, path)
            except Refusal as refusal:
                return self._invalid(refusal, environ, start_response)
        return self.app(environ, start_response)

    def _invalid(self, refusal: Refusal, environ: dict, start_response: Callable,
                 start: float | None = None) -> Iterable[bytes]:
        """Refuse a request that is not a valid API request: counted, logged and answered with its request id.

        Also for a path that only leads into the API (dot segments, an API path
        begun in ``SCRIPT_NAME``): a refusal the operator cannot see in the
        access log or ``regmw_refusals_total`` hides exactly these probes.
        """
        if start is None:
            start = time.perf_counter()
        rid = environ.get("regmw.request_id") or accesslog.request_id(environ.get(self._rid_key))
        environ["regmw.request_id"] = rid
        _INVALID.inc()
        self._record(environ, start, "invalid", refusal.status, None, refusal.reason or "invalid")
        return refusal(environ, start_response, [(self._rid_header, rid)])

    def _finish(self, context: RequestContext) -> None:
        if self._finish_hook:
            try:
                self._finish_hook(context, context.status)
            except Exception:
                log.exception("regmw_finish failed")
        environ = context.environ
        self._record(environ, environ[_START], context.resource, context.status, context,
                     environ.get(_REFUSAL), context.migration_path)

    def _record(self, environ: dict, start: float, resource: str, status: int | None, context: Any,
                refusal: str | None, migration_path: str | None = None) -> None:
        """The request's one duration observation, refusal count and access log line."""
        duration = time.perf_counter() - start
        method = environ.get("REQUEST_METHOD", "GET")
        status_class = _STATUS_CLASS.get(status // 100, "other") if status else "none"
        self._durations[(resource, method if method in _METHODS else "OTHER", status_class,
                         migration_path or "none")].observe(duration)
        if refusal is not None:
            self._refusals[(refusal,)].inc()
        if self._access_log and accesslog.access_log.isEnabledFor(logging.INFO):
            accesslog.access_log.info(accesslog.line(environ, status, duration, context, refusal))

    def _metrics(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        """Prometheus text on the API port, to ``[serve] metrics_allow`` peers only (never X-Forwarded-For)."""
        try:
            peer = ipaddress.ip_address(environ.get("REMOTE_ADDR") or "")
        except ValueError:
            peer = None
        if peer is not None and peer.version == 6 and peer.ipv4_mapped:
            peer = peer.ipv4_mapped  # ::ffff:127.0.0.1, an IPv4 peer of a server listening on ::
        if peer is None or not any(peer in network for network in self._metrics_allow):
            return _METRICS_DENIED(environ, start_response)
        return self._metrics_app(environ, start_response)


def backend_unavailable() -> Refusal:
    """The answer to a backend's "unavailable" error the app raised before its response started: 503."""
    return unavailable("a backend the registry needs is unavailable; retry the request", 5,
                       reason="backend_unavailable")


class _Closing:
    """The app's body iterable, with ``regmw_finish`` run once when the server closes it.

    ``iterator``: the body's own iterator when the middleware already took its
    first step (see ``__call__``); ``close`` is still the body's.
    Not used for the server's own ``wsgi.file_wrapper`` objects (see :func:`_finish_on_close`).
    """

    __slots__ = ("_body", "_finish", "_context", "_iterator")

    def __init__(self, body: Iterable[bytes], finish: Callable[[RequestContext], None], context: RequestContext,
                 iterator: Any = None):
        self._body, self._finish, self._context, self._iterator = body, finish, context, iterator

    def __iter__(self):
        return iter(self._body) if self._iterator is None else self._iterator

    def close(self) -> None:
        try:
            _close(self._body)
        finally:
            finish, self._finish = self._finish, None
            if finish is not None:
                finish(self._context)


def _unconfirmed(what: str, repository: str, retry_after: int) -> Refusal:
    """The 503 sent instead of a write's success whose repository changed while it ran."""
    return unavailable(f"the repository {what} while this write ran; retry it", retry_after, {"name": repository},
                       reason="write_unconfirmed")


def _ignore_write(data: bytes) -> None:
    """The ``write`` callable handed to an app whose answer was replaced: what it writes is dropped."""


def _close(body: Any) -> None:
    """PEP 3333: the app's iterable is closed (if it can be) whatever happened to the response."""
    close = getattr(body, "close", None)
    if close is not None:
        close()


def _discard(body: Any) -> None:
    """Close the body of an app that raised; a failing ``close`` is logged, the app's error is what counts."""
    try:
        _close(body)
    except Exception:
        log.exception("closing the body of an app that raised failed")


def _finish_on_close(body: Any, finish: Callable[[RequestContext], None], context: RequestContext) -> bool:
    """Hook ``regmw_finish`` into the ``close`` of the server's ``wsgi.file_wrapper`` object, in place.

    Wrapping it in :class:`_Closing` would hide its type from the server, which
    then copies the file through Python instead of sendfile (gunicorn checks
    ``isinstance(result, environ["wsgi.file_wrapper"])``). The server calls
    ``close`` once it has sent the file, as for any body; finish still runs
    exactly once. False when the object refuses a ``close`` attribute (slots):
    the caller then wraps it and the copy goes through Python.
    """
    original = getattr(body, "close", None)
    pending = [finish]

    def close() -> None:
        try:
            if original is not None:
                original()
        finally:
            if pending:
                pending.pop()(context)

    try:
        body.close = close
    except (AttributeError, TypeError):
        return False
    return True


def _call_plan(caller: Any, isolate: bool = False) -> Callable[..., Any] | None:
    """How to call one decision hook per request, worked out once at start-up.

    The plan takes the hook's arguments positionally, in its spec's order
    (``plan(context)``, ``plan(context, status)``): no keyword dict to pack
    and unpack per call. None when no plugin implements it. When some
    implementation is a wrapper (``hookwrapper=True`` or ``wrapper=True``),
    pluggy's own caller, which runs them, given the arguments by name.
    Otherwise a plain loop over the implementations in pluggy's order
    (``get_hookimpls()`` reversed: the last registered and ``tryfirst``
    first), passing each the arguments it names, stopping at the first
    non-None answer for a ``firstresult`` hook and otherwise collecting the
    non-None answers, as pluggy does. Measured (benchmarks/core_overhead.py
    ``--dispatch``): pluggy costs several times the loop per call, and the
    gap grows with each plugin. pluggy stays the registry and the contract;
    hook-call monitoring added after start-up (``pm.add_hookcall_monitoring``)
    does not see these calls.

    ``isolate`` (the observing hooks ``regmw_response_started`` and
    ``regmw_finish``, which return nothing): an implementation that raises
    is logged with its plugin's name and the next one still runs, so one
    plugin's bug never skips another plugin's work. With a wrapper among
    the implementations pluggy's executor runs them, each non-wrapper one
    isolated the same way (only a wrapper's own exception stops that call;
    the caller of the plan logs it).
    """
    impls = caller.get_hookimpls()
    if not impls:
        return None
    spec_names = tuple(caller.spec.argnames)  # every regmw hook has a spec (regmw.hookspecs)
    if any(impl.hookwrapper or impl.wrapper for impl in impls):
        if not isolate:

            def through_pluggy(*values: Any) -> Any:
                return caller(**dict(zip(spec_names, values, strict=True)))

            return through_pluggy
        hook_name, hookexec = caller.name, caller._hookexec  # what HookCaller.__call__ runs (pluggy >= 1.0)
        guarded = [impl if impl.hookwrapper or impl.wrapper else _isolated_impl(hook_name, impl) for impl in impls]

        def wrapped_isolated(*values: Any) -> Any:
            return hookexec(hook_name, guarded, dict(zip(spec_names, values, strict=True)), False)

        return wrapped_isolated
    # Per implementation, the positions of the arguments it names; None: it takes every
    # argument, in the spec's order (the usual case).
    calls = tuple((impl.function, None if tuple(impl.argnames) == spec_names
                   else tuple(spec_names.index(name) for name in impl.argnames))
                  for impl in reversed(impls))
    if caller.spec.opts.get("firstresult"):

        def first_result(*values: Any) -> Any:
            for function, picks in calls:
                result = function(*values) if picks is None else function(*[values[i] for i in picks])
                if result is not None:
                    return result
            return None

        return first_result

    if isolate:
        hook_name = caller.name
        context_at = spec_names.index("context") if "context" in spec_names else None
        labelled = tuple((_plugin_label(impl), function, picks)
                         for impl, (function, picks) in zip(reversed(impls), calls, strict=True))

        def each_isolated(*values: Any) -> list[Any]:
            for label, function, picks in labelled:
                try:
                    function(*values) if picks is None else function(*[values[i] for i in picks])
                except Exception:
                    _log_isolated_failure(hook_name, label, values[context_at] if context_at is not None else None)
            return []

        return each_isolated

    def all_results(*values: Any) -> list[Any]:
        results = []
        for function, picks in calls:
            result = function(*values) if picks is None else function(*[values[i] for i in picks])
            if result is not None:
                results.append(result)
        return results

    return all_results


def _isolated_impl(hook_name: str, impl: Any) -> Any:
    """A copy of a non-wrapper ``HookImpl`` whose function logs its own exception instead of raising it."""
    function, label = impl.function, _plugin_label(impl)
    position = impl.argnames.index("context") if "context" in impl.argnames else None

    def isolated(*args: Any) -> None:
        try:
            function(*args)
        except Exception:
            _log_isolated_failure(hook_name, label, args[position] if position is not None else None)

    guarded = copy.copy(impl)
    guarded.function = isolated
    return guarded


def _log_isolated_failure(hook_name: str, label: str, context: Any) -> None:
    log.exception("%s of plugin %s failed for %s %s; the other plugins' still ran", hook_name, label,
                  getattr(context, "method", "?"), getattr(context, "environ", {}).get("PATH_INFO", "?"))


def _plugin_label(impl: Any) -> str:
    """The name a log line gives a plugin: its registered name, or its class for an unnamed object."""
    if impl.plugin_name != str(id(impl.plugin)):
        return impl.plugin_name
    kind = type(impl.plugin)
    return f"{kind.__module__}.{kind.__qualname__}"

