"""The gateway's zero-copy response path (``os.splice``) under `regmw serve`, with real parts only.

A large body goes upstream socket -> pipe -> client socket without passing
through Python (regmw/gateway.py ``_splice``). These tests pull through
gunicorn from a real ``docker-registry`` and from a small raw-socket upstream
that can misbehave (truncate its body, stall mid-body), and read
``regmw_gateway_zero_copy_bytes_total`` back from the metrics address, so a
silent fall-back to the copying path fails them.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import socket
import threading
from urllib.parse import urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families

from regmw.gateway import Gateway
from tests.servers._util import http_request, wait_until
from tests.test_server import push_blob, regmw_serve  # noqa: F401 - regmw_serve is a fixture

MIB = 1024 * 1024
DIGEST = "sha256:" + "cd" * 32
ZERO_COPY = "regmw_gateway_zero_copy_bytes_total"
BODY_ERRORS = "regmw_upstream_errors_total"


def config(upstream: str, zero_copy: bool = True, timeout: float = 30) -> str:
    return (f'[regmw]\nentry_points = false\n[gateway]\nupstream = "{upstream}"\n'
            f"zero_copy = {str(zero_copy).lower()}\ntimeout = {timeout}\n")


def serve(regmw_serve, upstream: str, **options):  # noqa: F811
    """`regmw serve`, one worker (one upstream pool), client keep-alive long enough that a hang would show."""
    return regmw_serve(config(upstream, **options), metrics=True, workers=1, serve_extra="keepalive = 60\n")


def metric(served, name: str, **labels: str) -> float:
    """The sum of a sample's values with these labels, from the metrics address (every worker's), 0 when absent."""
    _, _, body = http_request(f"http://127.0.0.1:{served.metrics_port}", "GET", "/metrics")
    return sum(sample.value for family in text_string_to_metric_families(body.decode()) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def client(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)


def get(conn: http.client.HTTPConnection, path: str, method: str = "GET") -> tuple[http.client.HTTPResponse, bytes]:
    conn.request(method, path)
    response = conn.getresponse()
    return response, response.read()


class RawUpstream:
    """An HTTP/1.1 upstream on a raw socket answering every request with one fixed body, keep-alive.

    ``mode``: ``full`` sends the body; ``close`` sends it with ``Connection: close``
    and hangs up after it; ``truncate`` announces it, sends half and hangs up;
    ``stall`` sends half, then waits (for ``release``) without closing.
    ``accepted`` counts connections; ``outcomes`` says how each response ended.
    """

    def __init__(self, body: bytes, mode: str = "full") -> None:
        self.body, self.mode = body, mode
        self.accepted = 0
        self.outcomes: list[str] = []
        self.release = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                try:
                    if not self._answer(conn, head.split(b" ", 1)[0]):
                        return
                except OSError as exc:
                    self.outcomes.append(f"aborted {type(exc).__name__}")
                    return

    def _answer(self, conn: socket.socket, method: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     + (b"Connection: close\r\n" if self.mode == "close" else b"")
                     + b"Content-Length: %d\r\n\r\n" % len(self.body))
        if method == b"HEAD":
            return self.mode != "close"
        if self.mode in ("full", "close"):
            conn.sendall(self.body)
            self.outcomes.append("sent")
            return self.mode == "full"
        conn.sendall(self.body[:len(self.body) // 2])
        if self.mode == "stall":
            self.release.wait(30)
        self.outcomes.append(self.mode)
        return False

    def close(self) -> None:
        self.release.set()
        self.listener.close()


@pytest.fixture
def raw_upstream():
    started: list[RawUpstream] = []

    def start(body: bytes, mode: str = "full") -> RawUpstream:
        started.append(RawUpstream(body, mode))
        return started[-1]

    yield start
    for upstream in started:
        upstream.close()


def blob(size: int) -> bytes:
    block = os.urandom(MIB)
    return (block * (size // MIB + 1))[:size]


@pytest.mark.services
def test_a_blob_from_docker_registry_is_spliced_twice_on_one_keepalive_connection(docker_registry, regmw_serve):  # noqa: F811
    data = blob(6 * MIB + 12345)
    digest = push_blob(docker_registry.url, [data[i:i + MIB] for i in range(0, len(data), MIB)])
    served = serve(regmw_serve, docker_registry.url)
    conn = client(served.url)
    try:
        for _ in range(2):
            response, body = get(conn, f"/v2/group/project/blobs/{digest}")
            assert response.status == 200 and int(response.getheader("Content-Length")) == len(data)
            assert len(body) == len(data) and "sha256:" + hashlib.sha256(body).hexdigest() == digest
            assert not response.will_close
        response, body = get(conn, f"/v2/group/project/blobs/{digest}", "HEAD")
        assert response.status == 200 and body == b""
        assert int(response.getheader("Content-Length")) == len(data)
        # the connection is still in step after the HEAD: a small answer comes back whole
        response, body = get(conn, "/v2/")
        assert response.status == 200
    finally:
        conn.close()
    # at most the head the upstream's first packet left in http.client's buffer was copied
    spliced = metric(served, ZERO_COPY)
    assert 2 * (len(data) - 65536) <= spliced <= 2 * len(data)


@pytest.mark.services
def test_zero_copy_off_copies_and_still_serves_the_exact_blob(docker_registry, regmw_serve):  # noqa: F811
    data = blob(3 * MIB + 7)
    digest = push_blob(docker_registry.url, [data])
    served = serve(regmw_serve, docker_registry.url, zero_copy=False)
    conn = client(served.url)
    try:
        for _ in range(2):
            response, body = get(conn, f"/v2/group/project/blobs/{digest}")
            assert response.status == 200 and body == data
    finally:
        conn.close()
    assert metric(served, ZERO_COPY) == 0


@pytest.mark.parametrize("zero_copy", [True, False], ids=["splice", "copy"])
def test_the_connection_is_pooled_before_the_server_sends_the_bodys_last_byte(raw_upstream, zero_copy):
    """Driven as a WSGI server drives it, into a real socket: once the last piece is handed over, before
    close() (which a server calls only after sending it), the upstream connection is idle in the pool."""
    data = blob(2 * MIB + 3)
    upstream = raw_upstream(data)
    gateway = Gateway(upstream.url, zero_copy=zero_copy)
    server_side, client_side = socket.socketpair()  # blocking, as gunicorn's gthread worker hands it over
    received = bytearray()

    def drain() -> None:
        while chunk := client_side.recv(MIB):
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    statuses: list[str] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": f"/v2/group/project/blobs/{DIGEST}",
               "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "x", "wsgi.input": io.BytesIO(), "gunicorn.socket": server_side}
    body = gateway(environ, lambda status, headers: statuses.append(status))
    try:
        for piece in body:
            server_side.sendall(piece)
        pooled = len(gateway.pool._idle)
    finally:
        body.close()
        server_side.shutdown(socket.SHUT_WR)
        reader.join(10)
        server_side.close()
        client_side.close()
        gateway.close()
    wait_until(lambda: upstream.outcomes, timeout=20, what="the upstream noting its answer")  # after its sendall()
    assert statuses == ["200 OK"] and received == data and upstream.outcomes == ["sent"]
    assert pooled == 1


@pytest.mark.parametrize("zero_copy", [True, False], ids=["splice", "copy"])
def test_the_upstream_connection_is_back_in_the_pool_before_the_client_has_the_body(raw_upstream, regmw_serve,  # noqa: F811
                                                                                      zero_copy):
    data = blob(2 * MIB + 3)
    upstream = raw_upstream(data)
    served = serve(regmw_serve, upstream.url, zero_copy=zero_copy)
    # Each on a new client connection, sent the moment the last answer is in: only the gateway's pool
    # can reuse the upstream connection, and only if it was given back before the body's last byte went out.
    for _ in range(5):
        status, _, body = http_request(served.url, "GET", f"/v2/group/project/blobs/{DIGEST}")
        assert status == 200 and body == data
    # The upstream's thread notes "sent" after its sendall() returned, and the worker counts spliced bytes
    # after the last splice into the client's socket: either can come after the client has the body.
    wait_until(lambda: len(upstream.outcomes) >= 5, timeout=20, what="the upstream noting five answers")
    assert upstream.accepted == 1 and upstream.outcomes == ["sent"] * 5
    if zero_copy:
        wait_until(lambda: metric(served, ZERO_COPY) >= 5 * (len(data) - 65536), timeout=20,
                   what="five bodies' spliced bytes counted")
    else:
        assert metric(served, ZERO_COPY) == 0


def test_a_large_body_the_upstream_closes_the_connection_after_is_served_whole(raw_upstream, regmw_serve):  # noqa: F811
    """``Connection: close`` on a large body (nginx's answer to the last of its ``keepalive_requests``, a
    registry shutting down): http.client has let go of the socket, so the body is copied, not spliced."""
    data = blob(2 * MIB + 3)
    upstream = raw_upstream(data, mode="close")
    served = serve(regmw_serve, upstream.url)
    conn = client(served.url)
    try:
        for _ in range(2):
            response, body = get(conn, f"/v2/group/project/blobs/{DIGEST}")
            assert response.status == 200 and body == data
    finally:
        conn.close()
    assert upstream.accepted == 2 and upstream.outcomes == ["sent"] * 2
    assert metric(served, ZERO_COPY) == 0


@pytest.mark.parametrize("zero_copy", [True, False], ids=["splice", "copy"])
def test_a_truncated_upstream_body_breaks_the_client_connection(raw_upstream, regmw_serve, zero_copy):  # noqa: F811
    upstream = raw_upstream(blob(4 * MIB), mode="truncate")
    served = serve(regmw_serve, upstream.url, zero_copy=zero_copy)
    conn = client(served.url)
    try:
        conn.request("GET", f"/v2/group/project/blobs/{DIGEST}")
        response = conn.getresponse()
        assert response.status == 200
        # Not a complete body, and not a hang until the client's timeout (TimeoutError): the
        # gateway breaks the connection as soon as the upstream has.
        with pytest.raises(http.client.IncompleteRead) as broken:
            response.read()
        assert len(broken.value.partial) == 2 * MIB
    finally:
        conn.close()
    assert metric(served, BODY_ERRORS, kind="body") == 1
    if zero_copy:
        assert metric(served, ZERO_COPY) > 0


def test_an_upstream_stalling_mid_body_breaks_the_client_connection_after_the_timeout(raw_upstream, regmw_serve):  # noqa: F811
    upstream = raw_upstream(blob(4 * MIB), mode="stall")
    served = serve(regmw_serve, upstream.url, timeout=1)
    conn = client(served.url)
    try:
        conn.request("GET", f"/v2/group/project/blobs/{DIGEST}")
        response = conn.getresponse()
        with pytest.raises(http.client.IncompleteRead):
            response.read()
    finally:
        conn.close()
        upstream.release.set()
    assert metric(served, BODY_ERRORS, kind="body") == 1
    assert metric(served, ZERO_COPY) > 0


def test_a_client_gone_mid_splice_closes_the_upstream_connection(raw_upstream, regmw_serve):  # noqa: F811
    data = blob(64 * MIB)  # more than every socket buffer on the way holds
    upstream = raw_upstream(data)
    served = serve(regmw_serve, upstream.url)
    conn = client(served.url)
    conn.request("GET", f"/v2/group/project/blobs/{DIGEST}")
    response = conn.getresponse()
    assert response.status == 200 and len(response.read(MIB)) == MIB
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    conn.close()
    response.close()
    outcome = wait_until(lambda: upstream.outcomes, timeout=20, what="the upstream connection ending")
    assert outcome[0].startswith("aborted"), outcome
    # the worker is fine: the next pull, on a fresh upstream connection, is whole
    status, _, body = http_request(served.url, "GET", f"/v2/group/project/blobs/{DIGEST}")
    assert status == 200 and len(body) == len(data) and body == data
    assert upstream.accepted == 2


def test_a_large_catalog_page_read_in_process_is_never_spliced_to_the_client(raw_upstream, regmw_serve):  # noqa: F811
    """With old/new upstreams the catalog reads each page itself (regmw.catalog): a page above the
    splice threshold must come back to it as bytes, not go to the client's socket behind its back."""
    names = [f"r{i:05d}/" + "x" * 200 for i in range(6000)]
    page = json.dumps({"repositories": names}).encode()
    assert len(page) > 1 * MIB
    old, new = raw_upstream(page), raw_upstream(page)
    served = regmw_serve(f'[regmw]\nentry_points = false\n[gateway]\nold_upstream = "{old.url}"\n'
                         f'new_upstream = "{new.url}"\n', metrics=True, workers=1)
    status, headers, body = http_request(served.url, "GET", "/v2/_catalog?n=3")
    assert status == 200 and json.loads(body) == {"repositories": names[:3]}
    assert metric(served, ZERO_COPY) == 0


