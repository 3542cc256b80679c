"""Replica health: lag measurement, quarantine and reintegration, and the checker thread.

Replay-time lag is measured without trusting clocks or commit timestamps:
the checker remembers when it first saw the primary at each WAL position, and
a replica's lag is how long ago the primary first stood at a position the
replica has still not replayed. That is a lower bound of the true lag (off by
at most one check interval), it is 0 on an idle primary (where
``now() - pg_last_xact_replay_timestamp()`` grows forever and would quarantine
healthy replicas), and it keeps growing for a replica that stopped replaying.
"""
from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("regmw.dbroute")


class PrimaryHistory:
    """(first time seen, position) of the primary, kept for a bounded window."""

    def __init__(self, window: float, max_samples: int = 10_000) -> None:
        self.window = window
        self._times: deque[float] = deque(maxlen=max_samples)
        self._lsns: deque[int] = deque(maxlen=max_samples)
        self._lock = threading.Lock()

    def add(self, when: float, lsn: int) -> None:
        with self._lock:
            if self._lsns and lsn <= self._lsns[-1]:
                return  # keep the FIRST time the primary was seen at a position
            self._times.append(when)
            self._lsns.append(lsn)
            while len(self._times) > 1 and self._times[0] < when - self.window:
                self._times.popleft()
                self._lsns.popleft()

    def reset_lock(self) -> None:
        """After a fork: a lock some parent thread held at the fork would never be released here."""
        self._lock = threading.Lock()

    @property
    def latest(self) -> int | None:
        return self._lsns[-1] if self._lsns else None

    def lag(self, replay_lsn: int, now: float) -> float | None:
        """Seconds since the primary first stood at a position the replica has not replayed."""
        with self._lock:
            if not self._lsns:
                return None
            index = bisect.bisect_right(self._lsns, replay_lsn)
            if index >= len(self._lsns):
                return 0.0
            return max(0.0, now - self._times[index])


@dataclass
class ReplicaState:
    """What routing knows about one replica. Mutated by the checker and by failed requests."""

    name: str
    max_byte_lag: int
    max_replay_lag: float
    failure_threshold: int
    reintegrate_after: int
    staleness: float
    replay_lsn: int | None = None
    replay_at: float = 0.0  # monotonic time replay_lsn was observed
    replay_server: str | None = None  # the server run replay_lsn was read from (nodes.SERVER_SQL)
    byte_lag: int | None = None
    time_lag: float | None = None
    quarantined: bool = False
    reason: str = "not checked yet"
    failures: int = 0
    good_checks: int = 0
    last_ok: float | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.probe_lock = threading.Lock()  # one request-path replay query at a time

    def reset_locks(self) -> None:
        """After a fork: a lock some parent thread held at the fork would never be released here."""
        self.__post_init__()

    def eligible(self, now: float) -> bool:
        """May serve reads: not quarantined, and checked successfully recently."""
        return not self.quarantined and self.last_ok is not None and now - self.last_ok <= self.staleness

    def observe_replay(self, lsn: int, when: float, server: str | None = None) -> None:
        """A replay position read on the request path (replay positions only grow, on one server run)."""
        with self._lock:
            if when >= self.replay_at:
                self.replay_lsn, self.replay_at, self.replay_server = lsn, when, server

    def replay(self) -> tuple[int | None, str | None]:
        """(replay position, the server run it was read from), consistent with each other."""
        with self._lock:
            return self.replay_lsn, self.replay_server

    def record_check(
        self, lsn: int, byte_lag: int | None, time_lag: float | None, when: float, server: str | None = None
    ) -> None:
        with self._lock:
            if when >= self.replay_at:
                self.replay_lsn, self.replay_at, self.replay_server = lsn, when, server
            self.byte_lag, self.time_lag = byte_lag, time_lag
            self.failures = 0
            self.last_ok = when
            too_far = []
            if byte_lag is not None and byte_lag > self.max_byte_lag:
                too_far.append(f"byte lag {byte_lag} > {self.max_byte_lag}")
            if time_lag is not None and time_lag > self.max_replay_lag:
                too_far.append(f"replay lag {time_lag:.2f}s > {self.max_replay_lag:g}s")
            if too_far:
                self.good_checks = 0
                self._quarantine("; ".join(too_far))
                return
            self.good_checks += 1
            if self.quarantined and self.good_checks >= self.reintegrate_after:
                self.quarantined = False
                log.warning("replica %s reintegrated (lag %s bytes, %.2fs)", self.name, byte_lag, time_lag or 0.0)
            if not self.quarantined:
                self.reason = "ok"

    def record_failure(self, reason: str, immediate: bool = False) -> None:
        with self._lock:
            self.failures += 1
            self.good_checks = 0
            if immediate or self.failures >= self.failure_threshold:
                self._quarantine(f"{self.failures} consecutive failure(s): {reason}")

    def _quarantine(self, reason: str) -> None:
        if not self.quarantined:
            log.warning("replica %s quarantined: %s", self.name, reason)
        self.quarantined = True
        self.reason = reason

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "eligible": self.eligible(time.monotonic()),
            "quarantined": self.quarantined,
            "reason": self.reason,
            "replay_lsn": self.replay_lsn,
            "byte_lag": self.byte_lag,
            "time_lag": self.time_lag,
            "failures": self.failures,
        }


class PrimaryState:
    """Whether writes can go to the primary right now (any failure marks it down until one success)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.up = True
        self.reason = "ok"
        self.probe_lock = threading.Lock()

    def mark(self, up: bool, reason: str = "ok") -> None:
        if up != self.up:
            log.warning("primary %s %s%s", self.name, "is back" if up else "is DOWN: ", "" if up else reason)
        self.up, self.reason = up, reason


class HealthChecker:
    """A daemon thread calling ``check`` every ``interval`` seconds until :meth:`stop`."""

    def __init__(self, check: Callable[[], None], interval: float, name: str = "regmw-dbroute-health") -> None:
        self._check = check
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.rounds = 0

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._check()
            except Exception:  # the checker must survive anything one round throws
                log.exception("database health check failed")
            self.rounds += 1

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()
