"""A real webhook receiver on loopback: records what it gets, verifies signatures, fails on demand.

It verifies each POST with the receiver-side check of the ``standardwebhooks``
package (``Webhook(secret).verify``), as a real receiver would, and records
the events of every POST it answered 2xx, in arrival order. ``status`` set to
503 (or 410, 302...) makes it refuse everything until set back to 200.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks import Webhook

from ._util import wait_for_port

SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class Receiver(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # listen backlog: the default 5 drops SYNs from many lanes (1 s retransmits)

    def __init__(self, secret: str = SECRET) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.verifier = Webhook(secret)
        self.lock = threading.Lock()
        self.events: list[dict] = []  # every event of every accepted POST, in arrival order
        self.posts = 0
        self.bad_signatures = 0
        self.status = 200
        self.refused = 0
        self.record = False  # True: keep every complete POST (not in long runs: they add up)
        self.raw: list[tuple[dict[str, str], bytes, int]] = []  # each recorded POST: headers, body, status
        self.arrivals: list[float] = []  # time.monotonic() of each of them
        self.reply_headers: dict[str, str] = {}  # sent with every refusal (e.g. Retry-After)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/hook"

    def handle_error(self, request, client_address) -> None:
        """A worker SIGKILLed mid-request resets its connection: expected here, not worth a traceback."""

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.events)

    def count(self) -> int:
        with self.lock:
            return len(self.events)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        server: Receiver = self.server  # type: ignore[assignment]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if len(body) < length:  # the sender died mid-request: nothing was received
            self.close_connection = True
            return
        status = server.status
        if server.record:
            with server.lock:
                server.raw.append((dict(self.headers.items()), body, status))
                server.arrivals.append(time.monotonic())
        if status == 200:
            try:
                payload = server.verifier.verify(body, dict(self.headers.items()))
            except Exception:
                with server.lock:
                    server.bad_signatures += 1
                status = 400
            else:
                with server.lock:
                    server.posts += 1
                    server.events.extend(payload["events"])
        else:
            with server.lock:
                server.refused += 1
        self.send_response(status)
        for name, value in (server.reply_headers if status != 200 else {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def webhook_receiver() -> Callable[..., Receiver]:
    """``webhook_receiver() -> Receiver`` (``.url``, ``.events``, ``.status``); shut down at teardown."""
    servers = []

    def start(secret: str = SECRET) -> Receiver:
        server = Receiver(secret)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        servers.append((server, thread))
        wait_for_port(server.server_port)
        return server

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(10)


def first_deliveries(events: list[dict]) -> list[dict]:
    """The events in order of their first arrival (later copies of an id are duplicates)."""
    seen: set[str] = set()
    out = []
    for event in events:
        if event["id"] not in seen:
            seen.add(event["id"])
            out.append(event)
    return out


def dump(events: list[dict]) -> str:
    return json.dumps(events[:5], indent=1)
