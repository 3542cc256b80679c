"""Structured access logs: one JSON line per API request, with the decisions regmw took.

Written to the ``regmw.access`` logger at INFO when ``[serve] access_log`` is
on (``regmw serve`` sends that logger to stderr, message only). One line::

    {"ts": "2026-11-27T07:12:03.114Z", "request_id": "4f0c...", "method": "GET",
     "path": "/v2/team/app/manifests/latest", "status": 200, "duration_ms": 3.21,
     "client": "192.0.2.7", "repository": "team/app", "resource": "manifests",
     "migration_path": "new", "classified_by": "cache", "ratelimit_remaining": 97,
     "refusal": null, "db": "replica:caught-up"}

``migration_path``/``classified_by``: the classification and what decided it
(cache, storage, token, ...); ``ratelimit_remaining``: what the tightest rule
had left (null without rules); ``refusal``: why regmw answered itself
(rate_limit, read_only, invalid, storage_unavailable, ...); ``db``: the
database route as ``role:reason`` when a router chose one. The query string is
left out on purpose: upload Locations carry opaque ``_state`` tokens.
"""
from __future__ import annotations

import json
import logging
import random
import re
import time
from typing import Any

access_log = logging.getLogger("regmw.access")

#: Request ids need to be unique, not secret: Python's generator, reseeded in every forked
#: worker, instead of ``uuid4`` (``os.urandom`` is a getrandom() syscall that releases the GIL,
#: and under gunicorn's threads every release can hand the GIL to another thread and wait to
#: get it back: measured in docs/performance.md).
_random_bits = random.getrandbits

#: A client-supplied request id is kept only if it is short and plain (it ends up in logs).
_SANE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")


def request_id(supplied: str | None) -> str:
    """The client's (or a proxy's) id when it is sane, else a new random one."""
    if supplied and _SANE_ID.fullmatch(supplied):
        return supplied
    return f"{_random_bits(128):032x}"  # uuid4().hex's shape, without the syscall (see _random_bits)


def _timestamp(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def _remaining(headers: list[tuple[str, str]]) -> int | None:
    for name, value in headers:
        if name == "RateLimit-Remaining":
            return int(value)
    return None


def _db(handle: Any) -> str | None:
    if handle is None:
        return None
    role = getattr(handle, "role", None)
    reason = getattr(handle, "reason", None)
    if role is None:
        return type(handle).__name__
    return f"{role}:{reason}" if reason else str(role)


def line(environ: dict, status: int | None, duration: float, context: Any = None,
         refusal: str | None = None) -> str:
    """The JSON line for one request (``context`` is None when the path did not even parse)."""
    record: dict[str, Any] = {
        "ts": _timestamp(time.time()),
        "request_id": environ.get("regmw.request_id"),
        "method": environ.get("REQUEST_METHOD"),
        "path": environ.get("PATH_INFO"),
        "status": status,
        "duration_ms": round(duration * 1000, 3),
    }
    if context is None:
        record["client"] = environ.get("REMOTE_ADDR")
    else:
        record.update({
            "client": context.client,
            "repository": context.repository,
            "resource": context.resource,
            "migration_path": context.migration_path,
            "classified_by": environ.get("regmw.classified_by"),
            "ratelimit_remaining": _remaining(context.response_headers),
            "db": _db(context.db),
        })
    record["refusal"] = refusal
    return json.dumps(record, separators=(",", ":"))
