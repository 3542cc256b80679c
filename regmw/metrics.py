"""Prometheus metrics (prometheus-client). Exposed by ``[regmw] metrics_path``."""
from __future__ import annotations

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
