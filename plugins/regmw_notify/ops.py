"""Operations on the queue: status, dead letters (list, show, replay, drop), pause and resume.

Used by ``regmw notifications ...`` (:mod:`.cli`) and by tests. Dead letters
are named ``<shard>:<entry id>`` on Redis and by their sequence number in the
embedded queue. A replayed dead letter is appended to its shard's stream
again, addressed to its endpoint only: it is delivered after the events that
were queued meanwhile (a replay cannot restore the original order, and the
receiver still de-duplicates on ``id``). On Redis the move is one script, so a
crash cannot both keep and replay a dead letter.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from .endpoints import Endpoint
from .spool import Spool
from .stream import RedisStreams, _parse_id, _text

#: Move dead letters back to the stream. KEYS: dead, stream. ARGV: endpoint, ids... Returns how many moved.
REPLAY = """
local moved = 0
for i = 2, #ARGV do
  local found = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  if #found == 1 then
    local fields = found[1][2]
    local e, r
    for j = 1, #fields, 2 do
      if fields[j] == 'e' then e = fields[j + 1] elseif fields[j] == 'r' then r = fields[j + 1] end
    end
    redis.call('XADD', KEYS[2], '*', 'e', e, 'r', r, 'only', ARGV[1])
    redis.call('XDEL', KEYS[1], ARGV[i])
    moved = moved + 1
  end
