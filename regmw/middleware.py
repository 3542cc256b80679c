"""The WSGI middleware: one pass per request through the decision hooks.

::

    environ ─► parse OCI route ─► RequestContext ─► regmw_admit ─► regmw_classify
            ─► regmw_route_db ─► app (or the old/new app) ─► regmw_response_started
            ─► body streamed ─► regmw_finish

Paths outside ``/v2`` go straight to the app. A refusal at any step is answered
with an OCI error body, and the app is never called.
"""
from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import make_wsgi_app

from . import metrics
from .context import RequestContext
from .errors import Refusal, name_invalid
from .routes import NotAnApiRequest, UnknownReference, parse_request
from .runtime import Runtime, build

log = logging.getLogger("regmw")

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]

_ADMITTED, _REFUSED, _INVALID = (metrics.requests.labels(outcome) for outcome in ("admitted", "refused", "invalid"))

_INTERNAL_ERROR = Refusal(500, "UNKNOWN", "internal error in registry middleware")


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
        self.runtime = config if isinstance(config, Runtime) else build(config, environ=environ, plugins=plugins)
        self.services = self.runtime.services
        hook = self.runtime.pm.hook
        # Hooks nobody implements are skipped outright: the plugin set is fixed
        # once the runtime is built, and an empty pluggy call still costs ~2 us.
        self._admit = _implemented(hook.regmw_admit)
        self._classify = _implemented(hook.regmw_classify)
        self._route_db = _implemented(hook.regmw_route_db)
        self._response_started = _implemented(hook.regmw_response_started)
        self._finish_hook = _implemented(hook.regmw_finish)
        self.metrics_path = self.runtime.config["regmw"]["metrics_path"] or None
        # A registry front (the gateway) forwards a manifest read whose reference breaks the
        # grammar and lets its upstream answer; an in-process app never sees one (404 here).
        self.forward_unknown_references = all(
            getattr(each, "forwards_unknown_references", False) for each in (app, *self.apps.values()))
        self._metrics_app = make_wsgi_app(metrics.REGISTRY)

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if not path.startswith("/v2"):
            if path == self.metrics_path:
                return self._metrics_app(environ, start_response)
            return self._pass_through(path, environ, start_response)
        try:
            route = parse_request(environ)
        except NotAnApiRequest:
            return self._pass_through(path, environ, start_response)
        except UnknownReference as unknown:
            if not (unknown.forwardable and self.forward_unknown_references):
                _INVALID.inc()
                return unknown(environ, start_response)
            route = unknown.route
        except Refusal as refusal:
            _INVALID.inc()
            return refusal(environ, start_response)

        context = RequestContext(environ, route, self.services)
        environ["regmw.context"] = context
        try:
            if route.resource == "uploads" and "from=" in environ.get("QUERY_STRING", ""):
                context.mount_from  # noqa: B018 - validates the mount source's name (NAME_INVALID)
            refusal = self._admit(context=context) if self._admit else None
            if refusal is None:
                if route.repository is not None and self._classify:
                    context.migration_path = self._classify(context=context)
                if self._route_db:
                    context.db = self._route_db(context=context)
        except Refusal as raised:
            refusal = raised
        except Exception:
            log.exception("regmw hook failed for %s %s", context.method, path)
            refusal = _INTERNAL_ERROR
        if refusal is not None:
            _REFUSED.inc()
            context.status = refusal.status
            self._finish(context)
            return refusal(environ, start_response, context.response_headers)

        _ADMITTED.inc()
        environ["regmw.db"] = context.db
        app = self.apps.get(context.migration_path, self.app) if self.apps else self.app
        response_started = self._response_started

        def regmw_start_response(status: str, headers: list, exc_info: Any = None):
            context.status = int(status[:3])
            headers = list(headers)
            headers.extend(context.response_headers)
            try:
                if response_started:
                    response_started(context=context, status=context.status, headers=headers)
            except Exception:
                log.exception("regmw_response_started failed for %s %s", context.method, path)
            return start_response(status, headers, exc_info)

        try:
            body = app(environ, regmw_start_response)
        except BaseException:
            self._finish(context)
            raise
        return _Closing(body, self._finish, context)

    def _pass_through(self, path: str, environ: dict, start_response: Callable) -> Iterable[bytes]:
        """Hand a non-API path to the app untouched, unless it only looks like one.

        ``/x/../v2/...`` (or ``/v2x/../v2/...``) would skip every check here and
        then be normalised into an API call by the app or an upstream.
        """
        if ("/." in path or "//" in path) and _reaches_api(path):
            return name_invalid("path with dot or empty segments")(environ, start_response)
        return self.app(environ, start_response)

    def _finish(self, context: RequestContext) -> None:
        if not self._finish_hook:
            return
        try:
            self._finish_hook(context=context, status=context.status)
        except Exception:
            log.exception("regmw_finish failed")


class _Closing:
    """The app's body iterable, with ``regmw_finish`` run once when the server closes it."""

    __slots__ = ("_body", "_finish", "_context")

    def __init__(self, body: Iterable[bytes], finish: Callable[[RequestContext], None], context: RequestContext):
        self._body, self._finish, self._context = body, finish, context

    def __iter__(self):
        return iter(self._body)

    def close(self) -> None:
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            finish, self._finish = self._finish, None
            if finish is not None:
                finish(self._context)


def _implemented(caller: Any) -> Any:
    """The hook caller if any plugin implements the hook, else None."""
    return caller if caller.get_hookimpls() else None


def _reaches_api(path: str) -> bool:
    normalised = posixpath.normpath("/" + path.lstrip("/"))
    return normalised == "/v2" or normalised.startswith("/v2/")
