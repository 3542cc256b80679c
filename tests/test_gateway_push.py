"""Pushes through the gateway: chunked request bodies forwarded piece by piece, with real parts only.

A registry client pushes a layer as one ``Transfer-Encoding: chunked`` PATCH.
The gateway reads it from gunicorn in :data:`regmw.gateway.REQUEST_PIECE`
pieces, which straddle the client's chunks however they fall, and writes each
piece as one chunk with ``sendmsg()`` (:func:`regmw.gateway._sendmsg_all`). A
byte lost, doubled or reordered anywhere makes the registry refuse the digest.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
from urllib.parse import urlsplit

import pytest

from regmw.gateway import REQUEST_PIECE, _sendmsg_all
from tests.servers._util import http_request, need_binary
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
    patched = [line for line in served.log_lines() if line["method"] == "PATCH"]
    assert [line["status"] for line in patched] == [202]


@pytest.mark.services
@pytest.mark.parametrize(("method", "chunked"), [("PATCH", False), ("PUT", True)], ids=["patch", "chunked-put"])
def test_an_upstream_answer_before_the_body_is_read_reaches_the_client(tmp_path, docker_registry, regmw_serve,  # noqa: F811
                                                                        method, chunked):
    """distribution answers an unknown upload 404 without reading the body, then hangs up (the same way as
    a 401 or a 413): the client gets that 404, as from the registry itself, not a 502 for the broken send."""
    curl = need_binary("curl")
    served = regmw_serve(gateway_config(docker_registry.url), workers=1)
    layer = tmp_path / "layer"
    layer.write_bytes(os.urandom(MIB) * 32)  # more than the sockets between gateway and registry buffer
    target = "/v2/group/project/blobs/uploads/no-such-upload"
    if method == "PUT":
        target += "?digest=sha256:" + "0" * 64
    command = [curl, "-s", "-o", str(tmp_path / "answer"), "-w", "%{http_code}", "-X", method, "-T", str(layer),
               "-H", "Content-Type: application/octet-stream", served.url + target]
    if chunked:
        command[-1:-1] = ["-H", "Transfer-Encoding: chunked"]
    status = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    assert status == "404", (tmp_path / "answer").read_bytes()
    assert json.loads((tmp_path / "answer").read_bytes())["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"
    assert http_request(served.url, "GET", "/v2/")[0] == 200  # the gateway serves on


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
