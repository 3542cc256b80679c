"""Flask helpers for apps behind regmw's database routing.

::

    from regmw_dbroute.flask import db_session, engine, init_app

    init_app(app)                      # optional: PrimaryUnavailable → OCI 503

    @app.get("/v2/<path:name>/tags/list")
    def tags(name):
        rows = db_session().execute(select(Tag).where(Tag.repository == name)).scalars()

The session is bound to a connection of the routed database (so a replica
that cannot be reached falls back to the primary at connect time) and is
closed by regmw when the request finishes; no teardown handler is needed.
"""
from __future__ import annotations

from typing import Any

from regmw.errors import unavailable

from .handle import DbHandle, PrimaryUnavailable


def current_handle() -> DbHandle:
    """The handle regmw chose for this request (``environ["regmw.db"]``)."""
    from flask import request

    handle = request.environ.get("regmw.db")
    if isinstance(handle, DbHandle):
        return handle
    raise LookupError("no routed database for this request: is regmw with the dbroute plugin in front of the app?")


def db_session() -> Any:
    """The SQLAlchemy ``Session`` of this request, on the routed database."""
    return current_handle().session()


def engine() -> Any:
    """The routed engine (no replica → primary retry: prefer :func:`db_session` or ``handle.execute``)."""
    return current_handle().engine


def init_app(app: Any) -> None:
    """Answer :class:`PrimaryUnavailable` raised by a view with an OCI 503 UNAVAILABLE body."""

    def primary_unavailable(exc: PrimaryUnavailable):
        from flask import Response

        refusal = unavailable("database primary is unavailable", 5)
        return Response(refusal.body(), refusal.status, refusal.headers, content_type="application/json")

    app.register_error_handler(PrimaryUnavailable, primary_unavailable)
