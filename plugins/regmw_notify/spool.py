"""The local on-disk spool: SQLite in WAL mode, one file per process.

Two uses, one format:

- with Redis, events wait here while Redis is unreachable and a forwarder
  moves them to their streams, oldest first, once it is back;
- without Redis (the embedded default, ``regmw demo``), the spool *is* the
  queue: delivery lanes read it by sequence number and keep a cursor per
  endpoint.

Durability: ``synchronous=FULL`` makes every commit fsync the WAL, so an
appended event survives the process and the machine crashing. Each process
takes a file nobody else holds (``spool-N.sqlite3``, with an ``flock`` on a
sibling lock file); the lock dies with its process, so the next process to
start adopts a crashed one's file and forwards what it left.
"""
from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, repository TEXT NOT NULL,
                                   data BLOB NOT NULL, enqueued REAL NOT NULL, only TEXT);
CREATE TABLE IF NOT EXISTS cursors (endpoint TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dead (seq INTEGER PRIMARY KEY AUTOINCREMENT, endpoint TEXT NOT NULL,
                                 event_seq INTEGER NOT NULL, data BLOB NOT NULL, reason TEXT NOT NULL,
                                 parked REAL NOT NULL);
CREATE TABLE IF NOT EXISTS endpoint_state (endpoint TEXT PRIMARY KEY, paused INTEGER NOT NULL DEFAULT 0,
                                           disabled TEXT NOT NULL DEFAULT '');
"""


@dataclass(frozen=True)
class Row:
    seq: int
    repository: str
    data: bytes
    enqueued: float
    only: str | None = None  # a replayed dead letter: for this endpoint only


class Spool:
    """An append-only event file with ordered reads (thread-safe)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def append(self, repository: str, data: bytes, enqueued: float, only: str | None = None) -> int:
        """Store one event durably (fsynced) and return its sequence number."""
        with self._lock:
            return self._db.execute("INSERT INTO events (repository, data, enqueued, only) VALUES (?, ?, ?, ?)",
                                    (repository, data, enqueued, only)).lastrowid

    def read(self, after: int, limit: int) -> list[Row]:
        with self._lock:
            rows = self._db.execute("SELECT seq, repository, data, enqueued, only FROM events WHERE seq > ? "
                                    "ORDER BY seq LIMIT ?", (after, limit)).fetchall()
        return [Row(seq, repo, bytes(data), enqueued, only) for seq, repo, data, enqueued, only in rows]

    def delete_through(self, seq: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM events WHERE seq <= ?", (seq,))

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT count(*) FROM events").fetchone()[0]

    def count_after(self, seq: int) -> int:
        """Events after ``seq`` (an endpoint's cursor): what it has not acknowledged yet."""
        with self._lock:
            return self._db.execute("SELECT count(*) FROM events WHERE seq > ?", (seq,)).fetchone()[0]

    def oldest(self) -> float | None:
        with self._lock:
            return self._db.execute("SELECT min(enqueued) FROM events").fetchone()[0]

    # --- the embedded queue: cursors, dead letters, endpoint state -----------------

    def cursor(self, endpoint: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT seq FROM cursors WHERE endpoint = ?", (endpoint,)).fetchone()
        return row[0] if row else 0

    def advance(self, endpoint: str, seq: int, parked: list[tuple[Row, str]] = ()) -> None:
        """Move ``endpoint``'s cursor to ``seq``, parking ``parked`` rows in the same transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for row, reason in parked:
                    self._db.execute("INSERT INTO dead (endpoint, event_seq, data, reason, parked) "
                                     "VALUES (?, ?, ?, ?, strftime('%s','now'))", (endpoint, row.seq, row.data, reason))
                self._db.execute("INSERT INTO cursors (endpoint, seq) VALUES (?, ?) ON CONFLICT(endpoint) "
                                 "DO UPDATE SET seq = max(seq, excluded.seq)", (endpoint, seq))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def trim(self, endpoints: list[str]) -> None:
        """Delete events every endpoint in ``endpoints`` is past (never an undelivered one)."""
        if not endpoints:
            return
        cursors = [self.cursor(name) for name in endpoints]
        self.delete_through(min(cursors))

    def dead(self, endpoint: str | None = None) -> list[tuple[int, str, bytes, str]]:
        with self._lock:
            query = "SELECT seq, endpoint, data, reason FROM dead"
            args: tuple = ()
            if endpoint:
                query, args = query + " WHERE endpoint = ?", (endpoint,)
            return [(seq, ep, bytes(data), reason) for seq, ep, data, reason in
                    self._db.execute(query + " ORDER BY seq", args).fetchall()]

    def drop_dead(self, seq: int, endpoint: str) -> bool:
        """Delete ``endpoint``'s dead letter ``seq`` (another endpoint's letter of that number stays)."""
        with self._lock:
            return self._db.execute("DELETE FROM dead WHERE seq = ? AND endpoint = ?", (seq, endpoint)).rowcount > 0

    def state(self, endpoint: str) -> tuple[bool, str]:
        with self._lock:
            row = self._db.execute("SELECT paused, disabled FROM endpoint_state WHERE endpoint = ?",
                                   (endpoint,)).fetchone()
        return (bool(row[0]), row[1]) if row else (False, "")

    def set_state(self, endpoint: str, paused: bool | None = None, disabled: str | None = None) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO endpoint_state (endpoint) VALUES (?)", (endpoint,))
            if paused is not None:
                self._db.execute("UPDATE endpoint_state SET paused = ? WHERE endpoint = ?", (int(paused), endpoint))
            if disabled is not None:
                self._db.execute("UPDATE endpoint_state SET disabled = ? WHERE endpoint = ?", (disabled, endpoint))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def claim_spool(directory: str | os.PathLike, limit: int = 256) -> Spool:
    """Open the first ``spool-N.sqlite3`` in ``directory`` that no live process holds.

    The ``flock`` is kept for the life of the process (its descriptor is never
    closed), so a crashed process's file is free for the next one to adopt.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    for index in range(limit):
        fd = os.open(root / f"spool-{index}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        spool = Spool(root / f"spool-{index}.sqlite3")
        spool.lock_fd = fd  # type: ignore[attr-defined]
        return spool
    raise OSError(f"all {limit} spool files in {root} are held by live processes")


def queue_spool(directory: str | os.PathLike) -> Spool:
    """The embedded queue: one shared file ``queue.sqlite3`` (SQLite serialises writers across processes)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    return Spool(root / "queue.sqlite3")
