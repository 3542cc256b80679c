"""Assemble and serve a regmw application: around an app, the reference registry, or as a gateway."""
from __future__ import annotations

import importlib
import logging
from typing import Any

from .errors import ConfigError
from .middleware import RegistryMiddleware
from .runtime import Runtime

log = logging.getLogger("regmw")


def make_application(runtime: Runtime, *, app: Any = None, registry_root: str | None = None) -> RegistryMiddleware:
    """The WSGI application ``regmw serve`` and ``regmw.wsgi`` run.

    Precedence: an explicit ``app``, then the reference registry on
    ``registry_root``, then the gateway to ``[gateway]`` upstreams.
    """
    apps: dict[str, Any] = {}
    if app is None and registry_root:
        from .demo.registry import create_app

        app = create_app(registry_root)
    if app is None:  # gateway mode; raises ConfigError naming [gateway] upstream when it is not set
        from .gateway import create_gateway

        app, apps = create_gateway(runtime.config)
    return RegistryMiddleware(app, runtime, apps=apps)


def load_app(spec: str) -> Any:
    """Import ``module:attribute`` (a WSGI app), or call ``module:factory()`` when given with ``()``."""
    module_name, _, attribute = spec.partition(":")
    call = attribute.endswith("()")
    try:
        target = getattr(importlib.import_module(module_name), attribute.removesuffix("()") or "app")
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--app {spec}: cannot load ({exc})") from None
    return target() if call else target


def serve(args) -> int:
    """``regmw serve``: gunicorn (:mod:`regmw.server`); the werkzeug server is only for ``regmw demo``."""
    from .server import run

    return run(args.config, args.host, args.port, app=args.app, registry_root=args.registry_root)
