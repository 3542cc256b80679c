"""Webhook endpoints: their settings, which events they want, and the SSRF guard.

An endpoint URL is refused when its host is, or resolves to, anything but a
public unicast address (see :func:`_internal`), unless that address is
in ``[notifications] allowed_networks``: a registry's webhook configuration
must not become a way to reach the cloud metadata service or internal admin
ports. The check runs at start-up and again before every connection (a DNS
name may change what it points at).
"""
from __future__ import annotations

import fnmatch
import ipaddress
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from standardwebhooks import Webhook

DEFAULT_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0)
_KEYS = {"name", "url", "secrets", "actions", "media_types", "repositories", "timeout", "retry_schedule",
         "jitter", "max_age", "batch_max", "headers"}
#: headers an endpoint's ``headers`` may not set: the signature's, and what the POST itself must say
_RESERVED_HEADERS = {"webhook-id", "webhook-timestamp", "webhook-signature", "content-length", "host",
                     "transfer-encoding", "connection"}


@dataclass(frozen=True)
class Endpoint:
    """One receiver and its delivery policy."""

    name: str
    url: str
    secrets: tuple[str, ...] = ()
    actions: frozenset[str] = frozenset()
    media_types: frozenset[str] = frozenset()
    repositories: tuple[str, ...] = ()
    timeout: float = 5.0
    retry_schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    jitter: float = 0.2
    max_age: float = 259200.0
    batch_max: int = 1
    headers: Mapping[str, str] = field(default_factory=dict)

    def wants(self, event: Mapping[str, Any]) -> bool:
        """True if this endpoint's filters let ``event`` through (empty filter = everything)."""
        if self.actions and event.get("action") not in self.actions:
            return False
        target = event.get("target") or {}
        if self.media_types and target.get("mediaType") not in self.media_types:
            return False
        if self.repositories:
            repository = target.get("repository") or ""
            return any(fnmatch.fnmatchcase(repository, pattern) for pattern in self.repositories)
        return True

    def delay(self, attempts: int, random: float) -> float:
        """Seconds before attempt ``attempts + 1`` (``retry_schedule[attempts]``, the last repeating).

        ``random`` in [0, 1) spreads it by ±jitter so that endpoints recovering
        from one outage are not all retried in the same instant.
        """
        base = self.retry_schedule[min(attempts, len(self.retry_schedule) - 1)]
        return base * (1.0 + self.jitter * (2.0 * random - 1.0))


def parse_endpoints(tables: Iterable[Mapping[str, Any]], allowed: Sequence[Any] = ()) -> list[Endpoint]:
    """Endpoints from ``[notifications] endpoints``; raises ValueError naming the bad field."""
    endpoints: list[Endpoint] = []
    for index, table in enumerate(tables):
        where = f"endpoints[{index}]"
        unknown = set(table) - _KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        name, url = table.get("name"), table.get("url")
        if not isinstance(name, str) or not name or any(char in name for char in "{}: "):
            raise ValueError(f"{where}.name: required, without braces, colons or spaces")
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise ValueError(f"{where}.url: an http:// or https:// URL is required")
        check_address(url, allowed, where, resolve=False)
        secrets = _strings(table, "secrets", where)
        for secret in secrets:
            try:
                Webhook(secret)
            except Exception as exc:
                raise ValueError(f"{where}.secrets: not a Standard Webhooks secret ({exc})") from None
        schedule = table.get("retry_schedule", DEFAULT_SCHEDULE)
        if (isinstance(schedule, (str, bytes)) or not isinstance(schedule, Iterable)
                or not all(_number(delay) and delay >= 0 for delay in schedule) or not schedule):
            raise ValueError(f"{where}.retry_schedule: a non-empty list of seconds >= 0")
        batch_max = table.get("batch_max", 1)
        if not isinstance(batch_max, int) or isinstance(batch_max, bool) or batch_max < 1:
            raise ValueError(f"{where}.batch_max: an integer, at least 1")
        timeout, jitter, max_age = table.get("timeout", 5.0), table.get("jitter", 0.2), table.get("max_age", 259200.0)
        if not _number(timeout) or timeout <= 0:
            raise ValueError(f"{where}.timeout: seconds, more than 0")
        if not _number(jitter) or not 0 <= jitter <= 1:
            raise ValueError(f"{where}.jitter: a fraction from 0 to 1")
        if not _number(max_age) or max_age < 0:
            raise ValueError(f"{where}.max_age: seconds, at least 0")
        headers = table.get("headers", {})
        if not isinstance(headers, Mapping) or not all(isinstance(key, str) and isinstance(value, str)
                                                       for key, value in headers.items()):
            raise ValueError(f"{where}.headers: a table of header names to string values")
        reserved = sorted(key for key in headers if key.lower() in _RESERVED_HEADERS)
        if reserved:
            raise ValueError(f"{where}.headers: {', '.join(reserved)} cannot be set (the signature's, or the "
                             "request's own)")
        endpoints.append(Endpoint(
            name=name, url=url, secrets=secrets,
            actions=frozenset(_strings(table, "actions", where)),
            media_types=frozenset(_strings(table, "media_types", where)),
            repositories=_strings(table, "repositories", where), timeout=float(timeout),
            retry_schedule=tuple(float(delay) for delay in schedule), jitter=float(jitter),
            max_age=float(max_age), batch_max=batch_max, headers=dict(headers),
        ))
    names = [endpoint.name for endpoint in endpoints]
    if len(set(names)) != len(names):
        raise ValueError("endpoints: names must be unique")
    return endpoints


def _strings(table: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    """``table[key]`` as a tuple of strings; a lone string is refused (as a list of its characters, a filter
    ``actions = "push"`` would silently let nothing through)."""
    value = table.get(key, ())
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) or not all(
            isinstance(item, str) for item in value):
        raise ValueError(f"{where}.{key}: a list of strings, e.g. [\"...\"]")
    return tuple(value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_address(url: str, allowed: Sequence[Any] = (), where: str = "url", resolve: bool = True) -> None:
    """Raise ValueError if ``url``'s host is (or resolves to) an internal address not in ``allowed``.

    ``resolve=False`` (configuration checks, which must stay offline) checks
    IP literals and ``localhost`` only; names are checked before each POST.
    """
    host = (urlsplit(url).hostname or "").rstrip(".")
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        if host == "localhost" or host.endswith(".localhost"):
            addresses = [ipaddress.ip_address("127.0.0.1")]
        elif not resolve:
            return
        else:
            try:
                infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
            except OSError as exc:  # fail closed: the connection's own look-up a moment later might succeed
                raise ValueError(f"{where}: {host} could not be resolved to check its address ({exc})") from None
            addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    for address in addresses:
        if _internal(address) and not any(address in network for network in allowed):
            raise ValueError(f"{where}: {host} is an internal address ({address}); "
                             "add its network to [notifications] allowed_networks to allow it")


def _internal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Not a public unicast address: loopback, link-local, private, shared (100.64.0.0/10, where some clouds
    serve their metadata), multicast, reserved, unspecified; for IPv6 also an IPv4 address embedded in it
    (mapped ``::ffff:a.b.c.d``, 6to4, Teredo) that is internal."""
    if (address.is_loopback or address.is_link_local or address.is_private or address.is_multicast
            or address.is_unspecified or address.is_reserved or not address.is_global):
        return True
    if isinstance(address, ipaddress.IPv6Address):
        embedded = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
        return any(inner is not None and _internal(inner) for inner in embedded)
    return False
