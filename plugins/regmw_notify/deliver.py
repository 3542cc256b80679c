"""POST one batch of events to one endpoint and say what happened.

Only a 2xx is a delivery. A 3xx is a failure (redirects are not followed: a
receiver that moved must be reconfigured, and following one could reach an
address the SSRF guard refuses); 410 Gone means "stop sending" and disables
the endpoint; anything else, including a timeout, is retried on schedule.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import urllib3

from .endpoints import Endpoint, check_address
from .events import MEDIA_TYPE, envelope_raw
from .signing import Signer

DELIVERED, FAILED, GONE = "delivered", "failed", "gone"


@dataclass(frozen=True)
class Outcome:
    result: str  # delivered | failed | gone
    detail: str = ""


class Poster:
    """Sends signed event batches to one endpoint over a kept-alive connection pool."""

    def __init__(self, endpoint: Endpoint, allowed_networks: Sequence = (), connections: int = 64) -> None:
        """``connections``: kept-alive connections to the endpoint, one per lane that may POST at once
        (a lane per leased shard); fewer would make lanes open a new connection per POST."""
        self.endpoint = endpoint
        self._allowed = allowed_networks
        self._signer = Signer(endpoint.secrets)
        self._http = urllib3.PoolManager(
            num_pools=4, maxsize=connections, retries=False, timeout=urllib3.Timeout(total=endpoint.timeout),
        )

    def post(self, message_id: str, raw_events: Sequence[bytes]) -> Outcome:
        """Deliver ``raw_events`` (serialised events) as one ``{"events": [...]}`` body."""
        body = envelope_raw(list(raw_events))
        headers = {"Content-Type": MEDIA_TYPE, **self.endpoint.headers, **self._signer.headers(message_id, body)}
        try:
            check_address(self.endpoint.url, self._allowed)
            response = self._http.request("POST", self.endpoint.url, body=body, headers=headers, redirect=False,
                                          preload_content=True)
        except ValueError as exc:  # the SSRF guard: the name now points somewhere internal
            return Outcome(FAILED, str(exc))
        except urllib3.exceptions.HTTPError as exc:
            return Outcome(FAILED, f"{type(exc).__name__}: {exc}")
        if 200 <= response.status < 300:
            return Outcome(DELIVERED)
        if response.status == 410:
            return Outcome(GONE, "410 Gone")
        return Outcome(FAILED, f"HTTP {response.status}")

    def close(self) -> None:
        self._http.clear()
