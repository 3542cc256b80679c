"""The Redis side of the queue: one stream per shard, a consumer group per endpoint.

Keys (``<ns>`` = ``[redis] namespace``; the shard is a hash tag, so a shard's
keys share a Redis Cluster slot and its scripts may touch them together)::

    <ns>:notify:{notify-shard:N}:events          the shard's stream (entries: e=event JSON, r=repository)
    <ns>:notify:{notify-shard:N}:fence           the highest lease token that took the shard
    <ns>:notify:{notify-shard:N}:dead:<endpoint> parked events of one endpoint (dead letters)
    <ns>:notify:{notify-shard:N}:replicated      a marker the spool forwarder writes to WAIT behind (expires)
    <ns>:notify:endpoint:<endpoint>              hash: paused, disabled

Guarantees kept here: an event is acknowledged (XACK) or parked only by a
script that first checks the caller's fencing token is still the shard's
newest, so a worker whose lease lapsed cannot acknowledge what its successor
now owns. Entries are never trimmed by ``MAXLEN`` (it drops unacknowledged
ones); :meth:`RedisStreams.trim` removes by ``MINID`` only what every
configured endpoint's group has acknowledged.
"""
from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import redis
from redis.exceptions import RedisClusterException

#: Raise the shard's fence to ARGV[1] if it is higher. KEYS: fence. Returns 1, or 0 if a newer token holds it.
TAKE_FENCE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local token = tonumber(ARGV[1])
if token < current then return 0 end
redis.call('SET', KEYS[1], token)
return 1
"""

#: XACK if ARGV[1] is still the fence. KEYS: fence, stream. ARGV: token, group, ids... Returns acked, or -1.
FENCED_ACK = """
if tonumber(redis.call('GET', KEYS[1]) or '0') ~= tonumber(ARGV[1]) then return -1 end
return redis.call('XACK', KEYS[2], ARGV[2], unpack(ARGV, 3))
"""

#: Take up to ARGV[4] new entries into consumer ARGV[3]'s pending list, if ARGV[1] is still the fence.
#: KEYS: fence, stream. ARGV: token, group, consumer, count. Returns how many were taken, or -1.
#: Fenced, so a worker whose lease lapsed cannot take (and then strand) entries its successor must send.
FENCED_READ = """
if tonumber(redis.call('GET', KEYS[1]) or '0') ~= tonumber(ARGV[1]) then return -1 end
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', ARGV[4], 'STREAMS', KEYS[2], '>')
if not reply then return 0 end
return #reply[1][2]
"""

#: Park entries: copy each to the dead-letter stream, then XACK, if ARGV[1] is still the fence.
#: KEYS: fence, stream, dead. ARGV: token, group, reason, then (id, event, repository) triples.
FENCED_PARK = """
if tonumber(redis.call('GET', KEYS[1]) or '0') ~= tonumber(ARGV[1]) then return -1 end
for i = 4, #ARGV, 3 do
  redis.call('XADD', KEYS[3], '*', 'e', ARGV[i + 1], 'r', ARGV[i + 2], 'id', ARGV[i], 'reason', ARGV[3])
  redis.call('XACK', KEYS[2], ARGV[2], ARGV[i])
