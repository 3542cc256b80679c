"""Flask extension: ``RegMW(app)`` or ``regmw.init_app(app)``.

Configuration comes from ``app.config``: ``REGMW_CONFIG`` (a TOML path),
``REGMW`` (a dict of sections), and flat keys with the environment's names
(``REGMW_REDIS_URL``, ``REGMW_PLUGINS``), which win over both.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from .context import RequestContext
from .middleware import RegistryMiddleware
from .runtime import build


class RegMW:
    def __init__(self, app: Any = None, *, plugins: Iterable[Any] = ()) -> None:
        self.plugins = list(plugins)
        self.middleware: RegistryMiddleware | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Any) -> None:
        flat = {key: value for key, value in app.config.items() if key.startswith("REGMW_") and key != "REGMW_CONFIG"}
        runtime = build(
            app.config.get("REGMW_CONFIG") or dict(app.config.get("REGMW", {})),
            environ={**os.environ, **flat},
            plugins=self.plugins,
        )
        self.middleware = RegistryMiddleware(app.wsgi_app, runtime)
        app.wsgi_app = self.middleware
        app.extensions["regmw"] = self


def current_context() -> RequestContext | None:
    """The regmw context of the current Flask request, if regmw handled it."""
    from flask import request

    return request.environ.get("regmw.context")
