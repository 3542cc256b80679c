"""Flask helpers for apps behind regmw's database routing.

::

    from regmw_dbroute.flask import db_session, engine, init_app

    init_app(app)                      # PrimaryUnavailable, ReplicaLost → OCI 503

    @app.get("/v2/<path:name>/tags/list")
    def tags(name):
        rows = db_session().execute(select(Tag).where(Tag.repository == name)).scalars()

The session is the handle's :class:`~regmw_dbroute.handle.RoutedSession`:
the same failure policy as ``handle.execute()`` and ``handle.connect()`` (a
replica failing before the transaction returned anything → retried once on
the primary; after → :class:`~regmw_dbroute.handle.ReplicaLost`). regmw
closes it when the request finishes; no teardown handler is needed.
"""
from __future__ import annotations

from typing import Any

from regmw.errors import unavailable

from .handle import DbHandle, PrimaryUnavailable, ReplicaLost, is_connection_error, is_server_gone


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
    """Answer the database failures a view cannot recover from with an OCI 503 UNAVAILABLE body.

    * :class:`PrimaryUnavailable`: the primary (needed for a write, or for the fallback read) is down;
    * :class:`ReplicaLost`: the replica failed after the transaction had returned results;
    * a connection error SQLAlchemy raised itself: a write whose primary connection dropped
      (the primary is then marked down; a statement that failed on a working primary, such as a
      lock timeout or a deadlock, is left to the app's handlers: an OCI 500 from ``RegMW`` if it has none), or a streamed (server-side cursor) result of a
      replica failing while the view iterates it (the :class:`ReplicaLost` case).

    Any other exception is left to the app's handlers (``RegMW`` answers an API request's with an OCI 500).
    """
    from sqlalchemy.exc import DBAPIError

    def answer(message: str, database: str | None):
        from flask import Response

        refusal = unavailable(message, 5, {"database": database} if database else None)
        return Response(refusal.body(), refusal.status, refusal.headers, content_type="application/json")

    def primary_unavailable(exc: PrimaryUnavailable):
        return answer("database primary is unavailable", None)

    def replica_lost(exc: ReplicaLost):
        return answer("database replica failed during the read; retry the request", None)

    def database_error(exc: DBAPIError):
        from flask import request

        handle = request.environ.get("regmw.db")
        if not (isinstance(handle, DbHandle) and is_connection_error(exc)):
            raise exc
        if handle.role == "primary":
            if not is_server_gone(exc):  # a lock timeout, a deadlock: the statement failed, not the primary
                raise exc
            handle.report_primary_failure(exc)
        return answer("database connection lost; retry the request", handle.name)

    app.register_error_handler(PrimaryUnavailable, primary_unavailable)
    app.register_error_handler(ReplicaLost, replica_lost)
    app.register_error_handler(DBAPIError, database_error)
