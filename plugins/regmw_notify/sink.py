"""The event sink (``services.events``): durable before ``emit`` returns.

With Redis: XADD to the repository's shard stream (plus WAIT when
``wait_replicas`` is set). When that fails, the event is appended to this
process's on-disk spool (fsynced) instead, and a forwarder thread moves the
spool to Redis, oldest first, once Redis answers again. While the spool holds
anything, new events go to the spool too, so one process's events for a
repository reach the stream in the order they were emitted. After a failure
Redis is not tried again on the request path for ``breaker_seconds``: an
outage costs a request one failed Redis call (at most ``[redis]
socket_timeout``) plus one SQLite commit, then only the commit.

Without Redis the spool is the queue (see :mod:`.queues`).

With ``wait_replicas``, a spooled event is deleted only once the replicas
its master has acknowledged it (see :meth:`NotifySink._await_replicas`).

``emit`` raises only if neither Redis nor the disk could take the event.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


from . import metrics
from .spool import Spool, claim_spool, queue_spool
from .stream import REDIS_DOWN, NotReplicated, RedisStreams

log = logging.getLogger("regmw.notify")

#: Seconds the spool forwarder waits for a connected but lagging replica before it deletes what it forwarded.
REPLICA_PATIENCE = 30.0

_STREAM, _SPOOL, _QUEUE = (metrics.enqueued.labels(where) for where in ("stream", "spool", "queue"))


class NotifySink:
    """Implements :class:`regmw.backends.EventSink`."""

    def __init__(self, streams: RedisStreams | None, spool_dir: str | Path, breaker_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.streams = streams
        self.spool_dir = Path(spool_dir)
        self.breaker_seconds = breaker_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._spool: Spool | None = None
        self._spooling = False  # the spool holds events not yet forwarded
        self._retry_redis_at = 0.0
        self._wake = threading.Event()
        self._forwarder: threading.Thread | None = None
        self.closed = threading.Event()  # set by close(): stops the forwarder and an in-process delivery thread

    # --- EventSink --------------------------------------------------------------

    def emit(self, event: dict[str, Any]) -> None:
        data = json.dumps(event, separators=(",", ":")).encode()
        repository = (event.get("target") or {}).get("repository") or ""
        if self.streams is None:
            self.spool.append(repository, data, time.time())
            _QUEUE.inc()
            return
        with self._lock:
            if self._spooling or self.clock() < self._retry_redis_at:
                self._to_spool(repository, data)
                return
        try:
            self.streams.add([(repository, data)])
            _STREAM.inc()
        except REDIS_DOWN as exc:
            log.warning("redis unavailable for events (spooling to %s): %s", self.spool_dir, exc)
            with self._lock:
                self._retry_redis_at = self.clock() + self.breaker_seconds
                self._to_spool(repository, data)

    def _to_spool(self, repository: str, data: bytes) -> None:
        """Append under ``self._lock`` (so the forwarder cannot declare the spool empty in between)."""
        self.spool.append(repository, data, time.time())
        self._spooling = True
        _SPOOL.inc()
        metrics.spooled.inc()
        self._wake.set()

    @property
    def spool(self) -> Spool:
        if self._spool is None:
            with _open_lock:
                if self._spool is None:
                    self._spool = queue_spool(self.spool_dir) if self.streams is None else claim_spool(self.spool_dir)
        return self._spool

    # --- forwarding -------------------------------------------------------------------

    def start(self) -> None:
        """Start the forwarder (Redis mode); it first forwards what an earlier process left in our spool file."""
        if self.streams is None or self._forwarder is not None:
            return
        # adopt what a crashed process left (only if a spool was ever written: no files made for nothing)
        if any(self.spool_dir.glob("spool-*.sqlite3")) and self.spool.count():
            with self._lock:
                self._spooling = True
        self._forwarder = threading.Thread(target=self._forward_loop, name="regmw-notify-forwarder", daemon=True)
        self._forwarder.start()

    def _forward_loop(self) -> None:
        while not self.closed.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            while self._spooling and not self.closed.is_set():
                try:
                    if not self.forward_once():
                        break
                except REDIS_DOWN as exc:
                    log.debug("forwarder: redis still unavailable: %s", exc)
                    self.closed.wait(max(0.05, self.breaker_seconds / 2))

    def forward_once(self, batch: int = 500) -> bool:
        """Move up to ``batch`` spooled events to Redis; False when the spool is empty (and spooling ends)."""
        spool = self.spool
        rows = spool.read(0, batch)
        if not rows:
            with self._lock:
                if not spool.count():
                    self._spooling = False
                    metrics.spooled.set(0)
                    return False
            return True
        try:
            self.streams.add([(row.repository, row.data) for row in rows])
        except NotReplicated as exc:  # added, not yet confirmed: wait for the replicas rather than add them again
            unconfirmed = self._await_replicas(exc.shards)
            if unconfirmed is None:
                return False  # closing: they stay spooled, and the next start forwards them again
            if unconfirmed:
                log.warning("forwarded %d spooled events without replica confirmation: %s", len(rows), unconfirmed)
        spool.delete_through(rows[-1].seq)  # a crash between the two re-sends these: at-least-once
        metrics.spooled.dec(len(rows))
        return True

    def _await_replicas(self, shards: frozenset[int]) -> str | None:
        """After an unconfirmed forward: "" once the replicas have it, else why it stays unconfirmed (None: closing).

        Deleting the spooled copies of events only a master holds would lose
        them if that master died before its replica caught up, so the
        forwarder waits here (a lagging replica) as long as the master has
        the replicas ``wait_replicas`` asks for, up to :data:`REPLICA_PATIENCE`.
        A master with fewer (a promoted replica without its own) has nothing
        to wait for. A master that dies meanwhile raises a Redis error: the
        events stay spooled and the next forward adds them to whoever serves
        their slot (duplicates, never a gap).
        """
        deadline = self.clock() + REPLICA_PATIENCE
        while not self.closed.is_set():
            try:
                if self.streams.await_replicas(shards):
                    return ""
                return f"the master has fewer than {self.streams.wait_replicas} replicas"
            except NotReplicated as exc:
                if self.clock() >= deadline:
                    return f"replicas still behind after {REPLICA_PATIENCE:g}s ({exc})"
                self.closed.wait(0.05)  # pacing only: each round already waited wait_timeout in WAIT
        return None

    def close(self) -> None:
        self.closed.set()
        self._wake.set()
        if self._forwarder is not None:
            self._forwarder.join(5)


_open_lock = threading.Lock()
