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

import logging
import os

from .runtime import build
from .serve import make_application

_runtime = build(serving=True)
# This module is the process's entry point, so it may set the level of regmw's own loggers; a runtime
# built inside someone else's app (RegistryMiddleware, the Flask extension) leaves logging alone.
logging.getLogger("regmw").setLevel(_runtime.config["regmw"]["log_level"])
application = make_application(_runtime, registry_root=os.environ.get("REGMW_REGISTRY_ROOT"))
