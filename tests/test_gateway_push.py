"""Pushes through the gateway: chunked request bodies forwarded piece by piece, with real parts only.

A registry client pushes a layer as one ``Transfer-Encoding: chunked`` PATCH.
The gateway reads it from gunicorn in :data:`regmw.gateway.REQUEST_PIECE`
pieces, which straddle the client's chunks however they fall, and writes each
piece as one chunk with ``sendmsg()`` (:func:`regmw.gateway._sendmsg_all`). A
byte lost, doubled or reordered anywhere makes the registry refuse the digest.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import threading
from urllib.parse import urlsplit

import pytest

from regmw.gateway import REQUEST_PIECE, _sendmsg_all
from tests.servers._util import http_request, wait_until
from tests.test_server import gateway_config, regmw_serve  # noqa: F401 - regmw_serve is a fixture

MIB = 1024 * 1024


@pytest.mark.services
def test_a_chunked_multi_mib_push_through_regmw_serve_is_stored_byte_for_byte(docker_registry, regmw_serve):  # noqa: F811
    served = regmw_serve(gateway_config(docker_registry.url))
    # client chunks around and across the gateway's piece size: a piece ends inside a chunk, spans several
    sizes = [REQUEST_PIECE + 3, 5, 2 * REQUEST_PIECE - 7, 300 * 1024, 1, REQUEST_PIECE, 4096]
    chunks = [os.urandom(size) for size in sizes]
    data = b"".join(chunks)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    status, headers, _ = http_request(served.url, "POST", "/v2/group/project/blobs/uploads/")
    assert status == 202
    location = urlsplit(headers["Location"])
    # an iterable body without Content-Length: http.client sends each item as one chunk
    status, headers, body = http_request(served.url, "PATCH", f"{location.path}?{location.query}", body=iter(chunks),
                                         headers={"Content-Type": "application/octet-stream"})
    assert status == 202, body
    assert headers["Range"] == f"0-{len(data) - 1}"
    location = urlsplit(headers["Location"])
    # the registry checks the digest of what it received before it answers 201
    status, _, body = http_request(served.url, "PUT", f"{location.path}?{location.query}&digest={digest}",
                                   headers={"Content-Length": "0"})
    assert status == 201, body

    status, _, stored = http_request(docker_registry.url, "GET", f"/v2/group/project/blobs/{digest}")
    assert status == 200 and stored == data
    # the access log line is written when the request is finished, after the client has the answer
    patched = wait_until(lambda: [line for line in served.log_lines() if line["method"] == "PATCH"], timeout=30,
                         what="the PATCH's access log line")
    assert [line["status"] for line in patched] == [202]


def send_and_read(url: str, head: bytes, pieces: list[bytes]) -> tuple[http.client.HTTPResponse, bytes]:
    """Send a request as a client that reads while it sends (curl, Go): the response is read as soon as it
    comes, while a thread still sends the body; a send the server refuses once it has answered just stops."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)

    def send() -> None:
        try:
            sock.sendall(head)
            for piece in pieces:
                sock.sendall(piece)
        except OSError:
            pass  # the server answered and closed

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    response = http.client.HTTPResponse(sock)
    try:
        response.begin()
        body = response.read()
    finally:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # ends the sender's blocked send
        except OSError:
            pass  # the server's close already ended the connection (ENOTCONN)
        sender.join(10)
        sock.close()
    return response, body


@pytest.mark.services
@pytest.mark.parametrize(("method", "chunked", "pooled"), [("PATCH", False, False), ("PUT", True, True)],
                         ids=["patch-new-connection", "chunked-put-pooled-connection"])
def test_an_upstream_answer_before_the_body_is_read_reaches_the_client(docker_registry, regmw_serve,  # noqa: F811
                                                                        method, chunked, pooled):
    """distribution answers an unknown upload 404 without reading the body, then hangs up (as it does a 401
    or a 413): the client gets that 404, as from the registry itself, not a 502 for the broken send."""
    served = regmw_serve(gateway_config(docker_registry.url), workers=1)
    if pooled:  # the one worker keeps that upstream connection for the next request
        assert http_request(served.url, "GET", "/v2/")[0] == 200
    block = os.urandom(MIB)
    size = 32 * MIB  # more than the sockets between the gateway and the registry buffer
    target = "/v2/group/project/blobs/uploads/no-such-upload"
    if method == "PUT":
        target += "?digest=sha256:" + "0" * 64
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % size
    head = b"%s %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n%s\r\n\r\n" % (
        method.encode(), target.encode(), framing)
    pieces = [b"%x\r\n%s\r\n" % (MIB, block) if chunked else block for _ in range(size // MIB)]
    response, body = send_and_read(served.url, head, pieces + ([b"0\r\n\r\n"] if chunked else []))
    assert response.status == 404, body
    assert json.loads(body)["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"
    assert http_request(served.url, "GET", "/v2/")[0] == 200  # the gateway serves on


@pytest.mark.services
def test_a_client_that_sends_its_whole_body_before_reading_still_gets_the_early_answer(docker_registry, regmw_serve):  # noqa: F811
    """http.client (and any client that reads only once it has sent): the gateway reads and drops the body
    the upstream did not wait for before it answers, instead of closing on unread bytes, whose reset
    would break the client's send and destroy the answer."""
    served = regmw_serve(gateway_config(docker_registry.url), workers=1)
    parts = urlsplit(served.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("PATCH", "/v2/group/project/blobs/uploads/no-such-upload", body=os.urandom(MIB) * 32,
                     headers={"Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"


def test_sendmsg_all_sends_every_part_in_order_across_partial_sends():
    left, right = socket.socketpair()
    try:
        left.settimeout(10)  # Python makes the socket non-blocking: sendmsg() returns after a partial send
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        parts = [b"%x\r\n" % (3 * MIB), os.urandom(3 * MIB), b"\r\n", os.urandom(5), b"0\r\n\r\n"]
        expected = b"".join(parts)
        received = bytearray()

        def drain() -> None:
            while len(received) < len(expected):
                piece = right.recv(32768)  # slower than the sender: the send buffer fills
                if not piece:
                    return
                received.extend(piece)

        reader = threading.Thread(target=drain)
        reader.start()
        _sendmsg_all(left, parts)
        reader.join(10)
        assert bytes(received) == expected
    finally:
        left.close()
        right.close()
