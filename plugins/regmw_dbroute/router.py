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
(positions only grow, so a cached one is a safe lower bound). When the primary
is the answer and it is known to be down, the request is refused with 503
UNAVAILABLE instead of hanging or reading stale data.

After a write (:meth:`Router.record_write`, called from ``regmw_response_started``,
before the client sees the response) the primary's ``pg_current_wal_insert_lsn()``
is stored for the repository, keeping the maximum. It is read on the primary
connection the request still holds, or else through the primary's small
``position_engine`` pool, never through the request pool the writes hold. A
pool timeout (every pooled connection busy) means this instance is loaded,
not that a server is down: it never marks the primary (or a replica) down.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
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
        self._last_primary_probe = 0.0
        self._rotation = itertools.count()
        self.checker = HealthChecker(self.check, settings.health_interval)
        self._sync_replicas()

    @classmethod
    def from_config(cls, config: Any, services: Any = None) -> Router:
        settings = settings_from_config(config["database"])
        return cls(settings, make_store(settings, getattr(services, "redis", None)))

    # --- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """One synchronous check (so the first requests can use replicas), then the checker thread."""
        if self.checker.running:
            return
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
        self.checker.start()

    def close(self) -> None:
        self.checker.stop()
        for node, _ in self._replicas:
            node.dispose()
        self.primary.dispose()

    # --- per request ------------------------------------------------------------

    def route(self, repository: str | None, is_write: bool) -> DbHandle:
        """The handle for one request; raises a 503 :class:`~regmw.errors.Refusal` when nothing can serve it."""
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
            if state.replay_lsn is not None and state.replay_lsn >= required:
                return DbHandle(self, node, "caught-up", repository)
        for node, state in ordered:
            replayed = self._probe(node, state)
            if replayed is not None and replayed >= required:
                return DbHandle(self, node, "caught-up", repository)
        return self._primary_read(repository, "replicas-behind")

    def _primary_read(self, repository: str | None, reason: str) -> DbHandle:
        if not self._primary_usable():
            raise self._primary_refusal("reads that no replica is known to be up to date for")
        return DbHandle(self, self.primary, reason, repository)

    def _probe(self, node: Node, state: ReplicaState) -> int | None:
        """The replica's replay position, asked at most once per ``replay_position_max_age``."""
        if time.monotonic() - state.replay_at <= self.settings.replay_position_max_age:
            return state.replay_lsn
        if not state.probe_lock.acquire(blocking=False):
            return state.replay_lsn  # someone is asking right now; use what is known
        try:
            in_recovery, replayed = node.replay_status(engine=node.engine)
        except CONNECTION_ERRORS as exc:
            self.replica_failed(node, exc)  # (a pool timeout is not counted against the replica)
            return None
        finally:
            state.probe_lock.release()
        if not in_recovery or replayed is None:
            state.record_failure("not in recovery (promoted?)", immediate=True)
            return None
        state.observe_replay(replayed, time.monotonic())
        return replayed

    # --- write positions ----------------------------------------------------------

    def record_write(self, repository: str, handle: DbHandle | None = None) -> int | None:
        """Store the primary's insert position for ``repository``; never raises.

        The position is read on the primary connection ``handle`` (the
        request's) still holds, if any, else through the primary's
        ``position_engine``. If it cannot be read, or the store is down, it is
        kept locally (``pending``): this instance sends reads of the repository
        to the primary until it has put a position in the store, or the TTL passed.
        """
        ttl = self.settings.lsn_ttl
        try:
            lsn = self._write_position(handle)
        except SQLAlchemyError as exc:
            self.primary_failed(exc)
            POSITIONS.labels("unknown").inc()
            log.warning("cannot read the primary's WAL position after a write to %s: %s", repository, _short(exc))
            self._add_pending(repository, None)
            return None
        try:
            kept = self.store.advance(repository, lsn, ttl)
        except StoreUnavailable as exc:
            self._store_failed(exc)
            POSITIONS.labels("pending").inc()
            log.warning("cannot store the write position of %s (%s); reads of it go to the primary here",
                        repository, _short(exc))
            self._add_pending(repository, lsn)
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
        return self.primary.current_wal_lsn(insert=True, engine=self.primary.position_engine)

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
        log.warning("position store had no epoch marker; floor set to %s", format_lsn(floor))
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
        try:
            lsn = self.primary.current_wal_lsn()
        except SQLAlchemyError as exc:
            self.primary_state.mark(False, _short(exc))
        else:
            self.history.add(started, lsn)
            self.primary_state.mark(True)
        self._sync_replicas()
        latest = self.history.latest
        for node, state in self._replicas:
            try:
                in_recovery, replayed = node.replay_status()
            except SQLAlchemyError as exc:
                state.record_failure(_short(exc))
                continue
            if not in_recovery or replayed is None:
                state.record_failure("not in recovery (promoted?)", immediate=True)
                continue
            when = time.monotonic()
            byte_lag = max(0, latest - replayed) if latest is not None else None
            state.record_check(replayed, byte_lag, self.history.lag(replayed, when), when)
        if self._pending:
            self.flush_pending()

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

    def status(self) -> dict[str, Any]:
        return {
            "primary": {"name": self.primary.name, "up": self.primary_state.up, "reason": self.primary_state.reason},
            "replicas": [state.as_dict() for _, state in self._replicas],
            "store": getattr(self.store, "kind", type(self.store).__name__),
            "pending": len(self._pending),
        }
