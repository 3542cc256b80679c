"""``/-/regmw/health`` and ``/-/regmw/ready``: is this process alive, can it serve right now?

``health`` answers 200 as long as the process answers HTTP at all (a liveness
probe: restart me when it fails). ``ready`` asks each dependency once, in
parallel, and answers 200 only when all of them answered (a readiness probe:
send me traffic). The dependencies are whatever the runtime holds that can be
asked: any backend (cache, locks, rate limiter, storage, admission, database
router) or app (a gateway upstream) with a ``ready()`` method (or ``ping()``),
which returns when reachable and raises otherwise. regmw never imports a plugin
to find out; a backend without such a method (the embedded in-process ones,
which cannot be unreachable) is not listed.

Body (``application/json``), 200 or 503::

    {"status": "ready" | "not ready",
     "checks": {"cache": {"ok": true, "ms": 0.41},
                "upstream": {"ok": false, "ms": 2.1, "error": "ConnectionRefusedError: ..."}}}

Two names for one backend object (``cache`` and ``locks`` are both the Redis
plugin's) are asked once and reported under the first name.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

HEALTH_PATH = "/-/regmw/health"
READY_PATH = "/-/regmw/ready"

#: A ready check that has not answered by then counts as down (a probe must not hang).
READY_TIMEOUT = 5.0


def probe_of(target: Any) -> Callable[[], Any] | None:
    """The target's ``ready()`` or ``ping()``, if it has one."""
    for name in ("ready", "ping"):
        method = getattr(target, name, None)
        if callable(method):
            return method
    return None


def dependencies(services: Any, apps: Iterable[tuple[str, Any]]) -> list[tuple[str, Callable[[], Any]]]:
    """(name, probe) for each distinct object that can be asked, in a stable order."""
    candidates = [
        ("cache", services.cache), ("locks", services.locks), ("rate_limiter", services.rate_limiter),
        ("storage", services.storage), ("admission", services.admission), ("database", services.db_router),
        *apps,
    ]
    seen: set[int] = set()
    checks = []
    for name, target in candidates:
        if target is None or id(target) in seen:
            continue
        seen.add(id(target))
        probe = probe_of(target)
        if probe is not None:
            checks.append((name, probe))
    return checks


def _timed(probe: Callable[[], Any]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        result = probe()
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"; say which
        return {"ok": False, "ms": _ms(start), "error": f"{type(exc).__name__}: {exc}"[:300]}
    if result is False:
        return {"ok": False, "ms": _ms(start), "error": "answered not ready"}
    return {"ok": True, "ms": _ms(start)}


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


def check_all(checks: list[tuple[str, Callable[[], Any]]], timeout: float = READY_TIMEOUT) -> dict[str, dict[str, Any]]:
    """Run every probe at once; one that has not answered within ``timeout`` is reported down."""
    if not checks:
        return {}
    pool = ThreadPoolExecutor(max_workers=len(checks), thread_name_prefix="regmw-ready")
    try:
        futures = [(name, pool.submit(_timed, probe)) for name, probe in checks]
        deadline = time.monotonic() + timeout
        results = {}
        for name, future in futures:
            try:
                results[name] = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                results[name] = {"ok": False, "ms": timeout * 1000, "error": f"no answer within {timeout:g}s"}
        return results
    finally:
        pool.shutdown(wait=False)


def answer(environ: dict, start_response: Callable, status: int, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body, separators=(",", ":")).encode()
    start_response("200 OK" if status == 200 else "503 Service Unavailable", [
        ("Content-Type", "application/json"), ("Content-Length", str(len(data))), ("Cache-Control", "no-store"),
    ])
    return [data] if environ.get("REQUEST_METHOD") != "HEAD" else [b""]


def health_app(environ: dict, start_response: Callable) -> list[bytes]:
    return answer(environ, start_response, 200, {"status": "ok"})


def ready_app(checks: list[tuple[str, Callable[[], Any]]]) -> Callable:
    def app(environ: dict, start_response: Callable) -> list[bytes]:
        results = check_all(checks)
        ok = all(result["ok"] for result in results.values())
        return answer(environ, start_response, 200 if ok else 503,
                      {"status": "ready" if ok else "not ready", "checks": results})
    return app
