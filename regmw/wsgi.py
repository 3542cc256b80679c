"""WSGI entry point for running regmw under a server of your choice.

``REGMW_CONFIG=regmw.toml gunicorn 'regmw.wsgi:application'`` serves the
gateway (``[gateway] upstream``), or the reference registry on
``REGMW_REGISTRY_ROOT``, behind regmw, with the configuration validated at import.

``regmw serve`` (:mod:`regmw.server`) is the supported production server: it
also sets up what this entry point leaves to you. With several worker
processes, export ``PROMETHEUS_MULTIPROC_DIR`` (an empty directory) before the
server starts, or each worker's metrics path shows only that worker's figures;
``[serve] metrics_listen`` is served only by ``regmw serve``.
"""
from __future__ import annotations

import os

from .runtime import build
from .serve import make_application

application = make_application(build(), registry_root=os.environ.get("REGMW_REGISTRY_ROOT"))