end
return moved
"""


class Operations:
    """What an operator can see and do; works on Redis streams or on the embedded queue."""

    def __init__(self, endpoints: Sequence[Endpoint], streams: RedisStreams | None = None,
                 spool: Spool | None = None) -> None:
        self.endpoints = list(endpoints)
        self.streams, self.spool = streams, spool
        self._replay = streams.client.register_script(REPLAY) if streams is not None else None

    def _names(self, endpoint: str | None) -> list[str]:
        names = [item.name for item in self.endpoints]
        if endpoint is not None and endpoint not in names:
            raise KeyError(f"no endpoint named {endpoint!r} (configured: {', '.join(names) or 'none'})")
        return [endpoint] if endpoint else names

    # --- status -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Per endpoint: paused/disabled, depth (not yet acknowledged), oldest age (s), parked; per shard too."""
        now = time.time()
        out: dict[str, Any] = {}
        for name in self._names(None):
            paused, disabled = self.state(name)
            row: dict[str, Any] = {"paused": paused, "disabled": disabled, "depth": 0, "oldest_age": 0.0,
                                   "parked": 0, "shards": {}}
            if self.streams is not None:
                for shard in range(self.streams.shards):
                    depth, oldest = self._shard_depth(shard, name)
                    parked = int(self.streams.client.xlen(self.streams.dead(shard, name)))
                    if depth or parked:
                        row["shards"][shard] = {"depth": depth, "oldest_age": round(now - oldest, 3) if oldest else 0.0,
                                                "parked": parked}
                    row["depth"] += depth
                    row["parked"] += parked
                    if oldest:
                        row["oldest_age"] = max(row["oldest_age"], round(now - oldest, 3))
            elif self.spool is not None:
                cursor = self.spool.cursor(name)
                rows = self.spool.read(cursor, 1)
                row["depth"] = self.spool.count_after(cursor)
                row["oldest_age"] = round(now - rows[0].enqueued, 3) if rows else 0.0
                row["parked"] = len(self.spool.dead(name))
            out[name] = row
        return out

    def _shard_depth(self, shard: int, name: str) -> tuple[int, float | None]:
        streams = self.streams
        info = streams.groups(shard).get(name)
        key = streams.stream(shard)
        if info is None:
            return int(streams.client.xlen(key)), None
        depth = int(info["pending"]) + int(info.get("lag") or 0)
        oldest: float | None = None
        first_pending = streams.client.xpending(key, name)["min"] if int(info["pending"]) else None
        if first_pending is not None:
            oldest = _parse_id(_text(first_pending))[0] / 1000
        elif depth:
            after = streams.client.xrange(key, min="(" + _text(info["last-delivered-id"]), count=1)
            if after:
                oldest = _parse_id(_text(after[0][0]))[0] / 1000
        return depth, oldest

    # --- dead letters -------------------------------------------------------------

    def dead_letters(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        out = []
        for name in self._names(endpoint):
            if self.streams is not None:
                for shard in range(self.streams.shards):
                    for entry_id, fields in self.streams.client.xrange(self.streams.dead(shard, name)):
                        out.append(_letter(f"{shard}:{_text(entry_id)}", name, fields[b"e"], _text(fields[b"reason"])))
            elif self.spool is not None:
                for seq, _endpoint, data, reason in self.spool.dead(name):
                    out.append(_letter(str(seq), name, data, reason))
        return out

    def show(self, endpoint: str, letter: str) -> dict[str, Any] | None:
        for item in self.dead_letters(endpoint):
            if item["letter"] == letter:
                return item
        return None

    def replay(self, endpoint: str, letters: Sequence[str] | None = None) -> int:
        """Queue dead letters (all of ``endpoint``'s when ``letters`` is None) for ``endpoint`` again.

        Named letters are all checked first: one that is malformed or not ``endpoint``'s raises KeyError and
        nothing is moved (a typo must not look like success).
        """
        items = self.dead_letters(endpoint)
        if letters is not None:
            self._existing(endpoint, letters, items)
        chosen = [item["letter"] for item in items if letters is None or item["letter"] in letters]
        if self.streams is None:
            moved = 0
            for item in items:
                if item["letter"] in chosen and self.spool is not None:
                    self.spool.append(item["repository"] or "", item["raw"], time.time(), only=endpoint)
                    self.spool.drop_dead(int(item["letter"]), endpoint)
                    moved += 1
            return moved
        by_shard: dict[int, list[str]] = {}
        for letter in chosen:
            shard, _, entry_id = letter.partition(":")
            by_shard.setdefault(int(shard), []).append(entry_id)
        moved = 0
        for shard, ids in by_shard.items():
            keys = [self.streams.dead(shard, endpoint), self.streams.stream(shard)]
            moved += int(self._replay(keys=keys, args=[endpoint, *ids]))
        return moved

    def drop(self, endpoint: str, letters: Sequence[str]) -> int:
        """Delete ``endpoint``'s dead letters ``letters`` for good (all named ones must exist: else KeyError)."""
        self._existing(endpoint, letters)
        dropped = 0
        for letter in letters:
            if self.streams is not None:
                shard, _, entry_id = letter.partition(":")
                dropped += int(self.streams.client.xdel(self.streams.dead(int(shard), endpoint), entry_id))
            elif self.spool is not None:
                dropped += int(self.spool.drop_dead(int(letter), endpoint))
        return dropped

    def _existing(self, endpoint: str, letters: Sequence[str], items: list[dict[str, Any]] | None = None) -> None:
        """Raise KeyError unless every one of ``letters`` names a dead letter of ``endpoint``."""
        known = {item["letter"] for item in (self.dead_letters(endpoint) if items is None else items)}
        missing = [letter for letter in letters if letter not in known]
        if missing:
            form = "<shard>:<entry id>" if self.streams is not None else "a number"
            raise KeyError(f"no dead letter {', '.join(map(repr, missing))} for {endpoint!r} (names are {form}, "
                           f"as `regmw notifications dead-letters list` shows them); nothing done")

    # --- pause / resume -------------------------------------------------------------

    def state(self, endpoint: str) -> tuple[bool, str]:
        if self.streams is not None:
            return self.streams.state(endpoint)
        return self.spool.state(endpoint) if self.spool is not None else (False, "")

    def pause(self, endpoint: str) -> None:
        self._names(endpoint)
        self._set(endpoint, paused=True)

    def resume(self, endpoint: str) -> None:
        """Deliver again: clears a pause and a 410's disabling."""
        self._names(endpoint)
        self._set(endpoint, paused=False, disabled="")

    def _set(self, endpoint: str, **state: Any) -> None:
        if self.streams is not None:
            self.streams.set_state(endpoint, **state)
        elif self.spool is not None:
            self.spool.set_state(endpoint, **state)


def _letter(letter: str, endpoint: str, raw: bytes, reason: str) -> dict[str, Any]:
    event = json.loads(raw)
    return {"letter": letter, "endpoint": endpoint, "id": event.get("id"), "action": event.get("action"),
            "repository": (event.get("target") or {}).get("repository"), "reason": reason, "event": event,
            "raw": raw}
