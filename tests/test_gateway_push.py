"""Pushes through the gateway: chunked request bodies forwarded piece by piece, with real parts only.

A registry client pushes a layer as one ``Transfer-Encoding: chunked`` PATCH.
The gateway reads it from gunicorn in :data:`regmw.gateway.REQUEST_PIECE`
pieces, which straddle the client's chunks however they fall, and writes each
piece as one chunk with ``sendmsg()`` (:func:`regmw.gateway._sendmsg_all`). A
byte lost, doubled or reordered anywhere makes the registry refuse the digest.
"""
from __future__ import annotations

import hashlib
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
