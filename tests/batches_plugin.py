"""A plugin declaring the batched migrations tests/test_batches.py runs (loaded by dotted path).

``backfill_a``/``backfill_b`` fill two new columns of the 1,000,000-row
``batch_big`` table; ``flaky`` fails its batch 1 on the first attempt;
``broken`` always fails; ``mid_fill`` fills a column of the 300,000-row
``batch_mid`` table; ``stalls_once`` stalls in its batch 3 once (for a SIGKILL). Each batch function is idempotent (it only sets a
column to a value derived from the key).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

from sqlalchemy import text

from regmw import hookimpl
from regmw.batched import BatchedMigration

BIG = "batch_big"
SMALL = "batch_small"
MID = "batch_mid"

#: (migration, batch start) -> calls, so a test can see what ran and make a batch fail once
CALLS: dict[tuple[str, int], int] = {}
_calls_lock = threading.Lock()


def _count(name: str, start: int) -> int:
    with _calls_lock:
        CALLS[(name, start)] = CALLS.get((name, start), 0) + 1
        return CALLS[(name, start)]


def backfill_a(conn, start: int, stop: int) -> None:
    _count("backfill_a", start)
    conn.execute(text(f"UPDATE {BIG} SET a = id * 2 WHERE id >= :start AND id < :stop"),
                 {"start": start, "stop": stop})


def backfill_b(conn, start: int, stop: int) -> None:
    _count("backfill_b", start)
    conn.execute(text(f"UPDATE {BIG} SET b = id + 7 WHERE id >= :start AND id < :stop"),
                 {"start": start, "stop": stop})


def mid_fill(conn, start: int, stop: int) -> None:
    _count("mid_fill", start)
    conn.execute(text(f"UPDATE {MID} SET a = id - 1 WHERE id >= :start AND id < :stop"),
                 {"start": start, "stop": stop})


def stalls_once(conn, start: int, stop: int) -> None:
    """Batch 3's first attempt (across processes: a marker file) writes, then sleeps until it is killed."""
    conn.execute(text(f"UPDATE {SMALL} SET w = id + 1 WHERE id >= :start AND id < :stop"),
                 {"start": start, "stop": stop})
    marker = Path(os.environ.get("REGMW_TEST_STALL_MARKER", "/nonexistent/marker"))
    if start == 301 and marker.parent.is_dir() and not marker.exists():
        marker.write_text(str(os.getpid()))
        conn.execute(text("SELECT pg_sleep(60)"))  # ended by the batch's statement_timeout, or by a kill


def flaky(conn, start: int, stop: int) -> None:
    conn.execute(text(f"UPDATE {SMALL} SET v = id * 3 WHERE id >= :start AND id < :stop"),
                 {"start": start, "stop": stop})
    if _count("flaky", start) == 1 and start == 101:
        raise RuntimeError("flaky: first attempt of batch 1 fails (after writing: the savepoint undoes it)")


def broken(conn, start: int, stop: int) -> None:
    _count("broken", start)
    conn.execute(text(f"UPDATE {SMALL} SET w = 1 WHERE id >= :start AND id < :stop"),
                 {"start": start, "stop": stop})
    raise ValueError("broken: this batch function always fails")


@hookimpl
def regmw_batched_migrations(config):
    return [
        BatchedMigration("backfill_a", BIG, "id", 50_000, backfill_a, description="a = 2 × id"),
        BatchedMigration("backfill_b", BIG, "id", 50_000, backfill_b, description="b = id + 7"),
        BatchedMigration("mid_fill", MID, "id", 20_000, mid_fill, description="a = id - 1"),
        BatchedMigration("stalls_once", SMALL, "id", 100, stalls_once, description="w = id + 1; batch 3 stalls once"),
        BatchedMigration("flaky", SMALL, "id", 100, flaky, description="v = 3 × id; batch 1 fails once"),
        BatchedMigration("broken", SMALL, "id", 100, broken, max_attempts=2, description="always fails"),
    ]
