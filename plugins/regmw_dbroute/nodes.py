"""One database server: its SQLAlchemy engines and the few queries routing needs.

Each node has two engines. ``engine`` is the request pool the app uses.
``check_engine`` is a tiny separate pool for the health checker, so a request
pool exhausted under load never delays the check that would quarantine a
replica, and the checker never takes a connection a request needs.
Both carry libpq's ``connect_timeout`` so a dead server costs seconds, not a
hang, and a server-side ``statement_timeout``.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, Engine, make_url

from .lsn import parse_lsn


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
        self.engine: Engine = create_engine(
            self.url,
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            pool_timeout=settings.pool_timeout,
            pool_recycle=settings.pool_recycle,
            pool_pre_ping=settings.pre_ping and role == "replica",
            connect_args=connect_args,
        )
        check_args = dict(connect_args, options=f"-c statement_timeout={settings.connect_timeout * 1000}")
        self.check_engine: Engine = create_engine(
            self.url,
            pool_size=1,
            max_overflow=1,
            pool_timeout=settings.connect_timeout,
            pool_pre_ping=True,
            connect_args=check_args,
        )

    def current_wal_lsn(self, insert: bool = False, engine: Engine | None = None) -> int:
        """The primary's WAL position: ``pg_current_wal_insert_lsn()`` (a write's end) or ``_lsn()``."""
        function = "pg_current_wal_insert_lsn" if insert else "pg_current_wal_lsn"
        with (engine or self.check_engine).connect() as conn:
            value = conn.execute(text(f"SELECT {function}()::text")).scalar()
        return parse_lsn(value)  # type: ignore[return-value]

    def replay_status(self, engine: Engine | None = None) -> tuple[bool, int | None]:
        """(in recovery?, ``pg_last_wal_replay_lsn()``) of a replica."""
        with (engine or self.check_engine).connect() as conn:
            row = conn.execute(text("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text")).one()
        return bool(row[0]), parse_lsn(row[1])

    def dispose(self) -> None:
        self.engine.dispose()
        self.check_engine.dispose()

    def __repr__(self) -> str:
        return f"<Node {self.role} {self.name}>"
