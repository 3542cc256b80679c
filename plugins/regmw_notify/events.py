"""Build events in distribution's notification format from a request's context.

The envelope is ``{"events": [...]}`` with media type
``application/vnd.docker.distribution.events.v1+json``; each event has
``id``, ``timestamp``, ``action``, ``target``, ``request``, ``actor``,
``source`` as distribution sends them, so existing receivers work unchanged.
``actor.name`` is the subject of a *verified* token only (an unverified one
is anyone's claim).

Which requests make events (successful ones only):

=========================================  ========  ====================
request                                    status    action
=========================================  ========  ====================
PUT  /v2/<name>/manifests/<ref>            2xx       push
PUT  /v2/<name>/blobs/uploads/<id>?digest  2xx       push (a blob)
POST /v2/<name>/blobs/uploads/?digest=     2xx       push (monolithic)
POST /v2/<name>/blobs/uploads/?mount&from  201       mount
DELETE manifests / blobs                   2xx       delete
GET  manifests / blobs                     200       pull (``[notifications] pulls``)
=========================================  ========  ====================
"""
from __future__ import annotations

import json
import os
import uuid
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qs

from regmw.events import now_rfc3339, repository_event
from regmw.routes import DIGEST_RE

MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
BLOB_MEDIA_TYPE = "application/octet-stream"
INSTANCE_ID = str(uuid.uuid4())


def action_for(method: str, resource: str, status: int, query: str, pulls: bool = True) -> str | None:
    """The event action a finished request makes, or None (no event)."""
    if not 200 <= status < 300:
        return None
    if resource == "manifests":
        return {"PUT": "push", "DELETE": "delete", "GET": "pull" if pulls else None}.get(method)
    if resource == "blobs":
        return {"DELETE": "delete", "GET": "pull" if pulls else None}.get(method)
    if resource == "uploads":
        if method == "POST" and status == 201 and "mount=" in query and "from=" in query:
            return "mount"
        if method in ("PUT", "POST") and status == 201 and "digest=" in query:
            return "push"
    return None


def build_event(context: Any, status: int, headers: list[tuple[str, str]], action: str) -> dict[str, Any]:
    """One event for a request the middleware served (``context`` is a RequestContext)."""
    environ = context.environ
    repository = context.repository or ""
    response = {name.lower(): value for name, value in headers}
    reference = context.reference or ""
    digest = response.get("docker-content-digest") or ""
    tag = ""
    if context.resource == "manifests":
        if DIGEST_RE.fullmatch(reference):
            digest = digest or reference
        else:
            tag = reference
        # a push's is the manifest's (the request's); a pull's the answer's; a delete's answer has no manifest
        media_type = {"push": environ.get("CONTENT_TYPE"), "pull": response.get("content-type")}.get(action) or ""
    elif context.resource == "blobs":
        digest = digest or reference
        media_type = BLOB_MEDIA_TYPE
    else:  # uploads: the digest is in the query (completion, monolithic upload, mount)
        query = parse_qs(environ.get("QUERY_STRING", ""))
        digest = (query.get("digest") or query.get("mount") or [digest])[0]
        media_type = BLOB_MEDIA_TYPE
    size = _int(environ.get("CONTENT_LENGTH") if action == "push" else response.get("content-length"))
    host = environ.get("HTTP_HOST") or environ.get("SERVER_NAME", "")
    scheme = environ.get("wsgi.url_scheme", "http")
    kind = "manifests" if context.resource == "manifests" else "blobs"
    target: dict[str, Any] = {
        "mediaType": media_type, "size": size, "digest": digest, "length": size, "repository": repository,
        "url": f"{scheme}://{host}/v2/{repository}/{kind}/{digest or reference}",
    }
    if tag:
        target["tag"] = tag
    if action == "mount":
        target["fromRepository"] = context.mount_from or ""
    event_id = str(uuid.uuid4())
    return {
        "id": event_id,
        "timestamp": now_rfc3339(),
        "action": action,
        "target": target,
        "request": {
            "id": environ.get("HTTP_X_REQUEST_ID") or event_id,  # one event per request: its id names it
            "addr": _client_address(context),
            "host": host,
            "method": context.method,
            "useragent": environ.get("HTTP_USER_AGENT", ""),
        },
        "actor": {"name": context.subject or ""},
        "source": source(environ),
    }


def _client_address(context: Any) -> str:
    """The client behind ``[regmw] trusted_proxies`` (their X-Forwarded-For / Forwarded), else the socket peer."""
    clients = getattr(context.services, "clients", None)
    if clients is None:
        return context.environ.get("REMOTE_ADDR", "")
    return clients.client_address(context.environ)


def plugin_event(action: str, repository: str, **target: Any) -> dict[str, Any]:
    """An event a plugin emits (``repository migrated``, ``locked``, ...): the core's, with this instance's source."""
    return {**repository_event(action, repository, **target), "source": source({})}


def source(environ: dict) -> dict[str, str]:
    return dict(_source(environ.get("SERVER_NAME"), environ.get("SERVER_PORT")))  # a copy: wrappers may edit


@lru_cache(maxsize=64)
def _source(name: str | None, port: str | None) -> dict[str, str]:
    host = name or os.uname().nodename
    return {"addr": f"{host}:{port}" if port else host, "instanceID": INSTANCE_ID}


def envelope(events: list[dict[str, Any]]) -> bytes:
    """The POST body: distribution's ``{"events": [...]}``, compact JSON."""
    return json.dumps({"events": events}, separators=(",", ":")).encode()


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def envelope_raw(raw_events: list[bytes]) -> bytes:
    """The same body from events already serialised (as they sit in the queue): no re-encoding."""
    return b'{"events":[' + b",".join(raw_events) + b"]}"
