"""Batched background database migrations: what a plugin declares.

A plugin returns :class:`BatchedMigration` declarations from the
``regmw_batched_migrations`` hook; the ``db-migrations`` plugin keeps their
state in PostgreSQL, runs their batches as jobs (``services.jobs``) and
throttles them on replica lag (docs/db-migrations.md). The declaration lives
here, in the core, so a plugin declaring a migration never imports the plugin
that runs it.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

#: ``run(connection, start, stop)``: reshape the rows whose key is in ``[start, stop)``
BatchFunction = Callable[[Any, int, int], None]

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


@dataclass(frozen=True)
class BatchedMigration:
    """One migration: a batch function over an integer key range of one table.

    ``run(connection, start, stop)`` is called with a SQLAlchemy
    ``Connection`` to the primary, inside a transaction it must not commit,
    for the keys ``start <= key < stop`` of ``table.key``; it must be
    idempotent (a batch can run again after a crash or a failed attempt).
    The range ``[min(key), max(key)]`` is read when the migration starts and
    cut into batches of ``batch_size`` keys; rows inserted later with a
    greater key are not visited (the application writes new rows in the new
    shape already). ``max_attempts``: attempts per batch before the
    migration stops as ``failed`` (None: ``[db_migrations] max_attempts``).
    """

    name: str
    table: str
    key: str
    batch_size: int
    run: BatchFunction
    max_attempts: int | None = None
    description: str = ""


def collect_migrations(config: Any, pm: Any) -> dict[str, BatchedMigration]:
    """Every plugin's declarations by name; a bad or duplicate declaration is a ConfigError."""
    found: dict[str, BatchedMigration] = {}
    for group in pm.hook.regmw_batched_migrations(config=config):
        for migration in group or ():
            if not isinstance(migration, BatchedMigration):
                raise ConfigError(f"regmw_batched_migrations: {migration!r} is not a regmw.batched.BatchedMigration")
            if migration.name in found:
                raise ConfigError(f"regmw_batched_migrations: {migration.name!r} is declared twice")
            if not (_IDENTIFIER.match(migration.table) and _IDENTIFIER.match(migration.key)):
                raise ConfigError(f"regmw_batched_migrations: {migration.name!r}: table and key must be SQL "
                                  f"identifiers (got {migration.table!r}, {migration.key!r})")
            if migration.batch_size < 1 or (migration.max_attempts is not None and migration.max_attempts < 1):
                raise ConfigError(f"regmw_batched_migrations: {migration.name!r}: batch_size and max_attempts "
                                  "must be at least 1")
            found[migration.name] = migration
    return found
