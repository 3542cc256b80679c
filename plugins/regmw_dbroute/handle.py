"""The object the app gets as ``environ["regmw.db"]``: the database chosen for this request.

Use ``handle.connect()``, ``handle.execute()`` or ``handle.session()`` rather
than ``handle.engine`` when you can: they carry the failure policy. A replica
that cannot be reached (or drops the connection during ``execute``) is marked
failed and the read is retried on the primary, so the app sees a slower
answer, not an error. Everything a handle opened is closed when regmw finishes
the request (``regmw_finish``), so a forgotten connection goes back to its pool.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from regmw.errors import BackendUnavailable

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from .nodes import Node
    from .router import Router

log = logging.getLogger("regmw.dbroute")

#: errors that mean "this server is unreachable or went away", never "your SQL is wrong"
CONNECTION_ERRORS = (OperationalError, PoolTimeout)


class PrimaryUnavailable(BackendUnavailable):
    """The primary could not be reached; the write (or the fallback read) cannot be served."""


#: SQLSTATE of a statement cancelled by ``statement_timeout``: the query is slow, not the server
#: unreachable, and running it again on the primary would only double the load.
QUERY_CANCELED = "57014"


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, DBAPIError) and getattr(exc.orig, "pgcode", None) == QUERY_CANCELED:
        return False
    if isinstance(exc, CONNECTION_ERRORS):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


class DbHandle:
    """The routed database for one request.

    ``role`` is ``"primary"`` or ``"replica"`` (it becomes ``"primary"`` if a
    replica failed and the read fell back), ``name`` is ``host:port/db``, and
    ``reason`` says why this database was chosen (``write``, ``no-position``,
    ``caught-up``, ``replicas-behind``, ``store-unavailable``, ...).
    """

    def __init__(self, router: Router, node: Node, reason: str, repository: str | None = None) -> None:
        self._router = router
        self.node = node
        self.reason = reason
        self.repository = repository
        self._opened: list[Any] = []
        self._session: Session | None = None

    @property
    def role(self) -> str:
        return self.node.role

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def engine(self) -> Engine:
        """The chosen engine. Using it directly skips the replica → primary retry."""
        return self.node.engine

    def connect(self) -> Connection:
        """A connection to the chosen database; a replica that cannot be reached falls back to the primary."""
        if self.node.role == "replica":
            try:
                conn = self.node.engine.connect()
            except CONNECTION_ERRORS as exc:
                self._fall_back(exc)
                conn = self._connect_primary()
        else:
            conn = self._connect_primary()
        self._opened.append(conn)
        return conn

    def execute(self, statement: Any, parameters: Any = None) -> list[Row]:
        """Run one statement in its own transaction and return its rows (``[]`` if none).

        On a replica, a connection failure at any point (refused, dropped,
        cancelled by recovery) retries the statement once on the primary, which
        is safe because a replica handle only ever serves reads.
        """
        try:
            return self._execute_once(statement, parameters)
        except Exception as exc:
            if self.node.role != "replica" or not _is_connection_error(exc):
                raise
            self._fall_back(exc)
            return self._execute_once(statement, parameters)

    def _execute_once(self, statement: Any, parameters: Any) -> list[Row]:
        conn = self.connect()
        try:
            with conn.begin():
                result = conn.execute(statement, parameters)
                rows = list(result.all()) if result.returns_rows else []
            return rows
        finally:
            conn.close()
            if conn in self._opened:
                self._opened.remove(conn)

    def session(self) -> Session:
        """A SQLAlchemy ORM session bound to this request's connection (one per handle)."""
        if self._session is None:
            from sqlalchemy.orm import Session

            self._session = Session(bind=self.connect())
        return self._session

    def _fall_back(self, exc: BaseException) -> None:
        log.warning("replica %s failed for a read (%s); retrying on the primary", self.node.name, exc)
        self._router.replica_failed(self.node, exc)
        self.node = self._router.primary
        self.reason = "replica-failed"

    def _connect_primary(self) -> Connection:
        primary = self._router.primary
        try:
            return primary.engine.connect()
        except PoolTimeout as exc:  # this instance is busy; the primary is not down (primary_failed ignores it)
            raise PrimaryUnavailable(
                f"no free connection to the database primary {primary.name} within pool_timeout: {exc}"
            ) from exc
        except CONNECTION_ERRORS as exc:
            self._router.primary_failed(exc)
            raise PrimaryUnavailable(f"database primary {primary.name} is unavailable: {exc}") from exc

    def open_primary_connection(self) -> Connection | None:
        """A connection to the primary this handle holds open right now, if any (``None`` otherwise).

        The router reads a write's WAL position on it: the request already
        holds it, so recording the position needs no second pooled connection.
        """
        primary_engine = self._router.primary.engine
        for conn in reversed(self._opened):
            if conn.engine is primary_engine and not conn.closed and not conn.invalidated:
                return conn
        return None

    def close(self) -> None:
        """Return everything this handle opened to its pool (called by ``regmw_finish``)."""
        session, self._session = self._session, None
        if session is not None:
            try:
                session.close()
            except Exception:
                log.debug("closing a session failed", exc_info=True)
        while self._opened:
            conn = self._opened.pop()
            try:
                conn.close()
            except Exception:
                log.debug("closing a connection failed", exc_info=True)

    def __repr__(self) -> str:
        return f"<DbHandle {self.role} {self.name} ({self.reason})>"
