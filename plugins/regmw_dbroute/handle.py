"""The object the app gets as ``environ["regmw.db"]``: the database chosen for this request.

A connection error on the primary (a write, or a read that fell back) is
never retried: it surfaces as :class:`PrimaryUnavailable` (the primary is
marked down, and ``init_app`` answers 503 UNAVAILABLE).

Use ``handle.execute()``, ``handle.connect()`` or ``handle.session()`` rather
than ``handle.engine``: they carry one failure policy, the same on all three.

A read-only *unit of work* on a replica is one transaction: ``execute()``'s
own, or the current transaction of a ``connect()`` connection or of the
``session()``. When the replica fails with a connection error (refused,
dropped mid-query, the server stopped), the unit is retried once on the
primary, transparently, **as long as it has returned nothing to the app**.
Once a statement of the transaction has returned a result, the app holds
data from the replica's snapshot; running the rest on the primary would mix
two servers' snapshots in one transaction, so the failure surfaces as
:class:`ReplicaLost` instead (``regmw_dbroute.flask.init_app`` answers it
with an OCI 503 UNAVAILABLE). A new transaction (after ``commit()`` or
``rollback()``) starts again with nothing returned. Everything a handle
opened is closed when regmw finishes the request (``regmw_finish``).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection, Engine, Row
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from regmw.errors import BackendUnavailable

from .lsn import format_lsn
from .nodes import SERVER_KEY, replay_info_on

if TYPE_CHECKING:
    from .nodes import Node
    from .router import Router

log = logging.getLogger("regmw.dbroute")

#: errors that mean "this server is unreachable or went away", never "your SQL is wrong"
CONNECTION_ERRORS = (OperationalError, PoolTimeout)


class PrimaryUnavailable(BackendUnavailable):
    """The primary could not be reached; the write (or the fallback read) cannot be served."""


class ReplicaLost(BackendUnavailable):
    """The replica failed after this transaction had already returned results to the app.

    Retrying on the primary would mix two servers' snapshots in one
    transaction, so the read is not retried. Catch it to retry the whole unit
    of work (the handle now points at the primary), or let
    ``regmw_dbroute.flask.init_app`` answer 503 UNAVAILABLE with Retry-After.
    """


#: SQLSTATE of a statement cancelled by ``statement_timeout``: the query is slow, not the server
#: unreachable, and running it again on the primary would only double the load.
QUERY_CANCELED = "57014"


def is_connection_error(exc: BaseException) -> bool:
    """True if ``exc`` says the server cannot serve the statement (not: the SQL failed).

    Broad on purpose: a replica read failing so is retried on the primary,
    including a replica's own cancellations (a conflict with recovery is
    SQLSTATE 40001/40P01, an ``OperationalError`` too). Whether the *primary*
    went away is the narrower :func:`is_server_gone`.
    """
    if isinstance(exc, DBAPIError) and getattr(exc.orig, "pgcode", None) == QUERY_CANCELED:
        return False
    if isinstance(exc, CONNECTION_ERRORS):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def is_server_gone(exc: BaseException) -> bool:
    """True if a statement failed because its server went away: the connection was lost (SQLAlchemy
    invalidated it, or libpq failed with no SQLSTATE), or the server is shutting down (SQLSTATE
    class 08, 57P).

    psycopg2 also raises ``OperationalError`` for a lock timeout (55P03), a deadlock (40P01), a
    serialization failure (40001) or a full disk (53100): the statement failed on a working
    server. Marking the primary down for those would refuse every other write with 503.
    """
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    code = getattr(exc.orig, "pgcode", None)
    return isinstance(exc, OperationalError) and (code is None or code[:2] == "08" or code[:3] == "57P")




class DbHandle:
    """The routed database for one request.

    ``role`` is ``"primary"`` or ``"replica"`` (it becomes ``"primary"`` if a
    replica failed and the read fell back), ``name`` is ``host:port/db``, and
    ``reason`` says why this database was chosen (``write``, ``no-position``,
    ``caught-up``, ``replicas-behind``, ``store-unavailable``, ...).
    """

    def __init__(
        self, router: Router, node: Node, reason: str, repository: str | None = None,
        required: int | None = None, server: str | None = None,
    ) -> None:
        self._router = router
        self.node = node
        self.reason = reason
        self.repository = repository
        #: the position a replica must have replayed for this read, and the server run known to have it
        self.required = required
        self._server = server
        self._opened: list[RoutedConnection] = []
        self._session: RoutedSession | None = None

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

    def connect(self) -> RoutedConnection:
        """A connection to the chosen database, with the handle's failure policy (see the module doc).

        It behaves as a SQLAlchemy :class:`~sqlalchemy.engine.Connection`
        (``execute``, ``scalar``, ``scalars``, ``exec_driver_sql``, ``begin``,
        ``commit``, ``rollback``, ``close``; anything else is passed through).
        """
        conn = RoutedConnection(self, self._raw_connect())
        self._opened.append(conn)
        return conn

    def execute(self, statement: Any, parameters: Any = None) -> list[Row]:
        """Run one statement in its own transaction and return its rows (``[]`` if none).

        Nothing reaches the app before the rows are all read, so on a replica
        any connection failure (refused, dropped, cancelled by recovery) is
        retried once on the primary.
        """
        conn = self.connect()
        try:
            with conn.begin():
                result = conn.execute(statement, parameters)
                return list(result.all()) if result.returns_rows else []
        finally:
            conn.close()
            if conn in self._opened:
                self._opened.remove(conn)

    def session(self) -> RoutedSession:
        """A SQLAlchemy ORM session on this request's connection (one per handle), same failure policy."""
        if self._session is None:
            self._session = RoutedSession(self.connect())
        return self._session

    # --- the failure policy ------------------------------------------------------

    def _raw_connect(self) -> Connection:
        if self.node.role == "replica":
            try:
                conn = self.node.engine.connect()
            except CONNECTION_ERRORS as exc:
                self._fall_back(exc)
            else:
                try:
                    reached = self._reached(conn)
                except CONNECTION_ERRORS as exc:
                    conn.invalidate()
                    conn.close()
                    self._fall_back(exc)
                else:
                    if reached:
                        return conn
                    conn.close()
                    self.node = self._router.primary
        return self._connect_primary()

    def _reached(self, conn: Connection) -> bool:
        """Has the server ``conn`` reached replayed :attr:`required`?

        The router chose the replica on a replay position read from one server
        run; replay positions only grow on that run. A connection to another
        one (the replica restarted, was replaced behind its URL, or a pooler
        spreads connections over several servers) is asked itself, once per
        handle; if it is behind, the read goes to the primary.
        """
        if self.required is None or (self._server is not None and conn.info.get(SERVER_KEY) == self._server):
            return True
        in_recovery, replayed, server = replay_info_on(conn)
        conn.info[SERVER_KEY] = server
        if in_recovery and replayed is not None and replayed >= self.required:
            self._server = server
            return True
        log.info("replica %s: the server reached (%s) has not replayed %s; reading from the primary",
                 self.node.name, server, format_lsn(self.required))
        self.reason = "replicas-behind"
        return False

    def run(
        self, unit: RoutedConnection, call: Callable[[], Any], rebind: Callable[[Connection], None] | None = None
    ) -> Any:
        """``call()`` for ``unit``; a replica connection failure before anything was returned → once on the primary."""
        try:
            result = call()
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            if not unit.on_replica:  # the primary went away under a statement: never retried (a write)
                if not is_server_gone(exc):
                    raise  # a lock timeout, a deadlock, ...: the statement failed, the primary did not
                self._router.primary_failed(exc)
                raise PrimaryUnavailable(
                    f"database primary {unit.node.name} failed during a statement: {_first_line(exc)}"
                ) from exc
            if unit.delivered:
                self._router.replica_failed(unit.node, exc)
                unit.lost = True
                raise ReplicaLost(
                    f"replica {unit.node.name} failed after this transaction had returned results "
                    f"(not retried on the primary): {_first_line(exc)}"
                ) from exc
            self._fall_back(exc)
            primary = self._connect_primary()
            if rebind is not None:
                rebind(primary)  # a session ends its transaction on the dead connection, then switches
            else:
                unit.switch_to(primary)
            result = call()
        unit.delivered = True
        return result

    def _fall_back(self, exc: BaseException) -> None:
        log.warning("replica %s failed for a read (%s); retrying on the primary", self.node.name, _first_line(exc))
        if self.node.role == "replica":
            self._router.replica_failed(self.node, exc)
            self.node = self._router.primary
        self.reason = "replica-failed"

    def report_primary_failure(self, exc: BaseException) -> None:
        """A primary connection failed outside the handle's own calls (e.g. a write's statement)."""
        self._router.primary_failed(exc)

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
        for routed in reversed(self._opened):
            conn = routed.raw
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


