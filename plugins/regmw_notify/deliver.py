"""POST one batch of events to one endpoint and say what happened.

Only a 2xx is a delivery. A 3xx is a failure (redirects are not followed: a
receiver that moved must be reconfigured, and following one could reach an
address the SSRF guard refuses); 410 Gone means "stop sending" and disables
the endpoint; anything else, including a timeout, is retried on schedule.

An endpoint's ``timeout`` bounds the whole POST (connecting, sending, the
status, the headers and the body of the answer), not each socket read: a
receiver dribbling its answer a byte at a time must not hold a lane (and its
shard's order) past it, nor outlast ``claim_idle``, which assumes a POST is
over by then. Of the answer's body at most :data:`MAX_ANSWER` is read.
"""
from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection

from regmw.strict_http import DIGITS, StrictResponse

from .endpoints import Endpoint, check_address
from .events import MEDIA_TYPE, envelope_raw
from .signing import Signer

log = logging.getLogger("regmw.notify")

DELIVERED, FAILED, GONE = "delivered", "failed", "gone"


@dataclass(frozen=True)
class Outcome:
    result: str  # delivered | failed | gone
    detail: str = ""
    retry_after: float = 0.0  # seconds a 429 or 503 asked the sender to wait (Retry-After), 0 = none


#: Of an answer's body, at most this much is read (and dropped) to keep its connection; a longer body closes it.
MAX_ANSWER = 64 * 1024