end
return (#ARGV - 3) / 3
"""


#: What "Redis is down" looks like: on a cluster redis-py also raises RedisClusterException (not a
#: RedisError) when no node serves a slot or the slot map cannot be read.
REDIS_DOWN: tuple[type[BaseException], ...] = (redis.RedisError, RedisClusterException, OSError)


class Fenced(Exception):
    """A newer lease holder has taken the shard: stop, acknowledge nothing more."""


class NotReplicated(redis.RedisError):
    """WAIT returned fewer replicas than ``[notifications] wait_replicas``; ``shards``: those the write touched."""

    def __init__(self, message: str, shards: Iterable[int] = ()) -> None:
        super().__init__(message)
        self.shards = frozenset(shards)


def shard_of(repository: str, shards: int) -> int:
    """The shard a repository's events go to (stable across processes and versions: CRC-32)."""
    return zlib.crc32(repository.encode()) % shards


class RedisStreams:
    """Key names, XADD and the fenced scripts for every shard of one regmw's event streams."""

    def __init__(self, connection: Any, shards: int, wait_replicas: int = 0, wait_timeout: float = 0.1) -> None:
        self.connection = connection
        self.shards = shards
        self.wait_replicas = wait_replicas
        self.wait_ms = max(1, int(wait_timeout * 1000))
        self.cluster = bool(getattr(connection, "cluster", False))
        client = connection.client
        # regmw_redis's lean path for the one request-path command (measured there); any other provider's client
        self._execute = getattr(connection, "execute", None) or client.execute_command
        self._streams = [self.key(shard, "events") for shard in range(shards)]
        self._take_fence = client.register_script(TAKE_FENCE)
        self._ack = client.register_script(FENCED_ACK)
        self._park = client.register_script(FENCED_PARK)
        self._read = client.register_script(FENCED_READ)

    @property
    def client(self) -> Any:
        return self.connection.client

    def key(self, shard: int, *parts: str) -> str:
        return self.connection.key("notify", "{notify-shard:%d}" % shard, *parts)

    def stream(self, shard: int) -> str:
        return self._streams[shard]

    def dead(self, shard: int, endpoint: str) -> str:
        return self.key(shard, "dead", endpoint)

    def endpoint_key(self, endpoint: str) -> str:
        return self.connection.key("notify", "endpoint", endpoint)

    # --- enqueue -------------------------------------------------------------------

    def add(self, entries: Sequence[tuple[str, bytes]], only: str | None = None) -> list[str]:
        """XADD each (repository, event JSON) to its shard in ONE round trip (plus WAIT when configured).

        Raises a RedisError (NotReplicated included) when the events cannot be
        called durable; some may have been added anyway (at-least-once).
        """
        if len(entries) == 1 and not self.wait_replicas and not only:  # the request path: one plain XADD
            repository, data = entries[0]
            return [_text(self._execute("XADD", self._streams[shard_of(repository, self.shards)], "*",
                                        "e", data, "r", repository))]
        if self.wait_replicas and self.cluster:
            return self._add_on_cluster_and_wait(entries, only)
        pipe = self.client.pipeline(transaction=False)
        for repository, data in entries:
            pipe.xadd(self.stream(shard_of(repository, self.shards)), _fields(repository, data, only))
        if self.wait_replicas:
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_ms)
        results = pipe.execute()
        if self.wait_replicas and int(results[-1]) < self.wait_replicas:
            raise NotReplicated(f"WAIT: {results[-1]} of {self.wait_replicas} replicas acknowledged",
                                self._shards_of(entries))
        return [_text(entry_id) for entry_id in results[: len(entries)]]

    def _add_on_cluster_and_wait(self, entries: Sequence[tuple[str, bytes]], only: str | None) -> list[str]:
        """XADD then WAIT on each master, on ONE connection to it: WAIT counts that connection's writes.

        A cluster pipeline would send WAIT to every master on other
        connections (and sum the replies), confirming nothing. So the entries
        are grouped by the master serving their shard's slot, and each group
        is one plain pipeline on that master (a shard's entries keep their
        order: a shard lives on one master). A dead master or a slot moved
        meanwhile (MOVED) is a RedisError, so the caller spools the events
        (at-least-once); as these pipelines bypass the cluster client's own
        error handling, the slot map is re-read first, so the next attempt
        (the spool forwarder's) goes to the promoted replica or new owner.
        """
        by_master: dict[str, tuple[Any, list[int]]] = {}
        for index, (repository, _data) in enumerate(entries):
            name, master = self._master(shard_of(repository, self.shards))
            by_master.setdefault(name, (master, []))[1].append(index)
        ids: list[str] = [""] * len(entries)
        confirmed = []
        for master, indexes in by_master.values():
            pipe = master.pipeline(transaction=False)
            for index in indexes:
                repository, data = entries[index]
                pipe.xadd(self.stream(shard_of(repository, self.shards)), _fields(repository, data, only))
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_ms)
            with self._slot_map_reread_on_error():
                results = pipe.execute()
            for index, entry_id in zip(indexes, results[:-1], strict=True):
                ids[index] = _text(entry_id)
            confirmed.append(int(results[-1]))
        if min(confirmed) < self.wait_replicas:
            raise NotReplicated(f"WAIT: {min(confirmed)} of {self.wait_replicas} replicas acknowledged",
                                self._shards_of(entries))
        return ids

    def _master(self, shard: int) -> tuple[str, Any]:
        """(name, client) of the master serving ``shard``: on a cluster, its node's own client (a plain
        pipeline there stays on one connection to it); otherwise the one client."""
        if not self.cluster:
            return "", self.client
        node = self.client.get_node_from_key(self.stream(shard))
        return node.name, node.redis_connection

    @contextlib.contextmanager
    def _slot_map_reread_on_error(self) -> Iterator[None]:
        """On a cluster, a Redis error in the block re-reads the slot map before it is raised on.

        Pipelines on a node's own client bypass the cluster client's error
        handling, so after a dead master or a moved slot the next attempt
        (the spool forwarder's) would go to the same node again.
        """
        try:
            yield
        except redis.RedisError:
            if self.cluster:
                _refresh_slot_map(self.client)
            raise

    def _shards_of(self, entries: Sequence[tuple[str, bytes]]) -> set[int]:
        return {shard_of(repository, self.shards) for repository, _data in entries}

    def await_replicas(self, shards: Iterable[int]) -> bool:
        """One round of confirming, after an unconfirmed XADD, that the masters of ``shards`` have been replicated.

        For the spool forwarder, which must not delete spooled events that only
        a master holds: a SIGKILLed master would take them along. ``WAIT``
        counts the writes of its own connection, so each master gets, on one
        connection, ``ROLE`` (how many replicas it has), then a marker write
        in the shard's slot and ``WAIT``: replicas that have the marker have
        everything written before it. Returns True when every master has
        ``wait_replicas`` replicas acknowledging; False when one has fewer
        replicas connected than that (nothing to wait for: a promoted replica
        without its own, say), or when it may not be asked (``ROLE`` is
        ``@dangerous`` in Redis's ACLs). Raises :class:`NotReplicated` while
        replicas lag (one ``wait_timeout`` each round), and a Redis error when
        a master is down (the events are then added again, to whoever serves
        the slot).
        """
        masters: dict[str, tuple[Any, int]] = {}
        for shard in sorted(shards):
            name, master = self._master(shard)
            masters.setdefault(name, (master, shard))
        for master, shard in masters.values():
            pipe = master.pipeline(transaction=False)
            pipe.execute_command("ROLE")
            pipe.set(self.key(shard, "replicated"), "1", px=60_000)
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_ms)
            with self._slot_map_reread_on_error():
                role, marker, acknowledged = pipe.execute(raise_on_error=False)
                if isinstance(marker, Exception):  # not this slot's master any more (READONLY, MOVED)
                    raise marker
            if isinstance(role, Exception):  # an ACL user without @dangerous may not ask: nothing to go by
                return False
            if len(role[2]) < self.wait_replicas:
                return False
            if int(acknowledged) < self.wait_replicas:
                raise NotReplicated(f"WAIT: {acknowledged} of {self.wait_replicas} replicas acknowledged", shards)
        return True

    # --- delivery ----------------------------------------------------------------------

    def ensure_groups(self, endpoints: Iterable[str], shards: Iterable[int] | None = None) -> None:
        """Create each endpoint's consumer group on each shard (from the stream's start; MKSTREAM)."""
        for shard in range(self.shards) if shards is None else shards:
            for name in endpoints:
                try:
                    self.client.xgroup_create(self.stream(shard), name, id="0", mkstream=True)
                except redis.ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise

    def take_fence(self, shard: int, token: int) -> None:
        if not self._take_fence(keys=[self.key(shard, "fence")], args=[token]):
            raise Fenced(f"shard {shard}: a newer lease than {token} holds it")

    def ack(self, shard: int, group: str, token: int, ids: Sequence[str]) -> None:
        if ids and self._ack(keys=[self.key(shard, "fence"), self.stream(shard)], args=[token, group, *ids]) == -1:
            raise Fenced(f"shard {shard}: lease {token} was superseded")

    def take(self, shard: int, group: str, consumer: str, token: int, count: int) -> int:
        """Move up to ``count`` new entries into ``consumer``'s pending list (fenced); how many it took."""
        taken = int(self._read(keys=[self.key(shard, "fence"), self.stream(shard)], args=[token, group, consumer, count]))
        if taken == -1:
            raise Fenced(f"shard {shard}: lease {token} was superseded")
        return taken

    def park(self, shard: int, group: str, token: int, entries: Sequence[Any], reason: str) -> None:
        args: list[Any] = [token, group, reason]
        for entry in entries:
            args += [entry.id, entry.raw, entry.repository]
        keys = [self.key(shard, "fence"), self.stream(shard), self.dead(shard, group)]
        if entries and self._park(keys=keys, args=args) == -1:
            raise Fenced(f"shard {shard}: lease {token} was superseded")

    def groups(self, shard: int) -> dict[str, dict[str, Any]]:
        """XINFO GROUPS of a shard, by group name ({} when the stream does not exist)."""
        try:
            infos = self.client.xinfo_groups(self.stream(shard))
        except redis.ResponseError:
            return {}
        return {_text(info["name"]): info for info in infos}

    def trim(self, shard: int, endpoints: Sequence[str]) -> int:
        """XTRIM MINID: drop the entries every endpoint's group has acknowledged. Returns entries removed."""
        if not endpoints:
            return 0
        groups = self.groups(shard)
        floors = []
        for name in endpoints:
            info = groups.get(name)
            if info is None:
                return 0  # a group not created yet would start at "0": keep everything
            if int(info["pending"]):
                oldest = self.client.xpending(self.stream(shard), name)["min"]
                if oldest is None:  # acknowledged since XINFO: its floor moved on; trim next round
                    return 0
                floors.append(_parse_id(_text(oldest)))
            else:
                ms, seq = _parse_id(_text(info["last-delivered-id"]))
                floors.append((ms, seq + 1))
        ms, seq = min(floors)
        return int(self.client.xtrim(self.stream(shard), minid=f"{ms}-{seq}", approximate=False))

    def state(self, endpoint: str) -> tuple[bool, str]:
        values = self.client.hgetall(self.endpoint_key(endpoint))
        values = {_text(k): _text(v) for k, v in values.items()}
        return values.get("paused") == "1", values.get("disabled", "")

    def set_state(self, endpoint: str, paused: bool | None = None, disabled: str | None = None) -> None:
        mapping = {}
        if paused is not None:
            mapping["paused"] = "1" if paused else "0"
        if disabled is not None:
            mapping["disabled"] = disabled
        if mapping:
            self.client.hset(self.endpoint_key(endpoint), mapping=mapping)


def _refresh_slot_map(client: Any) -> None:
    """Re-read the cluster's slot map (what redis-py does after a connection error or MOVED)."""
    try:
        client.nodes_manager.initialize()
    except REDIS_DOWN:
        pass


def _fields(repository: str, data: bytes, only: str | None) -> dict[str, Any]:
    fields: dict[str, Any] = {"e": data, "r": repository}
    if only:
        fields["only"] = only
    return fields


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
