"""The delivery worker: lease shards, run one lane per (shard, endpoint), trim what all delivered.

Exactly one consumer per shard at a time: a shard is held through the lock
manager's cluster semaphore (``services.locks.cluster_slot``, one holder) and
its fencing token, which the worker raises the shard's fence to before
delivering (:meth:`RedisStreams.take_fence`). Every acknowledgement checks
that fence, so a worker that lost its lease without noticing (paused,
partitioned) cannot acknowledge anything its successor owns; the lease's own
renewal thread tells the worker to stop. A SIGKILLed worker's shards become
free when their lease expires (``lease_ttl``), and its unacknowledged entries
are reclaimed by the next holder (see :mod:`.queues`).

Without Redis, :class:`EmbeddedWorker` runs one lane per endpoint over the
SQLite queue.
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import uuid
from collections.abc import Sequence
from typing import Any


from regmw.errors import BackendUnavailable, SlotUnavailable

from . import metrics
from .deliver import Poster
from .endpoints import Endpoint
from .lane import Lane
from .queues import RedisLaneQueue, SpoolLaneQueue
from .spool import Spool
from .stream import REDIS_DOWN, Fenced, RedisStreams

log = logging.getLogger("regmw.notify")

#: Seconds before the embedded worker's lanes start again after one of them failed.
LANE_RESTART_PAUSE = 1.0


def consumer_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Worker:
    """Delivers every shard it can lease until ``stop`` is set."""

    def __init__(
        self,
        streams: RedisStreams,
        locks: Any,
        endpoints: Sequence[Endpoint],
        allowed_networks: Sequence[Any] = (),
        lease_ttl: float = 10.0,
        claim_idle: float = 0.0,
        max_shards: int = 0,
    ) -> None:
        self.streams, self.locks, self.endpoints = streams, locks, list(endpoints)
        self.lease_ttl = lease_ttl
        self.claim_idle = claim_idle or max((endpoint.timeout for endpoint in endpoints), default=5.0) + 1.0
        self.max_shards = max_shards or streams.shards
        self.consumer = consumer_name()
        self.posters = {endpoint.name: Poster(endpoint, allowed_networks, self.max_shards) for endpoint in endpoints}
        self._held: dict[int, threading.Thread] = {}
        self._next = 0  # the shard the next round of lease attempts starts at
        self._lock = threading.Lock()

    def run(self, stop: threading.Event) -> None:
        groups_ready = False
        while not stop.is_set():
            if not groups_ready:
                try:
                    self.streams.ensure_groups([endpoint.name for endpoint in self.endpoints])
                    groups_ready = True
                except REDIS_DOWN as exc:
                    log.warning("notifications worker: redis unavailable: %s", exc)
                    stop.wait(0.5)
                    continue
            self._take_free_shards(stop)
            stop.wait(min(1.0, self.lease_ttl / 3))
        for thread in list(self._held.values()):
            thread.join(10)

    def _take_free_shards(self, stop: threading.Event) -> None:
        """Try every shard this worker does not hold, one after the other, until it holds ``max_shards``.

        Each try is one script call, waited for before the next: a worker with
        one spare place must still reach the one shard nobody holds (after a
        failover, a crash, a scale-down), not just the first it tries each
        round. The start rotates so that workers do not all try shard 0 first.
        """
        shards = self.streams.shards
        start, self._next = self._next, (self._next + self.max_shards) % shards
        for shard in [(start + offset) % shards for offset in range(shards)]:
            with self._lock:
                if len(self._held) >= self.max_shards:
                    return
                if shard in self._held:
                    continue
                tried = threading.Event()
                thread = threading.Thread(target=self._hold, args=(shard, stop, tried), daemon=True,
                                          name=f"regmw-notify-shard-{shard}")
                self._held[shard] = thread
            thread.start()
            tried.wait(self.lease_ttl)  # set once the lease is taken or refused (bounded by the Redis timeouts)
            if stop.is_set():
                return

    def held(self) -> list[int]:
        with self._lock:
            return sorted(self._held)

    def _hold(self, shard: int, stop: threading.Event, tried: threading.Event) -> None:
        try:
            with self.locks.cluster_slot(f"notify-shard-{shard}", 1, self.lease_ttl) as lease:
                tried.set()
                self._deliver(shard, lease, stop)
        except SlotUnavailable:
            pass
        except (BackendUnavailable, Fenced, *REDIS_DOWN) as exc:
            log.info("shard %d released: %s", shard, exc)
        except Exception:
            log.exception("shard %d: worker failed", shard)
        finally:
            with self._lock:
                self._held.pop(shard, None)
            tried.set()

    def _deliver(self, shard: int, lease: Any, stop: threading.Event) -> None:
        self.streams.take_fence(shard, lease.token)
        # (again per hold: a Redis that lost its data since the worker started has no groups)
        self.streams.ensure_groups([endpoint.name for endpoint in self.endpoints], [shard])
        lane_stop = threading.Event()
        lanes = [
            Lane(f"{endpoint.name}/{shard}",
                 RedisLaneQueue(self.streams, shard, endpoint.name, self.consumer, lease.token, self.claim_idle,
                                lane_stop),
                 endpoint, self.posters[endpoint.name], lane_stop)
            for endpoint in self.endpoints
        ]
        for lane in lanes:
            lane.start()
        names = [endpoint.name for endpoint in self.endpoints]
        try:
            while not (stop.is_set() or lane_stop.is_set() or (lease.lost is not None and lease.lost.is_set())):
                self._housekeeping(shard, names)
                stop.wait(1.0)
        finally:
            lane_stop.set()
            for lane in lanes:
                lane.join(max(endpoint.timeout for endpoint in self.endpoints) + 2)
        errors = [lane.error for lane in lanes if lane.error is not None]
        if errors:
            raise errors[0]

    def _housekeeping(self, shard: int, names: list[str]) -> None:
        """Trim what every endpoint acknowledged (MINID) and publish the depth gauges."""
        try:
            self.streams.trim(shard, names)
            for name, info in self.streams.groups(shard).items():
                if name in names:
                    metrics.depth.labels(str(shard), name).set(int(info.get("lag") or 0) + int(info["pending"]))
        except REDIS_DOWN as exc:
            log.debug("shard %d housekeeping: %s", shard, exc)
        except Exception:  # housekeeping must never cost the shard its lease
            log.exception("shard %d housekeeping failed", shard)


class EmbeddedWorker:
    """Delivery without Redis: one lane per endpoint over the SQLite queue, trimming behind them."""

    def __init__(self, spool: Spool, endpoints: Sequence[Endpoint], allowed_networks: Sequence[Any] = ()) -> None:
        self.spool, self.endpoints = spool, list(endpoints)
        self.posters = {endpoint.name: Poster(endpoint, allowed_networks) for endpoint in endpoints}

    def run(self, stop: threading.Event) -> None:
        """Deliver while this process holds the queue's delivery lock (one delivering process per spool)."""
        fd = os.open(self.spool.path.with_name("queue.delivery.lock"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            while not stop.is_set():
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:  # another process delivers; take over if it dies
                    stop.wait(1.0)
                    continue
                self._deliver(stop)
        finally:
            os.close(fd)

    def _deliver(self, stop: threading.Event) -> None:
        """One round of lanes, until ``stop``, or until a lane fails: then all of them end and start again.

        A lane fails on what it cannot get past (SQLite busy past its timeout,
        a full disk, a bug); the spool keeps every event, but the lanes once
        shared the process's ``stop``, so one lane's error ended all delivery
        until a restart. Each round has its own stop, as each shard's lanes do
        with Redis; the failure is logged and the next round starts after
        :data:`LANE_RESTART_PAUSE`, from the endpoints' cursors (nothing
        acknowledged is sent again, nothing unacknowledged is skipped).
        """
        round_stop = threading.Event()
        lanes = [Lane(f"{endpoint.name}/0", SpoolLaneQueue(self.spool, endpoint.name, round_stop), endpoint,
                      self.posters[endpoint.name], round_stop) for endpoint in self.endpoints]
        for lane in lanes:
            lane.start()
        names = [endpoint.name for endpoint in self.endpoints]
        try:
            while not (stop.wait(1.0) or round_stop.is_set()):
                self._housekeeping(names)
        finally:
            round_stop.set()
            for lane in lanes:
                lane.join(10)
        failed = [lane for lane in lanes if lane.error is not None]
        for lane in failed:
            log.error("notification lane %s failed: %s: %s; the lanes start again in %.0f s", lane.name,
                      type(lane.error).__name__, lane.error, LANE_RESTART_PAUSE)
        if failed:
            stop.wait(LANE_RESTART_PAUSE)

    def _housekeeping(self, names: list[str]) -> None:
        """Trim what every endpoint has, publish the queue depths; a failure here waits for the next second."""
        try:
            self.spool.trim(names)
            for name in names:  # the queue depth, as the Redis worker publishes it (one shard: "0")
                metrics.depth.labels("0", name).set(self.spool.count_after(self.spool.cursor(name)))
        except Exception:
            log.exception("notification queue housekeeping failed")
