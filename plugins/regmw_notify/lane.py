"""One delivery lane: the events of one shard, for one endpoint, in order.

The loop is the same over Redis streams and over the embedded SQLite queue
(a :class:`LaneQueue`)::

    read next entries ─► head not wanted by the endpoint? ack it, next
                      ─► paused / disabled?                wait
                      ─► retry not due yet?                wait
                      ─► POST up to batch_max entries ─► 2xx: ack (fenced), next
                                                      ─► 410: disable the endpoint
                                                      ─► else: older than max_age? park (fenced), next
                                                               else retry after schedule[attempts] ± jitter
                                                                    (or a 429/503's longer Retry-After)

Order: the lane never sends an entry before every earlier one was
acknowledged or parked, so a receiver sees first deliveries in queue order.
Parking is what keeps one poison event from blocking its shard forever.
Each endpoint has its own lanes (threads): a slow or failing endpoint delays
only itself.
"""
from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import metrics
from .deliver import DELIVERED, GONE, Poster
from .endpoints import Endpoint

log = logging.getLogger("regmw.notify")


@dataclass
class Entry:
    """A queued event: its queue id, the JSON as stored, its repository and when it was queued (epoch s)."""

    id: str
    raw: bytes
    repository: str
    enqueued: float
    only: str | None = None  # a replayed dead letter goes to this endpoint only
    _event: Any = field(default=None, repr=False)

    @property
    def event(self) -> dict[str, Any]:
        if self._event is None:
            self._event = json.loads(self.raw)
        return self._event


class LaneQueue(Protocol):
    def prepare(self) -> None: ...
    def read(self, count: int, block: float) -> list[Entry]: ...
    def ack(self, entries: list[Entry]) -> None: ...
    def park(self, entries: list[Entry], reason: str) -> None: ...
    def state(self) -> tuple[bool, str]: ...
    def disable(self, reason: str) -> None: ...


class Lane(threading.Thread):
    """Delivers one queue's entries to one endpoint until ``stop`` is set (or the lease is fenced)."""

    def __init__(
        self,
        name: str,
        queue: LaneQueue,
        endpoint: Endpoint,
        poster: Poster,
        stop: threading.Event,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.queue, self.endpoint, self.poster, self.stop = queue, endpoint, poster, stop
        self.clock, self.rng = clock, rng
        self.error: BaseException | None = None
        self._shard = name.rsplit("/", 1)[-1]
        self._delivered = metrics.delivered_events.labels(endpoint.name)
        self._outcomes = {outcome: metrics.deliveries.labels(endpoint.name, outcome)
                          for outcome in ("delivered", "failed", "gone")}
        self._lag = metrics.lag.labels(self._shard, endpoint.name)

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # Fenced, Redis down: the shard holder sees it and lets go
            self.error = exc
            self.stop.set()

    def _run(self) -> None:
        endpoint, queue = self.endpoint, self.queue
        queue.prepare()
        buffer: deque[Entry] = deque()
        attempts, due, state_checked, state = 0, 0.0, 0.0, (False, "")
        while not self.stop.is_set():
            if len(buffer) < endpoint.batch_max:
                buffer.extend(queue.read(max(100, endpoint.batch_max), 0.05 if not buffer else 0.0))
            skipped = []
            while buffer and not self._wanted(buffer[0]):
                skipped.append(buffer.popleft())
            if skipped:
                queue.ack(skipped)
            if not buffer:
                self._lag.set(0)
                continue
            now = self.clock()
            self._lag.set(max(0.0, now - buffer[0].enqueued))
            if now - state_checked > 1.0:
                state, state_checked = queue.state(), now
            if state[0] or state[1]:  # paused, or disabled by a 410: hold the events, send nothing
                self.stop.wait(0.2)
                continue
            if now < due:
                self.stop.wait(min(due - now, 0.2))
                continue
            batch = [buffer[0]]
            while len(batch) < endpoint.batch_max and len(batch) < len(buffer) and self._wanted(buffer[len(batch)]):
                batch.append(buffer[len(batch)])
            message_id = batch[0].event["id"] if len(batch) == 1 else f"batch_{batch[0].event['id']}_{len(batch)}"
            outcome = self.poster.post(message_id, [entry.raw for entry in batch])
            self._outcomes[outcome.result].inc()
            if outcome.result == DELIVERED:
                queue.ack(batch)
                self._delivered.inc(len(batch))
                for _ in batch:
                    buffer.popleft()
                attempts, due = 0, 0.0
                continue
            if outcome.result == GONE:
                log.warning("endpoint %s answered 410 Gone: disabled (regmw notifications resume %s)",
                            endpoint.name, endpoint.name)
                queue.disable(f"410 Gone at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
                state_checked = 0.0
                continue
            attempts += 1
            now = self.clock()
            expired = []
            for entry in batch:  # a prefix: the oldest entries come first
                if now - entry.enqueued < endpoint.max_age:
                    break
                expired.append(entry)
            if expired:
                reason = f"undelivered after {attempts} attempts, older than {endpoint.max_age:g}s: {outcome.detail}"
                queue.park(expired, reason)
                metrics.parked.labels(endpoint.name).inc(len(expired))
                log.warning("parked %d event(s) for %s (first %s): %s", len(expired), endpoint.name,
                            expired[0].id, reason)
                for _ in expired:
                    buffer.popleft()
                attempts, due = 0, 0.0
                continue
            metrics.retries.labels(endpoint.name).inc()
            # a 429/503's Retry-After is waited for, up to the schedule's longest step (max_age still parks)
            wait = min(outcome.retry_after, max(endpoint.retry_schedule))
            due = now + max(endpoint.delay(attempts, self.rng()), wait)

    def _wanted(self, entry: Entry) -> bool:
        if entry.only is not None and entry.only != self.endpoint.name:
            return False
        return self.endpoint.wants(entry.event)