def retry_after(value: str | None, now: float | None = None) -> float:
    """Seconds a ``Retry-After`` header asks for: delta-seconds or an HTTP-date; 0 when absent or unreadable."""
    if not value:
        return 0.0
    value = value.strip()
    # delta-seconds (RFC 9110 10.2.3): ASCII digits; ``str.isdigit()`` is also true of ``²`` (a receiver's byte
    # 0xB2, read as Latin-1), which ``float()`` refuses: the ValueError stopped every lane of the process
    if DIGITS.fullmatch(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return 0.0
    if when.tzinfo is None:
        return 0.0
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _Watchdog:
    """One thread for every watched connection: shuts down the socket of a request past its deadline.

    (One thread for all, not a timer per POST: starting a thread per POST
    doubled the cost of a POST on loopback.) It checks every 50 ms while
    something is watched and sleeps otherwise; the check and the shutdown run
    under the lock that :meth:`forget` takes, so a connection forgotten and
    reused for the next request is never cut by its previous deadline.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deadlines: dict[object, float] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, connection: object, deadline: float) -> None:
        with self._lock:
            self._deadlines[connection] = deadline
            if self._thread is None or not self._thread.is_alive():  # (again in a forked child)
                self._thread = threading.Thread(target=self._run, name="regmw-notify-watchdog", daemon=True)
                self._thread.start()
        self._wake.set()

    def forget(self, connection: object) -> None:
        with self._lock:
            self._deadlines.pop(connection, None)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            with self._lock:
                now = time.monotonic()
                for connection in [c for c, deadline in self._deadlines.items() if deadline <= now]:
                    del self._deadlines[connection]
                    sock = getattr(connection, "sock", None)
                    if sock is not None:
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)
                if not self._deadlines:
                    self._wake.clear()
            time.sleep(0.05)


_WATCHDOG = _Watchdog()


class _Deadline:
    """A connection whose every request, answer included, is over within ``total`` seconds.

    ``urllib3.Timeout(total=...)`` bounds each socket read by what is left, not
    the request: the watchdog shuts the socket down at the deadline, so the
    read in progress fails (urllib3 then discards the connection).
    """

    total = 5.0

    def request(self, *args, **kwargs):  # noqa: ANN002, ANN003 - urllib3's own signature, passed through
        _WATCHDOG.watch(self, time.monotonic() + self.total)
        try:
            return super().request(*args, **kwargs)
        except BaseException:
            _WATCHDOG.forget(self)
            raise

    def getresponse(self, *args, **kwargs):  # noqa: ANN002, ANN003 - the body is read here too (preload_content)
        try:
            return super().getresponse(*args, **kwargs)
        finally:
            _WATCHDOG.forget(self)


def _pool_classes(total: float) -> dict[str, type]:
    """urllib3 connection pools whose connections enforce ``total`` (see :class:`_Deadline`)."""
    # StrictResponse: http.client took a head the receiver hung up in ("HTTP/1.1 200 OK" and half a header)
    # for a whole one, so a receiver that died mid-answer had its events acknowledged
    strict = {"total": total, "response_class": StrictResponse}
    http = type("DeadlineHTTPConnection", (_Deadline, HTTPConnection), strict)
    https = type("DeadlineHTTPSConnection", (_Deadline, HTTPSConnection), strict)
    return {"http": type("DeadlinePool", (urllib3.HTTPConnectionPool,), {"ConnectionCls": http}),
            "https": type("DeadlineTLSPool", (urllib3.HTTPSConnectionPool,), {"ConnectionCls": https})}


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
        self._http.pool_classes_by_scheme = _pool_classes(endpoint.timeout)

    def post(self, message_id: str, raw_events: Sequence[bytes]) -> Outcome:
        """Deliver ``raw_events`` (serialised events) as one ``{"events": [...]}`` body.

        Whatever goes wrong is a failed POST, retried on schedule: an exception
        would end the lane, and without Redis every lane of the process with it
        (they share one stop event), so one receiver's odd answer stopped all
        delivery until a restart.
        """
        try:
            return self._post(message_id, raw_events)
        except Exception as exc:  # noqa: BLE001 - see above; logged with its traceback, it is a bug to fix
            log.exception("endpoint %s: POST failed unexpectedly", self.endpoint.name)
            return Outcome(FAILED, f"{type(exc).__name__}: {exc}")

    def _post(self, message_id: str, raw_events: Sequence[bytes]) -> Outcome:
        body = envelope_raw(list(raw_events))
        # case-insensitive: an endpoint's "content-type" replaces ours instead of making a second one
        headers = urllib3.HTTPHeaderDict({"Content-Type": MEDIA_TYPE})
        headers.update(self.endpoint.headers)
        headers.update(self._signer.headers(message_id, body))
        started = time.monotonic()
        try:
            check_address(self.endpoint.url, self._allowed)
            response = self._http.request("POST", self.endpoint.url, body=body, headers=headers, redirect=False,
                                          preload_content=False)
            _read_answer(response, started + self.endpoint.timeout)
        except ValueError as exc:  # the SSRF guard: the name now points somewhere internal
            return Outcome(FAILED, str(exc))
        except urllib3.exceptions.HTTPError as exc:
            late = " (timed out)" if time.monotonic() - started >= self.endpoint.timeout else ""
            return Outcome(FAILED, f"{type(exc).__name__}{late}: {exc}")
        if 200 <= response.status < 300:
            return Outcome(DELIVERED)
        if response.status == 410:
            return Outcome(GONE, "410 Gone")
        wait = retry_after(response.headers.get("Retry-After")) if response.status in (429, 503) else 0.0
        return Outcome(FAILED, f"HTTP {response.status}", wait)

    def close(self) -> None:
        self._http.clear()


def _read_answer(response: urllib3.BaseHTTPResponse, deadline: float) -> None:
    """Read the answer's body, at most :data:`MAX_ANSWER` of it, by ``deadline``; then let the connection go.

    The body says nothing (the status is the outcome), but read whole
    (``preload_content``) it was held in memory, as much as a receiver could
    send within the timeout: 1.2 GB in 2 s on loopback, in the server process
    that delivers without Redis. A longer body closes the connection instead
    of being drained. The watchdog keeps the POST's deadline over this read
    (it let go of the connection once the head was in).
    """
    connection = response.connection
    if connection is not None:
        _WATCHDOG.watch(connection, deadline)
    try:
        left = MAX_ANSWER
        while left > 0 and (piece := response.read(min(left, 16384))):
            left -= len(piece)
        if left <= 0 and response.read(1):  # more than MAX_ANSWER: do not read on
            response.close()
    finally:
        if connection is not None:
            _WATCHDOG.forget(connection)
        response.release_conn()
