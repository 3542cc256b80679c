"""WSGI entry point for production servers.

``REGMW_CONFIG=regmw.toml gunicorn 'regmw.wsgi:application'`` serves the
gateway (``[gateway] upstream``), or the reference registry on
``REGMW_REGISTRY_ROOT``, behind regmw, with the configuration validated at import.
"""
from __future__ import annotations

import os

from .runtime import build
from .serve import make_application

application = make_application(build(), registry_root=os.environ.get("REGMW_REGISTRY_ROOT"))
