"""Serve a WSGI app on a real socket (werkzeug's threaded server in a thread), for tests.

Real clients (skopeo, http.client, the gateway) then talk HTTP/1.1 to the app,
with keep-alive and chunked bodies, instead of an in-process test client.
"""
from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from werkzeug.serving import make_server

from ._util import wait_for_port


@pytest.fixture
def serve_wsgi() -> Callable:
    """``serve_wsgi(app) -> "http://127.0.0.1:PORT"``; every server is shut down at teardown."""
    servers = []

    def start(app) -> str:
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  name=f"wsgi-{server.server_port}", daemon=True)
        thread.start()
        servers.append((server, thread))
        wait_for_port(server.server_port)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(10)
