"""OCI error responses and the exceptions that produce them.

Every refusal regmw makes reaches the client as an OCI distribution error body
(``{"errors": [{"code": ..., "message": ..., "detail": ...}]}``) with the right
status and headers, never as a traceback. Hooks refuse either by *returning* a
:class:`Refusal` (from ``regmw_admit``) or by *raising* one anywhere else.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any


def error_body(code: str, message: str, detail: Any = None, *, each: Iterable[Any] | None = None) -> bytes:
    """The one OCI error body regmw writes: ``{"errors":[{"code","message"[,"detail"]}]}``, compact JSON.

    Refusals, the gateway and the reference registry all build their bodies
    here, so every error a client sees from regmw has the same shape.
    ``each``: one error of ``code`` per detail in it instead, as distribution
    answers a manifest naming several unknown blobs.
    """
    errors = []
    for item in [detail] if each is None else each:
        error: dict[str, Any] = {"code": code, "message": message}
        if item is not None:
            error["detail"] = item
        errors.append(error)
    return json.dumps({"errors": errors}, separators=(",", ":")).encode()


class Refusal(Exception):
    """An OCI error answer: raise it from a hook, or return it from ``regmw_admit``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        detail: Any = None,
        headers: Iterable[tuple[str, str]] = (),
        retry_after: int | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        #: why, for the refusal metric and the access log (``rate_limit``, ``read_only``, ...);
        #: None lets the middleware name it after the step that refused
        self.reason = reason
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail
        self.headers = list(headers)
        if retry_after is not None:
            self.headers.append(("Retry-After", str(max(1, int(retry_after)))))

    def body(self) -> bytes:
        return error_body(self.code, self.message, self.detail)

    def __call__(self, environ: dict, start_response, extra_headers: Iterable[tuple[str, str]] = ()):
        """Answer as a WSGI application."""
        body = self.body()
        headers = [
            ("Content-Type", "application/json; charset=utf-8"),
            ("Content-Length", str(len(body))),
            ("Docker-Distribution-API-Version", "registry/2.0"),
            *self.headers,
            *extra_headers,
        ]
        start_response(f"{self.status} {status_phrase(self.status)}", headers)  # any status a hook picks
        return [body] if environ.get("REQUEST_METHOD") != "HEAD" else [b""]


def name_invalid(message: str, name: str | None = None) -> Refusal:
    return Refusal(400, "NAME_INVALID", message, detail={"name": name} if name else None)


def unavailable(message: str, retry_after: int, detail: Any = None, reason: str | None = None) -> Refusal:
    return Refusal(503, "UNAVAILABLE", message, detail=detail, retry_after=retry_after, reason=reason)


def too_many_requests(message: str, retry_after: int, headers: Iterable[tuple[str, str]] = ()) -> Refusal:
    return Refusal(429, "TOOMANYREQUESTS", message, headers=headers, retry_after=retry_after, reason="rate_limit")


#: The gateway's answer when its upstream sent nothing for ``[gateway] timeout`` (a page of the merged catalog too).
UPSTREAM_TIMED_OUT = Refusal(504, "UNAVAILABLE", "upstream registry did not answer in time")


def unreadable_body(exc: BaseException) -> str:
    """Why the server could not read a client's request body (the message of its 400).

    ``BlockingIOError``/``TimeoutError``: the client sent nothing for
    ``[serve] client_timeout`` (the connection's receive timeout expired);
    anything else: a bad chunk size or the connection ending mid-body.
    """
    if isinstance(exc, (BlockingIOError, TimeoutError)):
        return "request body stalled: the client sent nothing for the server's client_timeout"
    return f"request body is malformed or ended early ({type(exc).__name__})"


def status_phrase(status: int, unknown: str = "Unknown") -> str:
    """The standard reason phrase of ``status`` (``unknown`` for a code that has none)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return unknown


def exception_line(exc: BaseException) -> str:
    """``Type: first line of its text`` (its repr when it has none): an unexpected error, reported in one line."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else repr(exc)}"


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the key."""


class StorageError(RuntimeError):
    """The storage backend could not answer (timeout, 5xx, auth). Never means "absent"."""


class BackendUnavailable(RuntimeError):
    """A shared backend (Redis, a database) could not be reached in time."""


class SlotUnavailable(RuntimeError):
    """All ``max_holders`` slots of a cluster semaphore (or a lock) are held by others."""
