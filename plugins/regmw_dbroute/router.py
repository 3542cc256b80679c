"""The routing rule: writes to the primary, reads to a replica known to be up to date.

For a read of repository R:

1. no eligible replica (all quarantined, unchecked or stale)  → primary;
2. this instance failed to record a write of R in the store  → primary;
3. the store cannot be read (or failed within ``store_retry``) → primary;
4. no recorded position for R (and no floor)                   → any eligible replica, round-robin;
5. recorded position P → the first eligible replica, in rotating order, whose
   replay position is known to be ≥ P: first from cached positions, then by
   asking each replica (at most once per ``replay_position_max_age``);
6. none has reached P                                          → primary.

A replica is only ever chosen on a position it is *known* to have replayed
(positions only grow on one server run, so a cached one is a safe lower bound
for connections to that run; a connection that reached another run is asked
itself, see :meth:`DbHandle._reached`). When the primary
is the answer and it is known to be down, the request is refused with 503
UNAVAILABLE instead of hanging or reading stale data.

After a write (:meth:`Router.record_write`, called from ``regmw_response_started``,
before the client sees the response) the primary's ``pg_current_wal_insert_lsn()``
is stored for the repository, keeping the maximum. It is read on the primary
connection the request still holds, or else through the primary's small
``position_engine`` pool, never through the request pool the writes hold. A
pool timeout (every pooled connection busy) means this instance is loaded,
not that a server is down: it never marks the primary (or a replica) down.

When the position cannot be stored (the store is down or unreachable from
this instance), the other instances cannot learn it: this instance then
answers the write only once every replica that answers has replayed it (or a
bound passed, see :meth:`Router.await_replay`), so no replica can serve an
older version to anyone. A store that comes back *older* (restarted from its
AOF, failed over) is caught by its epoch marker's ``run_id`` (see
:mod:`.store`) and gets a new floor before it is trusted.

Processes: the checker thread, the pools and the locks belong to one process.
Under ``gunicorn --preload`` the router is built in the master and inherited
by forked workers; after a fork the child drops the inherited pools (without
closing the parent's sockets) and starts its own checker thread on its first
request (:meth:`Router.ensure_running`). The master itself never starts one.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import weakref
from typing import Any

from prometheus_client import Counter
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from regmw import metrics
from regmw.errors import Refusal, unavailable

from .config import Settings, settings_from_config
from .discovery import ReplicaDiscovery, StaticDiscovery
from .handle import CONNECTION_ERRORS, DbHandle
from .health import HealthChecker, PrimaryHistory, PrimaryState, ReplicaState
from .lsn import format_lsn
from .nodes import Node, wal_lsn_on
from .store import MemoryPositionStore, Positions, PositionStore, StoreUnavailable, make_store

log = logging.getLogger("regmw.dbroute")

ROUTES = Counter(
    "regmw_db_routes_total", "Database routing decisions, by role chosen and reason.", ["role", "reason"],
    registry=metrics.REGISTRY,
)
POSITIONS = Counter(
    "regmw_db_write_positions_total",
    "Write positions recorded after write requests, by outcome (stored, pending = store down, "
    "unknown = primary did not answer).",
    ["outcome"],
    registry=metrics.REGISTRY,
)

RETRY_AFTER = 5

REPLAY_WAITS = Counter(
    "regmw_db_replay_waits_total",
    "Writes whose position could not be stored and that waited for the replicas to replay them, by outcome "
    "(replayed = answered once every answering replica had it, timeout = answered after the bound).",
    ["outcome"],
    registry=metrics.REGISTRY,
)

_ROUTERS: weakref.WeakSet[Router] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for router in list(_ROUTERS):
        router._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _short(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


class Router:
    """Chooses the database for each request and keeps replica health. Thread-safe."""

    def __init__(
        self,
        settings: Settings,
        store: PositionStore | None = None,
        discovery: ReplicaDiscovery | None = None,
    ) -> None:
        self.settings = settings
        self.primary = Node(settings.primary, "primary", settings)
        self.primary_state = PrimaryState(self.primary.name)
        self.store: PositionStore = store if store is not None else MemoryPositionStore()
        self.discovery = discovery or StaticDiscovery(settings.replicas)
        self.history = PrimaryHistory(window=2 * settings.max_replay_lag + 10 * settings.health_interval + 1)
        self._replicas: list[tuple[Node, ReplicaState]] = []  # replaced whole, never mutated
        self._pending: dict[str, tuple[int | None, float]] = {}  # repo -> (lsn, expires): not in the store yet
        self._pending_lock = threading.Lock()
        self._store_down_until = 0.0
        self._closed = False
        self._last_primary_probe = 0.0
        self._rotation = itertools.count()
        self.checker = HealthChecker(self.check, settings.health_interval)
        self._checker_pid: int | None = None  # the process whose checker thread is running
        self._start_lock = threading.Lock()
        #: the primary's WAL position sampled at the start of the last COMPLETED health round:
        #: every replica figure in :meth:`replica_lag` was measured after the primary stood there
        self.checked_lsn: int | None = None
        self._sync_replicas()
        _ROUTERS.add(self)

    @classmethod
    def from_config(cls, config: Any, services: Any = None) -> Router:
        settings = settings_from_config(config["database"])
        return cls(settings, make_store(settings, getattr(services, "redis", None)))

    # --- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """One synchronous check, so the first requests can use replicas, and the store's floor if it has none.

        The checker thread is started by :meth:`ensure_running` on the first
        request of each process, never here: a ``gunicorn --preload`` master
        runs start-up, then forks workers, and a thread does not survive a fork.
        """
        try:
            self.check()
        except Exception:
            log.exception("initial database health check failed")
        try:  # a new (or emptied) store gets its floor now rather than on the first read
            positions = self.store.get(None)
            if not positions.initialized:
                self._initialize_store(positions)
        except (StoreUnavailable, SQLAlchemyError) as exc:
            log.warning("position store not initialised at start-up (done on first read): %s", _short(exc))

    def ensure_running(self) -> None:
        """Start this process's checker thread if it has none (cheap: one comparison once running)."""
        pid = os.getpid()
        if self._checker_pid == pid:
            return
        with self._start_lock:
            if self._checker_pid == pid or self._closed:
                return
            self.checker.start()
            self._checker_pid = pid

    def _after_fork(self) -> None:
        """In a forked child: the parent's pools, locks and thread are not ours (SQLAlchemy: dispose(close=False))."""
        for node in [self.primary, *(node for node, _ in self._replicas)]:
            for engine in (node.engine, node.check_engine, node.position_engine):
                if engine is not None:
                    engine.dispose(close=False)
        self._pending_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self.history.reset_lock()
        self.primary_state.probe_lock = threading.Lock()
        for _, state in self._replicas:
            state.reset_locks()
        self.checker = HealthChecker(self.check, self.settings.health_interval)
        self._checker_pid = None

    def close(self) -> None:
        self._closed = True
        self.checker.stop()
        for node, _ in self._replicas:
            node.dispose()
        self.primary.dispose()

    # --- per request ------------------------------------------------------------

    def route(self, repository: str | None, is_write: bool) -> DbHandle:
        """The handle for one request; raises a 503 :class:`~regmw.errors.Refusal` when nothing can serve it."""
        self.ensure_running()
        handle = self._route_write(repository) if is_write else self._route_read(repository)
        ROUTES.labels(handle.role, handle.reason).inc()
        return handle

    def _route_write(self, repository: str | None) -> DbHandle:
        if not self._primary_usable():
            raise self._primary_refusal("writes")
        return DbHandle(self, self.primary, "write", repository)

    def _route_read(self, repository: str | None) -> DbHandle:
        now = time.monotonic()
        replicas = [(node, state) for node, state in self._replicas if state.eligible(now)]
        if not replicas:
            return self._primary_read(repository, "no-replica")
        if repository and self._pending_for(repository, now):
            return self._primary_read(repository, "unrecorded-write")
        if now < self._store_down_until:
            return self._primary_read(repository, "store-unavailable")
        try:
            positions = self.store.get(repository)
            if not positions.initialized:
                positions = self._initialize_store(positions)
        except StoreUnavailable as exc:
            self._store_failed(exc)
            return self._primary_read(repository, "store-unavailable")
        except CONNECTION_ERRORS as exc:  # the primary did not answer for the floor
            self.primary_failed(exc)
            return self._primary_read(repository, "store-uninitialized")
        required = positions.required
        start = next(self._rotation) % len(replicas)
        ordered = replicas[start:] + replicas[:start]
        if required is None:
            return DbHandle(self, ordered[0][0], "no-position", repository)
        for node, state in ordered:
            replayed, server = state.replay()
            if replayed is not None and replayed >= required:
                return DbHandle(self, node, "caught-up", repository, required, server)
        for node, state in ordered:
            replayed, server = self._probe(node, state)
            if replayed is not None and replayed >= required:
                return DbHandle(self, node, "caught-up", repository, required, server)
        return self._primary_read(repository, "replicas-behind")

    def _primary_read(self, repository: str | None, reason: str) -> DbHandle:
        if not self._primary_usable():
            raise self._primary_refusal("reads that no replica is known to be up to date for")
        return DbHandle(self, self.primary, reason, repository)

    def _probe(self, node: Node, state: ReplicaState) -> tuple[int | None, str | None]:
        """The replica's replay position and the server run it is from, asked at most once per
        ``replay_position_max_age``."""
        if time.monotonic() - state.replay_at <= self.settings.replay_position_max_age:
            return state.replay()
        if not state.probe_lock.acquire(blocking=False):
            return state.replay()  # someone is asking right now; use what is known
        try:
            in_recovery, replayed, server = node.replay_info(engine=node.engine)
        except CONNECTION_ERRORS as exc:
            self.replica_failed(node, exc)  # (a pool timeout is not counted against the replica)
            return None, None
        finally:
            state.probe_lock.release()
        if not in_recovery or replayed is None:
            state.record_failure("not in recovery (promoted?)", immediate=True)
            return None, None
        state.observe_replay(replayed, time.monotonic(), server)
        return replayed, server

    # --- write positions ----------------------------------------------------------

    def record_write(self, repository: str, handle: DbHandle | None = None) -> int | None:
        """Store the primary's insert position for ``repository``; never raises.

        The position is read on the primary connection ``handle`` (the
        request's) still holds, if any, else through the primary's
        ``position_engine``. If it cannot be read, or the store is down, it is
        kept locally (``pending``): this instance sends reads of the repository
        to the primary until it has put a position in the store, or the TTL passed,
        and the write is answered only after :meth:`await_replay` (the other
        instances cannot know the position, so no replica may still lack it).
        """
        ttl = self.settings.lsn_ttl
        try:
            lsn = self._write_position(handle)
        except SQLAlchemyError as exc:
            self.primary_failed(exc)
            POSITIONS.labels("unknown").inc()
            log.warning("cannot read the primary's WAL position after a write to %s: %s", repository, _short(exc))
            self._add_pending(repository, None)
            REPLAY_WAITS.labels("unknown-position").inc()
            return None
        try:
            if time.monotonic() < self._store_down_until:  # failed just now: do not wait for it a second time
                raise StoreUnavailable("position store failed within store_retry; not asked")
            kept = self.store.advance(repository, lsn, ttl)
        except StoreUnavailable as exc:
            if time.monotonic() >= self._store_down_until:
                self._store_failed(exc)
            POSITIONS.labels("pending").inc()
            log.warning("cannot store the write position of %s (%s); reads of it go to the primary here",
                        repository, _short(exc))
            self._add_pending(repository, lsn)
            replayed = self.await_replay(lsn)
            REPLAY_WAITS.labels("replayed" if replayed else "timeout").inc()
            if not replayed:
                log.warning("write to %s answered before every replica replayed it (bound reached); "
                            "other instances may read it stale until its position is stored", repository)
            return lsn
        POSITIONS.labels("stored").inc()
        return kept

    def _write_position(self, handle: DbHandle | None) -> int:
        """``pg_current_wal_insert_lsn()``, on the request's own primary connection when it holds one."""
        conn = handle.open_primary_connection() if isinstance(handle, DbHandle) else None
        if conn is not None:
            try:
                return wal_lsn_on(conn, insert=True)
            except SQLAlchemyError as exc:  # e.g. the app left its transaction aborted: use the position pool
                log.debug("WAL position not readable on the request's connection (%s); using the position pool",
                          _short(exc))
        try:
            return self.primary.current_wal_lsn(insert=True, engine=self.primary.position_engine)
        except PoolTimeout:
            # Every position connection busy: a loaded instance, not a down primary. An unknown position
            # can neither be stored nor waited for, and another instance could read the write stale from a
            # lagging replica, so ask on the checker's pool (where flush_pending reads unknown ones too).
            log.warning("position pool busy for pool_timeout; reading a write position on the checker's pool")
            return self.primary.current_wal_lsn(insert=True)

    def await_replay(self, lsn: int, timeout: float | None = None) -> bool:
        """Wait until every replica that answers has replayed ``lsn``; False if ``timeout`` passed first.

        The default bound, ``max_replay_lag + 3 × health_interval + connect_timeout``,
        is when a replica that still lacks ``lsn`` is quarantined by every
        instance (replay lag over ``max_replay_lag``) or stale (no good check).
        A replica that does not answer (connection refused, or no longer in
        recovery) cannot serve a read either and is not waited for. Polls each
        replica's ``pg_last_wal_replay_lsn()`` on its check pool every 10 ms.
        """
        if timeout is None:
            timeout = self.settings.max_replay_lag + self.settings.health_staleness
        deadline = time.monotonic() + timeout
        waiting = [node for node, _ in self._replicas]
        while waiting:
            behind = []
            for node in waiting:
                try:
                    in_recovery, replayed = node.replay_status()
                except PoolTimeout:  # our pool is busy, the replica may be fine: ask again
                    behind.append(node)
                    continue
                except SQLAlchemyError:
                    continue  # unreachable: it serves nobody
                if in_recovery and replayed is not None and replayed < lsn:
                    behind.append(node)
            waiting = behind
            if waiting and time.monotonic() >= deadline:
                return False
            if waiting:
                time.sleep(0.01)  # polling replay positions, bounded by the deadline above
        return True

    def _add_pending(self, repository: str, lsn: int | None) -> None:
        expires = time.monotonic() + self.settings.lsn_ttl
        with self._pending_lock:
            previous = self._pending.get(repository)
            if previous is not None and previous[0] is not None and lsn is not None:
                lsn = max(lsn, previous[0])
            elif previous is not None and lsn is not None and previous[0] is None:
                lsn = None  # an unknown position stays unknown (resolved at flush time)
            self._pending[repository] = (lsn, expires)

    def _pending_for(self, repository: str, now: float) -> bool:
        entry = self._pending.get(repository)
        return entry is not None and entry[1] > now

    def flush_pending(self) -> int:
        """Put locally kept positions into the store; returns how many are still pending."""
        now = time.monotonic()
        with self._pending_lock:
            items = list(self._pending.items())
        for repository, entry in items:
            lsn, expires = entry
            if expires <= now:
                self._drop_pending(repository, entry)
                continue
            try:
                if lsn is None:  # the write's own position was never read: today's covers it
                    lsn = self.primary.current_wal_lsn(insert=True, engine=self.primary.check_engine)
                self.store.advance(repository, lsn, max(1.0, expires - now))
            except (StoreUnavailable, SQLAlchemyError):
                break  # still down: try again at the next health check
            # Only the entry just stored: a write that failed to store meanwhile replaced
            # it with a newer (or unknown) position, which must stay pending.
            self._drop_pending(repository, entry)
        return len(self._pending)

    def _drop_pending(self, repository: str, entry: tuple[int | None, float]) -> None:
        """Forget ``repository``'s pending position if it is still exactly ``entry``."""
        with self._pending_lock:
            if self._pending.get(repository) == entry:
                del self._pending[repository]

    def _initialize_store(self, positions: Positions) -> Positions:
        """The store lost its data (or is new): every committed write is covered by today's position."""
        floor = self.primary.current_wal_lsn(insert=True, engine=self.primary.position_engine)
        self.store.initialize(floor, self.settings.lsn_ttl)
        log.warning("position store had no epoch marker of its current server run; floor set to %s",
                    format_lsn(floor))
        return Positions(positions.repository, max(floor, positions.floor or 0), True)

    def _store_failed(self, exc: BaseException) -> None:
        if time.monotonic() >= self._store_down_until:
            log.warning("position store unavailable, reads go to the primary: %s", _short(exc))
        metrics.backend_errors.labels("dbroute-store", "primary").inc()
        self._store_down_until = time.monotonic() + self.settings.store_retry

    # --- failures reported by handles ----------------------------------------------

    def replica_failed(self, node: Node, exc: BaseException) -> None:
        if isinstance(exc, PoolTimeout):  # this instance's pool is busy; the replica may be fine
            return
        for candidate, state in self._replicas:
            if candidate is node:
                state.record_failure(_short(exc))

    def primary_failed(self, exc: BaseException) -> None:
        """Mark the primary down, unless ``exc`` is only a pool timeout (a busy instance, not a down server)."""
        if isinstance(exc, PoolTimeout):
            log.warning("no free pooled connection to the primary within pool_timeout (not marked down): %s",
                        _short(exc))
            return
        self.primary_state.mark(False, _short(exc))

    def _primary_usable(self) -> bool:
        """Known up, or down but answering a (rate-limited) probe right now."""
        if self.primary_state.up:
            return True
        now = time.monotonic()
        if now - self._last_primary_probe < min(0.5, self.settings.health_interval):
            return False
        if not self.primary_state.probe_lock.acquire(blocking=False):
            return False
        try:
            self._last_primary_probe = now
            lsn = self.primary.current_wal_lsn()
        except SQLAlchemyError as exc:
            self.primary_state.mark(False, _short(exc))
            return False
        finally:
            self.primary_state.probe_lock.release()
        self.history.add(time.monotonic(), lsn)
        self.primary_state.mark(True)
        return True

    def _primary_refusal(self, what: str) -> Refusal:
        return unavailable(
            f"database primary is unavailable; {what} cannot be served",
            RETRY_AFTER,
            {"database": self.primary.name, "reason": self.primary_state.reason},
        )

    # --- health ------------------------------------------------------------------

    def check(self) -> None:
        """One health round: sample the primary, check every replica, flush pending positions."""
        started = time.monotonic()
        round_lsn: int | None = None
        try:
            lsn = self.primary.current_wal_lsn()
        except SQLAlchemyError as exc:
            # (a pool timeout: request threads share this pool for positions and replay waits; not a down server)
            self.primary_failed(exc)
        else:
            round_lsn = lsn
            self.history.add(started, lsn)
            self.primary_state.mark(True)
        self._sync_replicas()
        latest = self.history.latest
        for node, state in self._replicas:
            try:
                in_recovery, replayed, server = node.replay_info()
            except SQLAlchemyError as exc:
                self.replica_failed(node, exc)
                continue
            if not in_recovery or replayed is None:
                state.record_failure("not in recovery (promoted?)", immediate=True)
                continue
            when = time.monotonic()
            byte_lag = max(0, latest - replayed) if latest is not None else None
            state.record_check(replayed, byte_lag, self.history.lag(replayed, when), when, server)
        if self._pending:
            self.flush_pending()
        if round_lsn is not None:
            self.checked_lsn = round_lsn

    def _sync_replicas(self) -> None:
        try:
            urls = self.discovery.replicas()
        except Exception as exc:  # noqa: BLE001 - any discovery failure keeps the known list
            log.warning("replica discovery failed, keeping %d replica(s): %s", len(self._replicas), _short(exc))
            return
        current = {node.raw_url: (node, state) for node, state in self._replicas}
        if list(current) == urls:
            return
        settings = self.settings
        updated = []
        for url in urls:
            if url in current:
                updated.append(current.pop(url))
                continue
            node = Node(url, "replica", settings)
            updated.append((node, ReplicaState(
                node.name, settings.max_byte_lag, settings.max_replay_lag, settings.failure_threshold,
                settings.reintegrate_after, settings.health_staleness,
            )))
        self._replicas = updated
        for node, _ in current.values():
            node.dispose()

    # --- introspection --------------------------------------------------------------

    @property
    def replicas(self) -> list[tuple[Node, ReplicaState]]:
        return list(self._replicas)

    def replica_state(self, name: str | None = None) -> ReplicaState:
        for node, state in self._replicas:
            if name is None or node.name == name:
                return state
        raise KeyError(name)

    @property
    def primary_url(self) -> str:
        """The configured primary's URL (``[database] primary``), for tools that open their own connections."""
        return self.settings.primary

    def replica_lag(self) -> dict[str, Any]:
        """The health checker's latest lag figures, for background writers that throttle themselves.

        ``checked_lsn``: the primary's position at the start of the last
        completed health round (None before one): a writer that noted the
        primary's position after its own write knows the figures include that
        write once ``checked_lsn`` reaches it. ``replicas``: each one's
        ``time_lag`` (seconds), ``byte_lag``, ``quarantined`` and ``eligible``.
        ``max_replay_lag``/``max_byte_lag``: the quarantine limits, so a writer
        can keep below them. Starts this process's checker thread if needed.
        """
        self.ensure_running()
        now = time.monotonic()
        return {
            "checked_lsn": self.checked_lsn,
            "primary_up": self.primary_state.up,
            "health_interval": self.settings.health_interval,
            "max_replay_lag": self.settings.max_replay_lag,
            "max_byte_lag": self.settings.max_byte_lag,
            "replicas": [
                {"name": state.name, "time_lag": state.time_lag, "byte_lag": state.byte_lag,
                 "quarantined": state.quarantined, "eligible": state.eligible(now)}
                for _, state in self._replicas
            ],
        }

    def ready(self) -> None:
        """For ``/-/regmw/ready``: the primary answers a WAL-position query now (raises otherwise)."""
        self.primary.current_wal_lsn()

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "checker": self.checker.running and self._checker_pid == os.getpid(),
            "primary": {"name": self.primary.name, "up": self.primary_state.up, "reason": self.primary_state.reason},
            "replicas": [state.as_dict() for _, state in self._replicas],
            "store": getattr(self.store, "kind", type(self.store).__name__),
            "pending": len(self._pending),
        }
