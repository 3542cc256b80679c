"""WSGI entry point for production servers.

``REGMW_CONFIG=regmw.toml gunicorn 'regmw.wsgi:application'`` serves the
gateway (``[gateway] upstream``), or the reference registry on
``REGMW_REGISTRY_ROOT``, behind regmw, with the configuration validated at import.
"""
from __future__ import annotations

import logging
import os

from .runtime import build
from .serve import make_application

_runtime = build()
# This module is the process's entry point, so it may set the level of regmw's own loggers; a runtime
# built inside someone else's app (RegistryMiddleware, the Flask extension) leaves logging alone.
logging.getLogger("regmw").setLevel(_runtime.config["regmw"]["log_level"])
application = make_application(_runtime, registry_root=os.environ.get("REGMW_REGISTRY_ROOT"))
