"""One database server: its SQLAlchemy engines and the few queries routing needs.

Each node has two engines (the primary three). ``engine`` is the request pool the app uses.
``check_engine`` is a tiny separate pool for the health checker, so a request
pool exhausted under load never delays the check that would quarantine a
replica, and the checker never takes a connection a request needs. The
primary's third, ``position_engine`` (two connections), is where a write's
WAL position is read when the request holds no primary connection of its own,
so recording positions never waits for the request pool the writes themselves
hold, and never competes with the checker.
All carry libpq's ``connect_timeout`` so a dead server costs seconds, not a
hang, and a server-side ``statement_timeout``.

A connection whose server went away while it sat checked out (a restarted
primary, a terminated backend) fails its rollback when it returns to the pool.
SQLAlchemy's default reset logs that as an ERROR with a traceback; here the
pools reset connections themselves (:meth:`Node._reset_on_return`) and quietly
discard a dead one, which is what SQLAlchemy would do after its traceback.
"""
from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Connection, Engine, make_url

from .lsn import parse_lsn

log = logging.getLogger("regmw.dbroute")

#: SQL naming the server run a connection reached: its postmaster start time and address. A replay
#: position is only a lower bound for later reads on the SAME run (a restarted, replaced or other
#: server behind one URL may be behind it).
SERVER_SQL = ("pg_postmaster_start_time()::text || '@' || coalesce(host(inet_server_addr()), 'local') "
              "|| ':' || coalesce(inet_server_port(), 0)::text")
#: where a replica request connection keeps the server run it reached (``Connection.info``)
SERVER_KEY = "regmw_server"


def normalize_url(url: str) -> URL:
    """Accept ``postgres://`` and ``postgresql://``; always drive it with psycopg2."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1) if url.startswith("postgres://") else url)
    return parsed.set(drivername="postgresql+psycopg2")


def node_name(url: URL) -> str:
    """``host:port/db``: what logs, metrics and ``handle.name`` show (never the password)."""
    return f"{url.host or 'localhost'}:{url.port or 5432}/{url.database or ''}"


class Node:
    """A primary or a replica. Routing state lives in :mod:`.health`; this is the I/O side."""

    def __init__(self, url: str, role: str, settings: Any) -> None:
        self.url = normalize_url(url)
        self.raw_url = url
        self.role = role
        self.name = node_name(self.url)
        connect_args = {"connect_timeout": settings.connect_timeout, "application_name": f"regmw-{role}"}
        if settings.statement_timeout:
            connect_args["options"] = f"-c statement_timeout={int(settings.statement_timeout * 1000)}"
        self.engine: Engine = self._engine(
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            pool_timeout=settings.pool_timeout,
            pool_recycle=settings.pool_recycle,
            pool_pre_ping=settings.pre_ping,
            connect_args=connect_args,
        )
        if role == "replica":
            event.listen(self.engine, "connect", self._note_server)
        check_args = dict(connect_args, options=f"-c statement_timeout={settings.connect_timeout * 1000}")
        self.check_engine: Engine = self._engine(
            pool_size=1,
            max_overflow=1,
            pool_timeout=settings.connect_timeout,
            pool_pre_ping=True,
            connect_args=check_args,
        )
        self.position_engine: Engine | None = None
        if role == "primary":
            self.position_engine = self._engine(
                pool_size=2,
                max_overflow=0,
                pool_timeout=settings.pool_timeout,
                pool_recycle=settings.pool_recycle,
                pool_pre_ping=True,
                connect_args=check_args,
            )

    def _engine(self, **options: Any) -> Engine:
        engine = create_engine(self.url, pool_reset_on_return=None, **options)
        event.listen(engine, "reset", self._reset_on_return)
        return engine

    def _reset_on_return(self, dbapi_connection: Any, connection_record: Any, reset_state: Any) -> None:
        """SQLAlchemy's rollback-on-return, except that a dead connection is discarded without a traceback."""
        if reset_state.transaction_was_reset or not reset_state.asyncio_safe:
            return
        try:
            dbapi_connection.rollback()
        except Exception as exc:  # noqa: BLE001 - any failure: the connection cannot be reused
            log.debug("discarding a pooled connection to %s %s that failed its reset: %s",
                      self.role, self.name, str(exc).strip().splitlines()[0] if str(exc).strip() else exc)
            if connection_record is not None:
                connection_record.invalidate(exc)
            else:
                try:
                    dbapi_connection.close()
                except Exception:  # noqa: BLE001
                    pass

    @staticmethod
    def _note_server(dbapi_connection: Any, connection_record: Any) -> None:
        """Each new request connection to a replica notes the server run it reached (see :data:`SERVER_SQL`)."""
        try:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute(f"SELECT {SERVER_SQL}")
                connection_record.info[SERVER_KEY] = cursor.fetchone()[0]
            finally:
                cursor.close()
                dbapi_connection.rollback()
        except Exception as exc:  # noqa: BLE001 - unknown: the router asks again before trusting it
            log.debug("cannot read the server identity of a new replica connection: %s", exc)

    def current_wal_lsn(self, insert: bool = False, engine: Engine | None = None) -> int:
        """The primary's WAL position: ``pg_current_wal_insert_lsn()`` (a write's end) or ``_lsn()``."""
        with (engine or self.check_engine).connect() as conn:
            return wal_lsn_on(conn, insert, restore=False)  # closing the connection ends its transaction

    def replay_status(self, engine: Engine | None = None) -> tuple[bool, int | None]:
        """(in recovery?, ``pg_last_wal_replay_lsn()``) of a replica."""
        in_recovery, replayed, _ = self.replay_info(engine)
        return in_recovery, replayed

    def replay_info(self, engine: Engine | None = None) -> tuple[bool, int | None, str]:
        """(in recovery?, ``pg_last_wal_replay_lsn()``, the server run answering) of a replica."""
        with (engine or self.check_engine).connect() as conn:
            return replay_info_on(conn)

    def dispose(self) -> None:
        self.engine.dispose()
        self.check_engine.dispose()
        if self.position_engine is not None:
            self.position_engine.dispose()

    def __repr__(self) -> str:
        return f"<Node {self.role} {self.name}>"


def wal_lsn_on(conn: Connection, insert: bool = False, restore: bool = True) -> int:
    """``pg_current_wal_insert_lsn()`` (or ``pg_current_wal_lsn()``) read on an open connection.

    Leaves the connection's transaction state as it found it: a transaction
    this read had to begin is ended again (it only read), one the connection's
    owner had begun stays open.
    """
    function = "pg_current_wal_insert_lsn" if insert else "pg_current_wal_lsn"
    began = restore and not conn.in_transaction()
    try:
        value = conn.execute(text(f"SELECT {function}()::text")).scalar()
    finally:
        if began and conn.in_transaction():
            conn.rollback()
    return parse_lsn(value)  # type: ignore[return-value]


def replay_info_on(conn: Connection) -> tuple[bool, int | None, str]:
    """(in recovery?, replay position, server run) read on an open connection (its transaction ended again)."""
    began = not conn.in_transaction()
    try:
        row = conn.execute(text(f"SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, {SERVER_SQL}")).one()
    finally:
        if began and conn.in_transaction():
            conn.rollback()
    return bool(row[0]), parse_lsn(row[1]), row[2]
