"""Redis Cluster: ``redis+cluster://`` / ``rediss+cluster://`` URLs on redis-py's ``RedisCluster``.

Sentinel gives failover but no capacity: every counter and lock still lands on
one primary. On a Cluster the keys are spread over 16384 slots, and regmw's
key layout (docs/redis.md) keeps what one script touches in one slot:

- a repository's keys carry the hash tag ``{repository:<name>}`` (lock,
  fencing counter, classification cache entry, WAL position, per-repository
  rate-limit counters);
- a rate-limit counter is tagged by its rule's identity, ``{client:<addr>}``,
  ``{subject:<sub>}``, ``{global:*}`` (:class:`TaggedRule`), so each rule's
  counter is one key in one slot, and all of one client's counters share it;
- a semaphore's keys carry ``{slot:<name>}``.

So a request touches at most a few slots (typically two: its client's and its
repository's). :class:`ClusterAdmission` sends one admission script per slot
group, concurrently, so wall time stays about one round trip.

Building the client opens no connection: ``RedisCluster`` asks a node for the
slot map in its constructor, so :class:`LazyRedisCluster` builds it on first
use (``regmw check-config`` stays offline; a cluster down at start-up is a
Redis error at first use, with the feature's failure policy, not a crash).
MOVED / ASK redirections, TRYAGAIN during resharding and a failover's
topology change are handled by redis-py (it re-reads the slot map); every
redirection reply is counted in ``regmw_redis_cluster_redirections_total``.
"""
from __future__ import annotations

import contextlib
import ssl
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
from prometheus_client import Counter
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.commands.core import Script
from redis.connection import Connection, ConnectionPool
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    TryAgainError,
)
from redis.retry import Retry

from regmw import metrics
from regmw.defaults.ratelimit import Rule

from .connection import RedisConnection, check_query, counting, split_hosts

__all__ = [
    "CLUSTER_SCHEMES", "ClusterConnection", "ClusterTarget", "LazyRedisCluster", "NODES", "REDIRECTIONS", "SlotGroups",
    "cluster_options", "connection_for",
    "TaggedRule", "parse_cluster_url", "slot_of", "tagged",
]

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")

REDIRECTIONS = Counter(
    "regmw_redis_cluster_redirections_total",
    "Redis Cluster topology replies met (and followed by redis-py): MOVED, ASK, TRYAGAIN, CLUSTERDOWN.",
    ["kind"],
    registry=metrics.REGISTRY,
)
NODES = Counter(
    "regmw_redis_cluster_admission_nodes_total",
    "Cluster nodes the admission asked, summed over requests (divide by requests: nodes per request).",
    registry=metrics.REGISTRY,
)


