"""Prometheus metrics (prometheus-client), and the few calls plugins make to feed them.

Exposed on ``[serve] metrics_listen`` (a separate address, every worker's
figures) and, when ``[regmw] metrics_path`` is set, on the API port to the
``[serve] metrics_allow`` networks. The full list, with what each answers, is
in docs/operations.md.

Under ``regmw serve`` several gunicorn worker processes count at once:
prometheus-client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by
:mod:`regmw.server` before this module is imported) keeps each process's values
in a memory-mapped file and :func:`exposition_registry` sums them. Its mode is
chosen when prometheus-client is imported, which is why the server sets it up
first.

Per request the middleware touches pre-bound label children only (a dict
look-up instead of ``labels()``: a third of the cost, measured in the
middleware's docstring): see :class:`Children`.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Hashable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

#: Request durations: loopback manifest reads take ~1 ms, blob transfers minutes.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
#: Storage existence checks and upstream response heads: one small request each.
CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

requests = Counter(
    "regmw_requests_total", "API requests seen by regmw, by outcome.", ["outcome"], registry=REGISTRY
)
request_duration = Histogram(
    "regmw_request_duration_seconds",
    "API requests from arrival to the last body byte handed to the server, by resource, method, "
    "status class and migration path (none when not classified).",
    ["resource", "method", "status", "path"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
refusals = Counter(
    "regmw_refusals_total",
    "Requests regmw answered itself with an OCI error, by reason (rate_limit, read_only, invalid, "
    "storage_unavailable, ...).",
    ["reason"],
    registry=REGISTRY,
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
classification_cache = Counter(
    "regmw_classification_cache_total",
    "Classification look-ups by cache result (hit: answered from the cache or the admission's prefetch).",
    ["result"],
    registry=REGISTRY,
)
storage_requests = Counter(
    "regmw_storage_requests_total", "Storage existence checks made (cache misses).", ["driver"], registry=REGISTRY
)
storage_duration = Histogram(
    "regmw_storage_request_duration_seconds",
    "Storage existence checks, by driver, operation and outcome (ok, error).",
    ["driver", "operation", "outcome"],
    buckets=CALL_BUCKETS,
    registry=REGISTRY,
)
upstream_duration = Histogram(
    "regmw_upstream_response_seconds",
    "Gateway mode: from sending a request upstream (body included) to its response head, "
    "by upstream and status class.",
    ["upstream", "status"],
    buckets=CALL_BUCKETS + (60, 120, 300, 900),
    registry=REGISTRY,
)
upstream_errors = Counter(
    "regmw_upstream_errors_total",
    "Gateway mode: upstream failures, by upstream and kind (connect: 502, timeout: 504, body: broken mid-stream).",
    ["upstream", "kind"],
    registry=REGISTRY,
)
gateway_zero_copy_bytes = Counter(
    "regmw_gateway_zero_copy_bytes_total",
    "Gateway mode: response body bytes moved from the upstream to the client with splice, in the kernel "
    "(not copied through Python), by upstream.",
    ["upstream"],
    registry=REGISTRY,
)


class Children:
    """Label children of one metric, bound on first use and kept: ``children[labels].inc()``.

    ``labels()`` validates and hashes its arguments on every call; a request
    path that records several metrics would pay that each time. The label
    values used here come from small fixed sets (resource, method, status
    class, path), so the dict stays small.
    """

    __slots__ = ("_metric", "_bound", "_lock")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._bound: dict[Hashable, Any] = {}
        self._lock = threading.Lock()

    def __getitem__(self, labels: tuple[str, ...]) -> Any:
        try:
            return self._bound[labels]
        except KeyError:
            with self._lock:
                child = self._bound[labels] = self._metric.labels(*labels)
            return child


_classified = Children(classifications)
_cache_hit, _cache_miss = classification_cache.labels("hit"), classification_cache.labels("miss")


def classification(path: str, source: str, cache_hit: bool, context: Any = None) -> None:
    """Record one classification (the migration plugin calls this once per classified request).

    ``source`` is what decided (``cache``, ``storage``, ``token``, ...);
    ``cache_hit`` whether the repository's state came from the cache. With a
    ``context``, the access log line shows the decision too (the request's
    ``environ["regmw.classified_by"]``).
    """
    if context is not None:
        if context.environ.get("regmw.confirming"):
            return  # a write's second classification (RegistryMiddleware._confirm_write): counted once
        context.environ["regmw.classified_by"] = source
    _classified[(path, source)].inc()
    (_cache_hit if cache_hit else _cache_miss).inc()


_storage = Children(storage_duration)
_storage_count = Children(storage_requests)


class storage_request:  # noqa: N801 - used like the function it replaced: ``with storage_request(...)``
    """``with metrics.storage_request("gcs", "prefix_exists"):`` counts and times one storage check.

    A class rather than ``@contextmanager``: it runs once or twice per request
    for a repository not yet cached, and a generator context costs about
    twice as much to enter and leave.
    """

    __slots__ = ("driver", "operation", "start")

    def __init__(self, driver: str, operation: str) -> None:
        self.driver, self.operation = driver, operation

    def __enter__(self) -> None:
        _storage_count[(self.driver,)].inc()
        self.start = time.perf_counter()

    def __exit__(self, kind: Any, value: Any, traceback: Any) -> None:
        outcome = "ok" if kind is None else "error"
        _storage[(self.driver, self.operation, outcome)].observe(time.perf_counter() - self.start)


def exposition_registry() -> Any:
    """What to expose: every worker's values in multiprocess mode, else this process's :data:`REGISTRY`."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


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
    warn_at_most_every(interval, backend, log, "%s backend unavailable (%s): %s: %s", backend, action,
                       type(exc).__name__, exc)


def warn_at_most_every(interval: float, topic: str, log: logging.Logger, message: str, *args: Any) -> None:
    """``log.warning`` at most once per ``interval`` seconds per ``topic`` (the rest at DEBUG).

    For what any client can cause on every request (a backend that is down, a
    bad bearer token): one line a second tells the operator as much, and a
    client cannot flood the log.
    """
    now = time.monotonic()
    with _log_lock:
        quiet = now - _last_logged.get(topic, -interval) < interval
        if not quiet:
            _last_logged[topic] = now
    log.log(logging.DEBUG if quiet else logging.WARNING, message, *args)

