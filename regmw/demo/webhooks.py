"""The demo's webhook receiver: it verifies each POST's Standard Webhooks signature and logs the events.

``regmw demo`` points the ``notifications`` plugin (embedded SQLite queue, a
delivery thread in the server) at it, so a push shows up as a signed webhook
a moment later, as it would at a CI system.
"""
from __future__ import annotations

import json
import logging
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook

log = logging.getLogger("regmw.demo")


class WebhookReceiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.secret = "whsec_" + secrets.token_urlsafe(24).replace("-", "A").replace("_", "B")
        self.verifier = Webhook(self.secret)
        self.events: list[dict] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/webhook"

    def start(self) -> WebhookReceiver:
        threading.Thread(target=self.serve_forever, daemon=True, name="demo-webhooks").start()
        return self

    def received(self) -> list[dict]:
        with self.lock:
            return list(self.events)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        server: WebhookReceiver = self.server  # type: ignore[assignment]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            events = server.verifier.verify(body, dict(self.headers.items()))["events"]
        except Exception as exc:
            log.warning("webhook with a bad signature refused: %s", exc)
            self.send_response(400)
        else:
            with server.lock:
                server.events.extend(events)
            for event in events:
                target = event["target"]
                ref = target.get("tag") or target.get("digest", "")[:19]
                log.info("webhook  %-6s %s:%s", event["action"], target["repository"], ref)
            self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def summary(events: list[dict]) -> str:
    return json.dumps([(event["action"], event["target"]["repository"]) for event in events])