# --- URLs ----------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterTarget:
    """What a ``redis+cluster://`` URL points at: startup nodes (any of the cluster's), credentials, TLS."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    tls: bool = False


def parse_cluster_url(url: str, section: Mapping[str, Any] | None = None) -> ClusterTarget:
    """``redis+cluster://[[user]:password@]host:port[,host:port...]``; ``rediss+cluster://`` for TLS.

    A Cluster has no databases (``db`` must be 0) and no service name; the
    section's ``password`` wins over the URL's.
    """
    section = section or {}
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"not a cluster URL: {url!r}")
    check_query(parts.query)
    username, password, nodes = split_hosts(parts.netloc, "cluster node address")
    query_db = parse_qs(parts.query).get("db", ["0"])[0]
    if parts.path.strip("/") not in ("", "0") or query_db != "0" or (section.get("db") or 0) != 0:
        raise ValueError("a Redis Cluster has only database 0 (drop the /<db> from the URL and [redis] db)")
    return ClusterTarget(
        tuple(nodes), username, section.get("password") or password, tls=parts.scheme.startswith("rediss")
    )


# --- the lazy client -------------------------------------------------------------


class _CountingRedirections:
    """Counts MOVED / ASK / TRYAGAIN / CLUSTERDOWN replies as they are read (redis-py then follows them)."""

    def read_response(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except MovedError:
            REDIRECTIONS.labels("moved").inc()
            raise
        except AskError:
            REDIRECTIONS.labels("ask").inc()
            raise
        except TryAgainError:
            REDIRECTIONS.labels("tryagain").inc()
            raise
        except ClusterDownError:
            REDIRECTIONS.labels("clusterdown").inc()
            raise


_CLASSES: dict[type, type] = {}


def _node_connection_class(base: type) -> type:
    """``base`` counting round trips (:func:`counting`) and redirections."""
    if base not in _CLASSES:
        _CLASSES[base] = type("Cluster" + base.__name__, (_CountingRedirections, counting(base)), {})
    return _CLASSES[base]


class LazyRedisCluster:
    """A ``RedisCluster`` built on first use (its constructor connects to read the slot map).

    ``register_script`` and ``get_encoder`` answer without connecting, so
    backends can register their scripts at start-up; every other attribute is
    the real client's. A failure to reach any startup node is raised as
    :class:`redis.ConnectionError` (a :class:`redis.RedisError`, so every
    feature's failure policy applies), and the next use tries again. A TLS
    certificate the CA does not vouch for is reported in one line naming the
    node and ``[redis] tls_ca_file``.
    """

    def __init__(self, target: ClusterTarget, options: dict[str, Any]) -> None:
        self._target = target
        self._options = options
        self._client: RedisCluster | None = None
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        return self._client is not None

    def get_encoder(self) -> Any:
        return redis.connection.Encoder("utf-8", "strict", False)

    def register_script(self, script: str) -> Script:
        return Script(self, script)

    def real(self) -> RedisCluster:
        """The ``RedisCluster`` (built now if it was not yet)."""
        client = self._client
        if client is not None:
            return client
        with self._lock:
            if self._client is None:
                self._client = self._build()
            return self._client

    def _build(self) -> RedisCluster:
        (host, port), rest = self._target.nodes[0], self._target.nodes[1:]
        scheme = "rediss" if self._target.tls else "redis"
        try:
            return RedisCluster(
                url=f"{scheme}://{_bracket(host)}:{port}",
                startup_nodes=[ClusterNode(h, p) for h, p in rest],
                **self._options,
            )
        except (RedisClusterException, redis.RedisError, OSError) as exc:
            raise redis.ConnectionError(_explain(exc, self._target, self._options)) from exc

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(redis.RedisError, OSError, RedisClusterException):
                client.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real(), name)

    def __repr__(self) -> str:
        nodes = ",".join(f"{h}:{p}" for h, p in self._target.nodes)
        return f"<LazyRedisCluster {nodes} {'built' if self.built else 'not connected'}>"


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _explain(exc: BaseException, target: ClusterTarget, options: Mapping[str, Any]) -> str:
    """One line saying why no startup node answered; a certificate failure says which CA refused it."""
    nodes = ",".join(f"{h}:{p}" for h, p in target.nodes)
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(cause):
            ca = options.get("ssl_ca_certs") or "the system CA store"
            return (f"Redis Cluster {nodes}: TLS certificate not trusted by {ca} ([redis] tls_ca_file): "
                    f"{getattr(cause, 'verify_message', None) or 'certificate verify failed'}")
        cause = cause.__cause__ or cause.__context__
    return f"Redis Cluster {nodes} unreachable: {' '.join(str(exc).split())}"


class _CountingPool(ConnectionPool):
    """A node's pool whose connections count round trips and redirections."""

    def __init__(self, connection_class: type = Connection, **kwargs: Any) -> None:
        super().__init__(connection_class=_node_connection_class(connection_class), **kwargs)


def cluster_options(section: Mapping[str, Any], target: ClusterTarget) -> dict[str, Any]:
    """``RedisCluster`` keyword arguments for a ``[redis]`` section (short timeouts, one retry, no backoff)."""
    options: dict[str, Any] = {
        "socket_timeout": section["socket_timeout"],
        "socket_connect_timeout": section["connect_timeout"],
        # Cluster-level retries: after a connection error redis-py re-reads the
        # slot map and tries again, without the default exponential backoff (a
        # request never waits for a failover; the failure policy applies).
        "retry": Retry(NoBackoff(), section["retries"]),
        "client_name": section["client_name"] or None,
        "protocol": section["protocol"],
        "max_connections": section["max_connections"],
        "connection_pool_class": _CountingPool,
        # a slot without a master during a failover is an error for that slot's
        # keys only, not for the whole client
        "require_full_coverage": False,
    }
    if target.username:
        options["username"] = target.username
    if target.password:
        options["password"] = target.password
    if target.tls:
        options["ssl_cert_reqs"] = "required"
        if section.get("tls_ca_file"):
            options["ssl_ca_certs"] = str(section["tls_ca_file"])
    return options


class ClusterConnection(RedisConnection):
    """``services.redis`` on a Redis Cluster: ``.client`` is a (lazily built) ``RedisCluster``, ``.cluster`` True."""

    cluster = True

    def __init__(self, section: Mapping[str, Any]) -> None:
        self.section = section
        self.namespace = section["namespace"]
        self.target = parse_cluster_url(section["url"], section)
        self.client = LazyRedisCluster(self.target, cluster_options(section, self.target))  # type: ignore[assignment]

    def ping(self) -> None:
        """Raise unless every master answers (``PING`` goes to all primaries)."""
        self.client.real().ping(target_nodes=RedisCluster.PRIMARIES)

    def close(self) -> None:
        self.client.close()  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        nodes = ",".join(f"{h}:{p}" for h, p in self.target.nodes)
        return f"<ClusterConnection {nodes} namespace={self.namespace!r}>"


def connection_for(section: Mapping[str, Any]) -> RedisConnection:
    """The ``services.redis`` for a section: a :class:`ClusterConnection` for cluster URLs."""
    if urlsplit(section["url"]).scheme in CLUSTER_SCHEMES:
        return ClusterConnection(section)
    return RedisConnection(section)


# --- key layout -------------------------------------------------------------------


def slot_of(key: str | bytes) -> int:
    """The Cluster slot of ``key`` (its hash tag's, when it has one)."""
    return key_slot(key.encode() if isinstance(key, str) else key)


@dataclass(frozen=True)
class TaggedRule(Rule):
    """A rule whose identity is a hash tag, ``{<by>:<identity>}``: each counter one key, one slot per identity.

    ``by = "repository"`` gives ``{repository:<name>}``, the repository's own
    tag, so its per-repository counters sit with its lock and classification.
    Both hot paths (the script and ``limits``) get the tagged identity, so
    they still count the same windows.
    """

    def identity(self, context: Any) -> str | None:
        identity = Rule.identity(self, context)
        return None if identity is None else "{" + self.by + ":" + identity + "}"


def tagged(rules: Sequence[Rule]) -> list[Rule]:
    """``rules`` as :class:`TaggedRule` (for a Cluster)."""
    return [TaggedRule(rule.name, rule.by, rule.items, rule.methods) for rule in rules]


# --- the admission, one script per slot group, concurrently --------------------------


class SlotGroups:
    """Splits one admission call (the ADMIT script's KEYS/ARGV) into one call per slot, run concurrently.

    The reply is put back together in the single-node layout:
    ``[locked, n_counted, (count, pttl) per counted limit in rule order, prefetch values...]``.
    Each group stops counting at its own first exceeded limit; a limit not
    counted because its group stopped is left out of the pairs. That cannot
    misplace a result the admission reads: within a group the order is the
    rules' order, so every left-out limit comes after a refusal, and the
    admission stops reading at the first refusal.
    """

    #: ``direct`` (default): every node's calls written on one pooled connection per node, then
    #: read (:meth:`_direct`); ``pipeline``: the same through redis-py's cluster pipeline (more CPU).
    mode = "direct"

    def __init__(self, client: LazyRedisCluster, script: Script) -> None:
        self.client = client
        self.script = script

    @staticmethod
    def split(keys: Sequence[str], args: Sequence[Any]) -> list[tuple[list[str], list[Any], list[tuple[str, int]]]]:
        """Per slot, in the order slots first appear: (KEYS, ARGV, layout) of one ADMIT call.

        ``layout`` says what each part of that call's reply is: ``("lock", 0)``,
        ``("limit", i)`` (the i-th limit of the whole request), ``("prefetch", j)``.
        """
        check_lock = args[0] == "1"
        n_limits = int(args[1])
        start = 1 if check_lock else 0
        groups: dict[int, dict[str, list[Any]]] = {}

        def group(key: str) -> dict[str, list[Any]]:
            return groups.setdefault(slot_of(key), {"lock": [], "limits": [], "limit_args": [], "layout": [],
                                                    "prefetch": [], "prefetch_layout": []})

        if check_lock:
            g = group(keys[0])
            g["lock"].append(keys[0])
            g["layout"].append(("lock", 0))
        for i in range(n_limits):
            g = group(keys[start + i])
            g["limits"].append(keys[start + i])
            g["limit_args"] += [args[2 + 2 * i], args[3 + 2 * i]]
            g["layout"].append(("limit", i))
        for j, key in enumerate(keys[start + n_limits:]):
            g = group(key)
            g["prefetch"].append(key)
            g["prefetch_layout"].append(("prefetch", j))
        return [
            (g["lock"] + g["limits"] + g["prefetch"],
             ["1" if g["lock"] else "0", len(g["limits"]), *g["limit_args"]],
             g["layout"] + g["prefetch_layout"])
            for g in groups.values()
        ]

    def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> list[Any]:
        calls = self.split(keys, args)
        client = self.client.real()
        nodes = [client.get_node_from_key(call_keys[0]) for call_keys, _, _ in calls]
        NODES.inc(len({node.name for node in nodes}))
        if len(calls) == 1:
            replies = [self.script(keys=calls[0][0], args=calls[0][1])]
        elif self.mode == "direct":
            replies = self._direct(client, calls, nodes)
        else:
            replies = self._pipeline(client, calls, nodes)
        return self._merge(calls, replies, args)

    def _pipeline(self, client: RedisCluster, calls, nodes) -> list[Any]:
        """One non-transactional cluster pipeline: redis-py writes every node's commands, then reads them.

        So the nodes work at the same time (one round trip of wall time), and
        two slot groups on one node share one round trip. MOVED / ASK /
        connection errors are retried by redis-py one by one; a NOSCRIPT
        (a node that lost its scripts: restart, failover, SCRIPT FLUSH) is
        retried here through the script, which loads it.
        """
        pipe = client.pipeline(transaction=False)
        for (call_keys, call_args, _), node in zip(calls, nodes, strict=True):
            # EVALSHA by name (redis-py blocks the evalsha() method in cluster pipelines, not the
            # command), sent to the slot's master as the slot map says: without target_nodes the
            # pipeline would ask the server COMMAND GETKEYS first, a round trip per script. A stale
            # map is answered MOVED, which redis-py retries through the cluster client (by keys).
            pipe.execute_command("EVALSHA", self.script.sha, len(call_keys), *call_keys, *call_args,
                                 target_nodes=node)
        replies = pipe.execute(raise_on_error=False)
        for index, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):
                replies[index] = self.script(keys=calls[index][0], args=calls[index][1])
            elif isinstance(reply, BaseException):
                raise reply
        return replies

    def _direct(self, client: RedisCluster, calls, nodes) -> list[Any]:
        """Write every node's EVALSHAs on one pooled connection per node, then read the replies.

        The same write-all-then-read-all as redis-py's cluster pipeline, without
        its per-command bookkeeping (about as much CPU per request as the rest
        of the admission). Any call that does not come back as a plain reply —
        MOVED / ASK / TRYAGAIN (slots moving), NOSCRIPT, a connection error (a
        master down) — is re-run alone through the script on the cluster
        client, which follows redirections, reloads the script and re-reads the
        slot map: the same handling as for a single-slot request.
        """
        by_node: dict[str, list[int]] = {}
        for index, node in enumerate(nodes):
            by_node.setdefault(node.name, []).append(index)
        replies: list[Any] = [None] * len(calls)
        again: list[int] = []
        sent: list[tuple[Any, Any, list[int]]] = []
        try:
            for indexes in by_node.values():
                try:
                    pool = client.get_redis_connection(nodes[indexes[0]]).connection_pool
                    connection = pool.get_connection()
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    again += indexes
                    continue
                sent.append((pool, connection, indexes))
                try:
                    connection.send_packed_command(connection.pack_commands(
                        [("EVALSHA", self.script.sha, len(calls[i][0]), *calls[i][0], *calls[i][1]) for i in indexes]
                    ))
                except (redis.ConnectionError, redis.TimeoutError, OSError):
                    connection.disconnect()
                    again += indexes
                    indexes[:] = []  # nothing to read on this one
            for _, connection, indexes in sent:
                for position, index in enumerate(indexes):
                    try:
                        replies[index] = connection.read_response()
                    except redis.ResponseError:  # MOVED, ASK, TRYAGAIN, NOSCRIPT, ...: the reply was read whole
                        again.append(index)
                    except (redis.ConnectionError, redis.TimeoutError, OSError):
                        connection.disconnect()
                        again += indexes[position:]
                        break
        finally:
            for pool, connection, _ in sent:
                pool.release(connection)
        for index in again:
            replies[index] = self.script(keys=calls[index][0], args=calls[index][1])
        return replies

    @staticmethod
    def _merge(calls, replies, args) -> list[Any]:
        n_limits = int(args[1])
        locked = 0
        pairs: dict[int, tuple[Any, Any]] = {}
        prefetched: dict[int, Any] = {}
        for (_, _, layout), reply in zip(calls, replies, strict=True):
            if layout and layout[0][0] == "lock":
                locked = reply[0]
            n_counted = reply[1]
            limits = [index for kind, index in layout if kind == "limit"]
            for position, index in enumerate(limits[:n_counted]):
                pairs[index] = (reply[2 + 2 * position], reply[3 + 2 * position])
            values = reply[2 + 2 * n_counted:]
            for (_, index), value in zip([item for item in layout if item[0] == "prefetch"], values, strict=True):
                prefetched[index] = value
        out: list[Any] = [locked, 0]
        for index in range(n_limits):
            if index in pairs:
                out += list(pairs[index])
                out[1] += 1
        out += [prefetched[index] for index in sorted(prefetched)]
        return out
