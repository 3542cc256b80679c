"""Flask extension, by Flask's conventions: ``RegMW(app)``, or ``regmw = RegMW()`` then ``regmw.init_app(app)``.

One extension object may serve several apps (an app factory, tests creating
many apps in one process): everything built for an app lives in
``app.extensions["regmw"]`` (a :class:`RegMWState`), never on the extension
object, so two apps never share a runtime by accident.

Configuration comes from ``app.config``, as configuration (it is validated
against the schema like a file, and wins over the file):

- ``REGMW_CONFIG``: a TOML file (else the extension's ``config`` argument,
  else the file named by the ``REGMW_CONFIG`` environment variable, as for
  :class:`~regmw.middleware.RegistryMiddleware`);
- ``REGMW``: a dict of sections, ``{"redis": {"url": "redis://..."}}``;
- flat keys with the names of the environment overrides, e.g.
  ``REGMW_REDIS_URL`` for ``[redis] url`` (``REGMW_PLUGINS`` for ``[regmw]
  plugins``); they win over ``REGMW``. A ``REGMW_`` key that names no option
  is an error, like an unknown key in a file.

The process environment (``REGMW_<SECTION>_<KEY>``) still wins over all of
them, as for every other way of running regmw. Building the runtime leaves
the app's logging configuration alone.

A view that raises :class:`~regmw.errors.BackendUnavailable` (a shared
backend down: Redis behind ``cluster_slot``, dbroute's ``PrimaryUnavailable``)
on an API request is answered ``503 UNAVAILABLE`` with an OCI body and
``Retry-After``, as :class:`~regmw.middleware.RegistryMiddleware` answers a
plain WSGI app that raises it (Flask would otherwise turn it into its own
500 page before regmw sees it). A handler the app (or a blueprint, or a
plugin's ``init_app``) registers for it, or for a subclass, takes precedence.

Any other exception of a view on an API request is answered with the
middleware's OCI ``500 UNKNOWN`` body (refusal reason ``app_error``), not
Flask's HTML page, which no registry client can read: Flask still logs the
traceback (``app.logger``), and none of it is sent. The app's own handler for
500 (``app.errorhandler(500)``, registered before or after ``init_app``) or
for the exception's class takes precedence, and paths outside ``/v2`` keep
Flask's page. When Flask lets the exception propagate
(``PROPAGATE_EXCEPTIONS``, on with ``TESTING`` or ``DEBUG``) the middleware
answers it the same way and logs the traceback on the ``regmw`` logger: a
test client gets that 500, not the exception.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .config import env_name, load_toml, merge
from .context import RequestContext
from .errors import BackendUnavailable, ConfigError
from .middleware import _APP_ERROR, _REFUSAL, RegistryMiddleware, backend_unavailable
from .runtime import Runtime, build, gather_sections

EXTENSION = "regmw"

log = logging.getLogger("regmw")


@dataclass
class RegMWState:
    """What the extension built for one app: ``app.extensions["regmw"]``."""

    runtime: Runtime
    middleware: RegistryMiddleware


class RegMW:
    """The regmw Flask extension.

    ``config`` (a TOML path or a dict of sections) is the base configuration
    for every app this extension initialises; each app's ``app.config`` is
    laid over it. ``plugins`` are plugin objects registered for every app.
    """

    def __init__(
        self,
        app: Any = None,
        *,
        config: str | os.PathLike | Mapping[str, Any] | None = None,
        plugins: Iterable[Any] = (),
    ) -> None:
        self.config = config
        self.plugins = list(plugins)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Any) -> RegMWState:
        """Build this app's runtime from its ``app.config`` and wrap ``app.wsgi_app``; refuse a second call."""
        if EXTENSION in app.extensions:
            raise RuntimeError("regmw is already initialised on this app")
        base = app.config.get("REGMW_CONFIG") or self.config or os.environ.get("REGMW_CONFIG") or {}
        flat = {key: value for key, value in app.config.items() if key.startswith("REGMW_") and key != "REGMW_CONFIG"}
        overrides = merge(dict(app.config.get("REGMW") or {}), self._sections_of(flat, base, app.config))
        runtime = build(base, plugins=self.plugins, overrides=overrides, serving=True)
        state = RegMWState(runtime, RegistryMiddleware(app.wsgi_app, runtime))
        app.wsgi_app = state.middleware
        app.extensions[EXTENSION] = state
        if BackendUnavailable not in app.error_handler_spec[None][None]:
            app.register_error_handler(BackendUnavailable, _answer_backend_unavailable)
        if 500 not in app.error_handler_spec[None]:
            app.register_error_handler(500, _answer_internal_error)
        return state

    def _sections_of(self, flat: Mapping[str, Any], base: Any, app_config: Mapping[str, Any]) -> dict[str, Any]:
        """``{"REGMW_REDIS_URL": v}`` → ``{"redis": {"url": v}}``, using the sections the enabled plugins declare."""
        if not flat:
            return {}
        from .plugins import manager_for

        given = merge(dict(base) if isinstance(base, Mapping) else load_toml(base), app_config.get("REGMW") or {})

        core = dict(given.get("regmw") or {})
        for key in ("plugins", "entry_points", "disable_plugins"):  # what decides which plugins load
            if env_name("regmw", key) in flat:
                core[key] = flat[env_name("regmw", key)]
        pm = manager_for({**given, "regmw": core}, os.environ, self.plugins, "<app.config>")
        names = {env_name(section.name, key): (section.name, key)
                 for section in gather_sections(pm).values() for key in section.options}
        out: dict[str, dict[str, Any]] = {}
        for name, value in flat.items():
            if name not in names:
                raise ConfigError(f"app.config: {name} names no option of the enabled plugins")
            section, key = names[name]
            out.setdefault(section, {})[key] = value
        return out


def _answer_backend_unavailable(exc: BackendUnavailable) -> Any:
    """A view's ``BackendUnavailable`` on an API request: the middleware's 503, counted the same way."""
    from flask import request

    environ = request.environ
    if "regmw.context" not in environ:
        raise exc  # not a request regmw handled: Flask's own handling
    log.warning("%s %s: %s: %s", request.method, request.path, type(exc).__name__, exc)
    refusal = backend_unavailable()
    environ[_REFUSAL] = refusal.reason
    return refusal  # a WSGI app: Flask runs it, so the body and headers are the middleware's own


def _answer_internal_error(error: Any) -> Any:
    """Flask's 500 for an API request (a view raised, or aborted with 500): the middleware's OCI 500 body.

    Flask has logged the exception already; the client gets no part of it.
    Off the API, Flask's own page (returning the error renders it).
    """
    from flask import request

    environ = request.environ
    if "regmw.context" not in environ:
        return error
    environ[_REFUSAL] = _APP_ERROR.reason
    return _APP_ERROR


def state(app: Any = None) -> RegMWState:
    """``app.extensions["regmw"]`` of ``app`` (default: the current app)."""
    if app is None:
        from flask import current_app

        app = current_app
    return app.extensions[EXTENSION]


def current_context() -> RequestContext | None:
    """The regmw context of the current Flask request, or None for a request regmw did not handle.

    regmw handles every API request (under ``/v2``) it lets through; paths
    outside ``/v2`` get None. Outside a request (no request context: at import,
    in a CLI command, in a thread without ``copy_current_request_context``) it
    raises Flask's ``RuntimeError: Working outside of request context``.
    """
    from flask import request

    return request.environ.get("regmw.context")