class RoutedConnection:
    """A :class:`~sqlalchemy.engine.Connection` that follows the handle's failure policy.

    ``raw`` is the SQLAlchemy connection in use right now: after a fallback it
    is a connection to the primary. ``delivered`` is True once the current
    transaction returned a result; ``commit()``/``rollback()`` reset it.
    """

    def __init__(self, handle: DbHandle, conn: Connection) -> None:
        self._handle = handle
        self.raw = conn
        self.node = handle.node
        self.delivered = False
        self.lost = False

    @property
    def on_replica(self) -> bool:
        return self.node.role == "replica"

    def switch_to(self, conn: Connection) -> None:
        """Continue on ``conn`` (the primary); the dead replica connection is discarded."""
        old, self.raw, self.node = self.raw, conn, self._handle.node
        try:
            old.invalidate()
            old.close()
        except Exception:  # noqa: BLE001 - it is dead already
            log.debug("discarding a failed replica connection failed", exc_info=True)

    def _run(self, call: Callable[[], Any]) -> Any:
        return self._handle.run(self, call)

    def execute(self, statement: Any, parameters: Any = None, **kwargs: Any) -> Any:
        return self._run(lambda: self.raw.execute(statement, parameters, **kwargs))

    def exec_driver_sql(self, statement: str, parameters: Any = None, **kwargs: Any) -> Any:
        return self._run(lambda: self.raw.exec_driver_sql(statement, parameters, **kwargs))

    def scalar(self, statement: Any, parameters: Any = None, **kwargs: Any) -> Any:
        return self._run(lambda: self.raw.scalar(statement, parameters, **kwargs))

    def scalars(self, statement: Any, parameters: Any = None, **kwargs: Any) -> Any:
        return self._run(lambda: self.raw.scalars(statement, parameters, **kwargs))

    def begin(self) -> _Transaction:
        self.raw.begin()
        return _Transaction(self)

    def commit(self) -> None:
        """Commit; on a replica a lost connection only ends the transaction (a read has nothing to commit)."""
        try:
            self.raw.commit()
        except Exception as exc:
            if not (self.on_replica and is_connection_error(exc)):
                raise
            self._handle._router.replica_failed(self.node, exc)
            self.raw.rollback()
        finally:
            self.delivered = False

    def rollback(self) -> None:
        try:
            self.raw.rollback()
        finally:
            self.delivered = False

    def close(self) -> None:
        self.delivered = False
        self.raw.close()

    def __enter__(self) -> RoutedConnection:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:  # closed, invalidated, in_transaction, engine, info, ...
        return getattr(self.raw, name)

    def __repr__(self) -> str:
        return f"<RoutedConnection {self.node.role} {self.node.name}>"


