"""A fake GCS JSON API on loopback that answers ``objects.list`` with whatever body a test sets.

The emulator only ever answers well; a real HTTP server is how a test makes
google-cloud-storage receive the shapes GCS never promised (a proxy or cache
in the way, a bug, a truncated body) through the client's whole stack.
Every request is logged with its query; ``stop()`` shuts it down (also at
fixture teardown).
"""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlsplit

import pytest

#: (status, content type, body) for the ``prefix`` asked
Answer = Callable[[str], tuple[int, str, bytes]]


class FakeGCS:
    def __init__(self) -> None:
        self.answer: Answer = lambda prefix: (200, "application/json", b"{}")
        self.requests: list[dict[str, list[str]]] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                with fake.lock:
                    fake.requests.append(query)
                if not url.path.endswith("/o"):
                    status, kind, body = 404, "application/json", b'{"error": {"code": 404, "message": "no"}}'
                else:
                    status, kind, body = fake.answer(query.get("prefix", [""])[0])
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), name="fake-gcs", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def fake_gcs():
    fake = FakeGCS()
    try:
        yield fake
    finally:
        fake.stop()