def parsed(head: bytes, method: str = "GET") -> http.client.HTTPResponse:
    """A real HTTPResponse, its head parsed from a real socket."""
    ours, theirs = socket.socketpair()
    theirs.sendall(head)
    theirs.close()
    response = http.client.HTTPResponse(ours, method=method)
    response.begin()
    ours.close()
    return response


LARGE = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % MIB


@pytest.mark.parametrize(("case", "head", "method", "environ", "spliced"), [
    ("gunicorn, HTTP/1.1, 1 MiB", LARGE, "GET", {}, True),
    ("HTTP/1.0", LARGE, "GET", {"SERVER_PROTOCOL": "HTTP/1.0"}, True),
    ("HTTP/2 frames its data", LARGE, "GET", {"SERVER_PROTOCOL": "HTTP/2.0"}, False),
    ("no server socket", LARGE, "GET", {"gunicorn.socket": None}, False),
    ("non-blocking client socket", LARGE, "GET", {"timeout": 5.0}, False),
    ("HEAD", LARGE, "HEAD", {}, False),
    ("below the threshold", b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MIB - 1), "GET", {}, False),
    ("chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "GET", {}, False),
    ("no length", b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", "GET", {}, False),
    ("304", b"HTTP/1.1 304 Not Modified\r\nContent-Length: %d\r\n\r\n" % MIB, "GET", {}, False),
    ("Connection: close", b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % MIB, "GET", {},
     False),
])
def test_when_the_body_is_spliced(case, head, method, environ, spliced):
    from regmw.gateway import _splice_target

    client, peer = socket.socketpair()
    with client, peer:
        if "timeout" in environ:
            client.settimeout(environ.pop("timeout"))
        env = {"gunicorn.socket": client, "SERVER_PROTOCOL": "HTTP/1.1", **environ}
        assert (_splice_target(env, method, parsed(head, method)) is client) is spliced, case


def test_regmw_serves_own_connection_class_is_spliced_into():
    """``regmw serve`` accepts connections as a ``socket.socket`` subclass (its sendfile gives up on the send
    timeout): the ``type() is socket.socket`` check this replaced never spliced under it."""
    from regmw.gateway import _splice_target
    from regmw.server import _StallLimitedConnection

    raw, peer = socket.socketpair()
    with peer, _StallLimitedConnection(raw.family, raw.type, raw.proto, fileno=raw.detach()) as client:
        client.setblocking(True)
        assert _splice_target({"gunicorn.socket": client, "SERVER_PROTOCOL": "HTTP/1.1"}, "GET", parsed(LARGE)) is client


def test_a_tls_client_socket_is_never_spliced_into():
    import ssl

    from regmw.gateway import _splice_target

    raw, peer = socket.socketpair()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with peer, context.wrap_socket(raw, do_handshake_on_connect=False, server_hostname="x") as tls:
        tls.setblocking(True)
        assert _splice_target({"gunicorn.socket": tls, "SERVER_PROTOCOL": "HTTP/1.1"}, "GET", parsed(LARGE)) is None


def test_zero_copy_is_for_plain_http_upstreams_and_follows_the_option():
    from regmw import build
    from regmw.gateway import Gateway, create_gateway

    assert Gateway("http://127.0.0.1:1").zero_copy is True  # Linux
    assert Gateway("https://127.0.0.1:1").zero_copy is False  # splice cannot see through TLS
    off = build({"gateway": {"upstream": "http://127.0.0.1:1", "zero_copy": False}}, environ={})
    assert create_gateway(off.config)[0].zero_copy is False
    on = build({}, environ={"REGMW_GATEWAY_UPSTREAM": "http://127.0.0.1:1"})
    assert create_gateway(on.config)[0].zero_copy is True
