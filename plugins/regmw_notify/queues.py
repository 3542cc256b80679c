"""The two :class:`~.lane.LaneQueue` implementations a lane reads from.

:class:`RedisLaneQueue` is one endpoint's consumer group on one shard's
stream, used under a shard lease whose fencing token every acknowledgement
checks. On taking a shard it first reclaims the entries a dead worker had
read but not acknowledged (XAUTOCLAIM, once they have been idle longer than
any delivery can take, so the dead worker's last POST is over), then reads
its own pending entries from the start, then new ones: the order of the
stream, whatever happened to the previous holder.

:class:`SpoolLaneQueue` is the embedded queue (no Redis): a cursor per
endpoint over the SQLite spool.
"""
from __future__ import annotations

import threading
from typing import Any

from .lane import Entry
from .spool import Spool
from .stream import RedisStreams, _text


class RedisLaneQueue:
    def __init__(self, streams: RedisStreams, shard: int, group: str, consumer: str, token: int,
                 claim_idle: float, stop: threading.Event) -> None:
        self.streams, self.shard, self.group, self.consumer, self.token = streams, shard, group, consumer, token
        self.claim_idle_ms = int(claim_idle * 1000)
        self.stop = stop
        self.key = streams.stream(shard)
        self._cursor = "0"  # the last entry of our pending list we took
        self._owned_read_once = False

    def prepare(self) -> None:
        """Own every pending entry of the group before delivering anything (order across a takeover)."""
        client = self.streams.client
        while not self.stop.is_set():
            summary = client.xpending(self.key, self.group)
            others = [c for c in summary.get("consumers") or () if _text(c["name"]) != self.consumer]
            if not summary["pending"] or not others:
                return
            start = "0-0"
            while True:
                # (not justid=True: redis-py then drops the cursor this loop needs)
                reply = client.xautoclaim(self.key, self.group, self.consumer, self.claim_idle_ms, start, count=1000)
                start = _text(reply[0])
                if start == "0-0":
                    break
            summary = client.xpending(self.key, self.group)
            if not any(_text(c["name"]) != self.consumer for c in summary.get("consumers") or ()):
                return
            self.stop.wait(min(0.2, max(0.01, self.claim_idle_ms / 4000)))

    def read(self, count: int, block: float) -> list[Entry]:
        """The next entries, in stream order, from this consumer's own pending list.

        New entries are taken into our pending list by a fenced script (a
        worker whose lease lapsed cannot take entries and strand them in its
        own pending list while its successor sends later ones); what we
        deliver is always read back from that list, after the last entry we
        took. So a read whose reply was lost (a connection reset, a timeout
        that redis-py retried) cannot make the lane skip what it took: those
        entries are pending for us and come back here, before anything newer.
        """
        client = self.streams.client
        if not self._owned_read_once:
            self._owned_read_once = True  # first, what we already own (taken over, or from an earlier hold)
        elif not self.streams.take(self.shard, self.group, self.consumer, self.token, count) and block:
            # nothing new: wait (without taking anything) until an entry after the last we took arrives
            client.xread({self.key: self._cursor if self._cursor != "0" else "$"}, count=1, block=int(block * 1000))
            self.streams.take(self.shard, self.group, self.consumer, self.token, count)
        reply = client.xreadgroup(self.group, self.consumer, {self.key: self._cursor}, count=count)
        messages = [message for _stream, batch in reply or () for message in batch]
        if not messages:
            return []
        self._cursor = _text(messages[-1][0])
        gone = [_text(entry_id) for entry_id, fields in messages if not fields]
        if gone:  # pending but deleted from the stream: nothing to send; do not let it pin trimming
            self.streams.ack(self.shard, self.group, self.token, gone)
        return _entries(reply)

    def ack(self, entries: list[Entry]) -> None:
        self.streams.ack(self.shard, self.group, self.token, [entry.id for entry in entries])

    def park(self, entries: list[Entry], reason: str) -> None:
        self.streams.park(self.shard, self.group, self.token, entries, reason)

    def state(self) -> tuple[bool, str]:
        return self.streams.state(self.group)

    def disable(self, reason: str) -> None:
        self.streams.set_state(self.group, disabled=reason)


def _entries(reply: Any) -> list[Entry]:
    out: list[Entry] = []
    for _stream, messages in reply or ():
        for entry_id, fields in messages:
            if not fields:  # deleted while pending
                continue
            entry_id = _text(entry_id)
            only = fields.get(b"only")
            out.append(Entry(entry_id, fields[b"e"], _text(fields[b"r"]), int(entry_id.split("-")[0]) / 1000.0,
                             _text(only) if only else None))
    return out


class SpoolLaneQueue:
    """One endpoint's cursor over the embedded SQLite queue (one delivering process at a time)."""

    def __init__(self, spool: Spool, endpoint: str, stop: threading.Event) -> None:
        self.spool, self.endpoint, self.stop = spool, endpoint, stop
        self._read_through = 0

    def prepare(self) -> None:
        self._read_through = self.spool.cursor(self.endpoint)

    def read(self, count: int, block: float) -> list[Entry]:
        rows = self.spool.read(self._read_through, count)
        if not rows:
            if block:
                self.stop.wait(block)
            return []
        self._read_through = rows[-1].seq
        return [Entry(str(row.seq), row.data, row.repository, row.enqueued, row.only) for row in rows]

    def ack(self, entries: list[Entry]) -> None:
        self.spool.advance(self.endpoint, int(entries[-1].id))

    def park(self, entries: list[Entry], reason: str) -> None:
        rows = [(_Row(int(entry.id), entry.raw), reason) for entry in entries]
        self.spool.advance(self.endpoint, int(entries[-1].id), rows)

    def state(self) -> tuple[bool, str]:
        return self.spool.state(self.endpoint)

    def disable(self, reason: str) -> None:
        self.spool.set_state(self.endpoint, disabled=reason)


class _Row:
    def __init__(self, seq: int, data: bytes) -> None:
        self.seq, self.data = seq, data
