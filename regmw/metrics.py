"""Prometheus metrics (prometheus-client). Exposed by ``[regmw] metrics_path``."""
from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter

REGISTRY = CollectorRegistry(auto_describe=True)

requests = Counter(
    "regmw_requests_total", "API requests seen by regmw, by outcome.", ["outcome"], registry=REGISTRY
)
backend_errors = Counter(
    "regmw_backend_errors_total",
    "Errors talking to a shared backend, by backend and what regmw did about it.",
    ["backend", "action"],
    registry=REGISTRY,
)
classifications = Counter(
    "regmw_classifications_total", "Old/new decisions, by path and what decided.", ["path", "source"], registry=REGISTRY
)
storage_requests = Counter(
    "regmw_storage_requests_total", "Storage existence checks made (cache misses).", ["driver"], registry=REGISTRY
)


_last_logged: dict[str, float] = {}
_log_lock = threading.Lock()


def report_backend_error(
    backend: str, action: str, exc: BaseException, log: logging.Logger, interval: float = 1.0
) -> None:
    """Count a backend error in ``regmw_backend_errors_total``; log it at most once per ``interval`` per backend.

    While a backend is down (a Sentinel failover lasts seconds) every request
    meets the same error; one warning a second says as much as thousands.
    """
    backend_errors.labels(backend, action).inc()
    now = time.monotonic()
    with _log_lock:
        if now - _last_logged.get(backend, -interval) < interval:
            return
        _last_logged[backend] = now
    log.warning("%s backend unavailable (%s): %s: %s", backend, action, type(exc).__name__, exc)
