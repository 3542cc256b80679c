"""Who is the client? The socket peer, or X-Forwarded-For behind trusted proxies.

``X-Forwarded-For`` is client-supplied text: it is read only when the socket
peer is one of ``[regmw] trusted_proxies``, and then from the right, skipping
trusted hops, so a client cannot choose its own identity by prepending
addresses. IPv6 clients are grouped by their /64 (configurable), because one
host usually owns a whole /64 and could otherwise dodge a per-IP limit.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache


class ClientResolver:
    def __init__(self, trusted_proxies: Sequence[ipaddress._BaseNetwork] = (), ipv6_prefix: int = 64):
        self.trusted = tuple(trusted_proxies)
        self.ipv6_prefix = ipv6_prefix
        self._key = lru_cache(maxsize=4096)(self._key_uncached)

    def client_key(self, environ: dict) -> str:
        """The string a per-client rate limit counts under."""
        peer = environ.get("REMOTE_ADDR") or "unknown"
        if self.trusted:
            forwarded = environ.get("HTTP_X_FORWARDED_FOR")
            if forwarded and self._is_trusted(peer):
                peer = self._from_forwarded(forwarded, peer)
        return self._key(peer)

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.trusted)

    def _from_forwarded(self, header: str, peer: str) -> str:
        hops = [hop.strip() for hop in header.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                try:
                    ipaddress.ip_address(hop)
                except ValueError:
                    return peer  # garbage in the header: fall back to the proxy itself
                return hop
        return hops[0] if hops else peer

    def _key_uncached(self, address: str) -> str:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address
        if ip.version == 6:
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.ip_network(f"{ip}/{self.ipv6_prefix}", strict=False))
        return str(ip)
