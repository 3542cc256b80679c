"""Where the list of replicas comes from.

The router asks its discovery for the current replica URLs at every health
check and adds or drops nodes to match, so a discovery that resolves a DNS
name (an SRV or A record per replica, as the Go registry's load balancer
does) only has to implement :meth:`ReplicaDiscovery.replicas`.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class ReplicaDiscovery(Protocol):
    def replicas(self) -> list[str]:
        """The replica URLs to use now. Raising keeps the previous list."""


class StaticDiscovery:
    """The fixed ``[database] replicas`` list (what the router uses unless given another discovery)."""

    def __init__(self, urls: list[str] | tuple[str, ...]) -> None:
        self._urls = list(urls)

    def replicas(self) -> list[str]:
        return list(self._urls)
