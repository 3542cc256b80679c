"""Test apps and process workers for the Redis plugin's tests (importable, so ``spawn`` can run them).

``make_middleware(url)`` builds the real middleware with ``[regmw] plugins = ["redis"]``
in front of :func:`registry_app`, a stand-in registry that answers 200/201 and,
when ``REGMW_TEST_ADMITTED`` names a Redis URL, counts every request it was
actually given (``test:admitted:<METHOD>``) so tests see what got through.
"""
from __future__ import annotations

import multiprocessing

import os
import time
from collections import Counter
from contextlib import contextmanager
from typing import Any

import redis
from werkzeug.test import Client

from regmw import RegistryMiddleware, hookimpl, repository_key


_clients: dict[str, redis.Redis] = {}


def registry_app(environ: dict, start_response) -> list[bytes]:
    url = environ.get("regmw.test.admitted_url")
    if url:
        if url not in _clients:
            _clients[url] = redis.Redis.from_url(url)
        _clients[url].incr(f"test:admitted:{environ['REQUEST_METHOD']}")
    status = "201 Created" if environ["REQUEST_METHOD"] in ("PUT", "POST") else "200 OK"
    start_response(status, [("Content-Type", "application/json")])
    return [b"{}"]


def class_key(context: Any) -> str | None:
    """The classification cache key the migration plugin would read (a stand-in)."""
    return repository_key(context.repository, "class") if context.repository else None


class PrefetchClassification:
    """A tiny plugin: declares :func:`class_key` for prefetch, as the migration plugin does."""

    @hookimpl
    def regmw_prefetch(self):
        return [class_key]


def redis_config(url: str, **sections: dict) -> dict:
    config: dict[str, dict] = {
        "regmw": {"plugins": ["redis"], "entry_points": False},
        "redis": {"url": url, "socket_timeout": 0.5, "connect_timeout": 0.5},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


def make_middleware(url: str, prefetch: bool = True, admitted_url: str | None = None, **sections: dict) -> RegistryMiddleware:
    app = registry_app
    if admitted_url:
        def app(environ, start_response):  # noqa: F811 - the counting variant
            environ["regmw.test.admitted_url"] = admitted_url
            return registry_app(environ, start_response)
    plugins = [PrefetchClassification()] if prefetch else []
    return RegistryMiddleware(app, redis_config(url, **sections), plugins=plugins, environ={})


# --- process workers (run under multiprocessing "spawn") ------------------------


def ratelimit_worker(url: str, hot_path: str, rule: dict, requests: int, results) -> None:
    middleware = make_middleware(url, redis={"hot_path": hot_path}, ratelimit={"rules": [rule]})
    client = Client(middleware)
    statuses = Counter(client.get("/v2/team/app/manifests/latest").status_code for _ in range(requests))
    results.put(dict(statuses))


def readonly_holder(url: str, repository: str, ttl: float, ready, release) -> None:
    middleware = make_middleware(url, prefetch=False)
    locks = middleware.services.locks
    with locks.hold_read_only(repository, ttl, owner="holder-process"):
        middleware.services.redis.client.set("test:holder:pid", os.getpid())
        ready.set()
        release.wait(120)  # until the test SIGKILLs us (or gives up)


def writer(url: str, repository: str, requests: int, results) -> None:
    middleware = make_middleware(url, prefetch=False, admitted_url=url)
    client = Client(middleware)
    statuses: Counter = Counter()
    for _ in range(requests):
        response = client.put(f"/v2/{repository}/manifests/latest", data=b"{}")
        statuses[response.status_code] += 1
        if response.status_code == 503:
            assert response.json["errors"][0]["code"] == "UNAVAILABLE"
            assert response.headers["Retry-After"].isdigit()
    results.put(dict(statuses))


def slot_worker(url: str, name: str, max_holders: int, successes: int, attempts: int, results) -> None:
    """Take ``name``'s slot ``successes`` times; inside, count holders in Redis and wait for company.

    Until some worker has been turned away (``test:slot:refused``), a holder stays
    inside: workers start staggered on a busy machine, and holders that left at
    once could let every later one in without a refusal. After the first refusal
    nobody waits (a worker left alone for its last turns must not).
    """
    from regmw_redis.locks import SlotUnavailable

    middleware = make_middleware(url, prefetch=False)
    locks = middleware.services.locks
    r = redis.Redis.from_url(url)
    done = refused = 0
    peak = 0
    for _ in range(attempts):
        if done >= successes:
            break
        try:
            with locks.cluster_slot(name, max_holders, ttl=10):
                inside = r.incr("test:slot:inside")
                peak = max(peak, inside)
                r.execute_command("WAIT", 0, 0)  # a round trip of "work"
                deadline = time.monotonic() + 60  # a bound, not a timing: the loop ends on the refusal
                while not int(r.get("test:slot:refused") or 0) and time.monotonic() < deadline:
                    peak = max(peak, int(r.get("test:slot:inside") or 0))
                peak = max(peak, int(r.get("test:slot:inside") or 0))
                r.decr("test:slot:inside")
                done += 1
        except SlotUnavailable:
            refused += 1
            r.incr("test:slot:refused")
            time.sleep(0.001)  # back off before retrying (not a timing assertion)
    results.put({"done": done, "refused": refused, "peak": peak})


def slot_holder(url: str, name: str, ttl: float, ready, release) -> None:
    middleware = make_middleware(url, prefetch=False)
    with middleware.services.locks.cluster_slot(name, 1, ttl=ttl):
        ready.set()
        release.wait(120)


SPAWN = multiprocessing.get_context("spawn")


def run_workers(target, args: tuple, count: int, timeout: float = 120.0) -> list:
    """Run ``count`` fresh processes of ``target(*args, results)``; return what each put on ``results``.

    Each worker puts exactly one outcome on the queue; every worker must exit 0.
    """
    results = SPAWN.Queue()
    workers = [SPAWN.Process(target=target, args=(*args, results)) for _ in range(count)]
    for process in workers:
        process.start()
    outcomes = [results.get(timeout=timeout) for _ in workers]
    for process in workers:
        process.join(30)
        assert process.exitcode == 0, f"worker exited with {process.exitcode}"
    return outcomes


@contextmanager
def holder_process(target, args: tuple):
    """Run ``target(*args, ready, release)`` in a fresh process; yield it once it set ``ready``.

    Tests SIGKILL it to play a dying holder; on exit it is killed if still
    alive. ``release`` is never set: after a SIGKILL the dead process may own
    the Event's lock.
    """
    ready, release = SPAWN.Event(), SPAWN.Event()
    holder = SPAWN.Process(target=target, args=(*args, ready, release))
    holder.start()
    try:
        assert ready.wait(30), "holder did not take its lock"
        yield holder
    finally:
        if holder.is_alive():
            holder.kill()
        holder.join(10)
