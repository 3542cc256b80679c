"""Events that plugins make (``repository migrated``, ``locked``, ``unlocked``), in distribution's format.

Request events are built by the notifications plugin from a request's
context; events that no request carries (a migration job, an operator's
``regmw readonly set``) are built here, so that every plugin that emits one
through ``services.events`` sends the same shape without importing the
notifications plugin: ``id``, ``timestamp``, ``action``, ``target`` (with
``repository``), ``request`` (empty), ``actor`` (the operator or job, when
known) and ``source``.
"""
from __future__ import annotations

import logging
import socket
import time
import uuid
from typing import Any

log = logging.getLogger("regmw.events")

#: what receivers get in ``action`` for the plugin events regmw itself emits
LOCKED, UNLOCKED, MIGRATED = "locked", "unlocked", "migrated"


def now_rfc3339() -> str:
    """``2026-11-27T07:00:00.123456Z`` (UTC, microseconds), cheaply: it runs on every write request."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + ".%06dZ" % int(now % 1 * 1_000_000)


def repository_event(action: str, repository: str, *, event_id: str | None = None, actor: str = "",
                     **target: Any) -> dict[str, Any]:
    """An event about ``repository``; ``event_id`` fixed by the caller makes re-emits de-duplicate."""
    return {
        "id": event_id or str(uuid.uuid4()),
        "timestamp": now_rfc3339(),
        "action": action,
        "target": {"repository": repository, "mediaType": "", **target},
        "request": {},
        "actor": {"name": actor},
        "source": {"addr": socket.gethostname(), "instanceID": ""},
    }


def emit(services: Any, event: dict[str, Any]) -> bool:
    """Hand ``event`` to ``services.events`` if a sink is configured; False (logged) when it refused.

    The caller's action has already happened (a lock was taken), so a sink
    that cannot take the event must not undo it: it is logged as lost here
    and counted by the sink itself.
    """
    sink = getattr(services, "events", None)
    if sink is None:
        return False
    try:
        sink.emit(event)
    except Exception:  # noqa: BLE001 - any sink's failure: the action stands, the event is reported
        log.exception("event %s %s for %s was not accepted by the event sink", event["action"], event["id"],
                      event["target"].get("repository"))
        return False
    return True