class _Transaction:
    """What ``RoutedConnection.begin()`` returns: ends the transaction on whichever connection is current."""

    def __init__(self, conn: RoutedConnection) -> None:
        self._conn = conn

    def commit(self) -> None:
        self._conn.commit()

    def rollback(self) -> None:
        self._conn.rollback()

    def __enter__(self) -> _Transaction:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self._conn.rollback()


class RoutedSession(Session):
    """An ORM :class:`~sqlalchemy.orm.Session` on a :class:`RoutedConnection`, same failure policy.

    ``execute``, ``scalar`` and ``scalars`` (which ``Query``, ``get`` and lazy
    loads go through) run under the policy; on a fallback the session is
    rolled back (it holds nothing from the replica yet) and bound to the
    primary connection.
    """

    def __init__(self, conn: RoutedConnection) -> None:
        super().__init__(bind=conn.raw)
        self.routed = conn

    def _quiet_rollback(self) -> None:
        try:
            super().rollback()
        except Exception:  # noqa: BLE001 - the replica connection is dead
            log.debug("rolling back a session on a failed replica failed", exc_info=True)

    def _rebind(self, conn: Connection) -> None:
        """Continue on ``conn``: end the transaction on the dead connection, then bind the new one."""
        self._quiet_rollback()
        self.routed.switch_to(conn)
        self.bind = conn

    def _guard(self, call: Callable[[], Any]) -> Any:
        return self.routed._handle.run(self.routed, call, self._rebind)

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard(lambda: super(RoutedSession, self).execute(*args, **kwargs))

    def scalar(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard(lambda: super(RoutedSession, self).scalar(*args, **kwargs))

    def scalars(self, *args: Any, **kwargs: Any) -> Any:
        return self._guard(lambda: super(RoutedSession, self).scalars(*args, **kwargs))

    def commit(self) -> None:
        """Commit; on a replica a lost connection only ends the transaction (a read has nothing to commit)."""
        try:
            super().commit()
        except Exception as exc:
            if not (self.routed.on_replica and is_connection_error(exc)):
                raise
            self.routed._handle._router.replica_failed(self.routed.node, exc)
            self._quiet_rollback()
        finally:
            self.routed.delivered = False

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self.routed.delivered = False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
