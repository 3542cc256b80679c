"""The gateway proxy against a real upstream server (an echo app on a real socket).

Each test goes client → real server → Gateway → real server → echo app, so
chunked encoding, keep-alive and header handling are those of real HTTP.
"""
from __future__ import annotations

import hashlib
import ipaddress
import http.client
import json
import os
import socket
from urllib.parse import urlsplit

import pytest
from werkzeug.wsgi import get_input_stream

from regmw import ConfigError, build
from regmw.gateway import Gateway, create_gateway


def echo(environ, start_response):
    """Answer with what arrived: method, raw target, headers, body digest; plus a Location naming itself."""
    stream = get_input_stream(environ)  # Content-Length or chunked; empty otherwise
    hasher, size = hashlib.sha256(), 0
    while chunk := stream.read(65536):
        hasher.update(chunk)
        size += len(chunk)
    if environ["PATH_INFO"].startswith("/big/"):
        count = int(environ["PATH_INFO"].rsplit("/", 1)[1])
        start_response("200 OK", [("Content-Type", "application/octet-stream")])  # no length: chunked
        return (bytes([i % 251]) * 65536 for i in range(count))
    body = json.dumps({
        "method": environ["REQUEST_METHOD"],
        "uri": environ.get("REQUEST_URI"),
        "query": environ.get("QUERY_STRING"),
        "headers": {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")},
        "sha256": hasher.hexdigest(),
        "size": size,
        "peer_port": environ.get("REMOTE_PORT"),
    }).encode()
    own = f"http://{environ['SERVER_NAME']}:{environ['SERVER_PORT']}"
    headers = [
        ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
        ("Location", f"{own}/v2/a/blobs/uploads/1?_state=xyz%3D%3D"),
        ("Link", f'<{own}/v2/a/tags/list?n=2&last=b>; rel="next", </v2/a/tags/list?n=9>; rel="x"'),
    ]
    if environ["PATH_INFO"] == "/hop":
        headers += [("Connection", "close, X-Upstream-Hop"), ("X-Upstream-Hop", "1"), ("X-Upstream-Keep", "1")]
    start_response("202 Accepted", headers)
    return [body]


@pytest.fixture
def proxied(serve_wsgi):
    """(gateway URL, Gateway, upstream URL) with the gateway on its own real server."""
    upstream = serve_wsgi(echo)
    gateway = Gateway(upstream, timeout=10)
    yield serve_wsgi(gateway), gateway, upstream
    gateway.close()


def request(url, method, path, body=None, headers=None, chunked=False):
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def test_method_path_query_and_body_pass_unchanged(proxied):
    url, _, _ = proxied
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = "/v2/group/project/blobs/uploads/abc?_state=ab%2Bc%3D%3D&digest=sha256%3Aff&x=1&x=2"
    response, body = request(url, "PATCH", path, data, {"Content-Type": "application/octet-stream"})
    seen = json.loads(body)
    assert response.status == 202
    assert seen["method"] == "PATCH" and seen["uri"] == path and seen["query"] == path.split("?", 1)[1]
    assert seen["size"] == len(data) and seen["sha256"] == hashlib.sha256(data).hexdigest()
    assert seen["headers"]["host"] == urlsplit(url).netloc  # the client's Host, not the upstream's


def test_chunked_request_body_is_streamed_chunked(proxied):
    url, _, _ = proxied
    parts = [os.urandom(100_000) for _ in range(7)]
    _response, body = request(url, "PATCH", "/v2/a/blobs/uploads/1", iter(parts), chunked=True)
    seen = json.loads(body)
    assert seen["headers"].get("transfer-encoding") == "chunked"
    assert seen["size"] == sum(map(len, parts))
    assert seen["sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()


def test_hop_by_hop_headers_dropped_both_ways(proxied):
    url, _, _ = proxied
    response, body = request(url, "GET", "/hop", headers={
        "Connection": "keep-alive, X-Client-Hop", "X-Client-Hop": "1", "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic eA==", "TE": "trailers", "X-Keep": "yes", "Authorization": "Bearer t",
    })
    seen = json.loads(body)["headers"]
    for gone in ("x-client-hop", "keep-alive", "proxy-authorization", "te"):
        assert gone not in seen, gone
    assert seen["x-keep"] == "yes" and seen["authorization"] == "Bearer t"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert response.getheader("X-Upstream-Hop") is None and response.getheader("X-Upstream-Keep") == "1"


def test_forwarding_headers_pass_on_only_from_a_trusted_proxy(serve_wsgi):
    """distribution takes the FIRST X-Forwarded-For hop as the client (logs, events), and builds its
    Location URLs from X-Forwarded-Proto/-Host: a client's own values must not reach it unless the peer
    is one of ``[regmw] trusted_proxies``."""
    upstream = serve_wsgi(echo)
    spoof = {"X-Forwarded-For": "6.6.6.6", "X-Real-Ip": "6.6.6.6", "Forwarded": "for=6.6.6.6",
             "X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example", "X-Forwarded-Port": "8443"}
    # what other registries (and the frameworks they are built on) read the same way: scheme, client, path
    others = {"X-Forwarded-Scheme": "https", "X-Forwarded-Ssl": "on", "X-Forwarded-Protocol": "ssl",
              "Front-End-Https": "on", "X-Client-IP": "6.6.6.6", "True-Client-IP": "6.6.6.6",
              "X-Cluster-Client-IP": "6.6.6.6", "X-Forwarded-Server": "evil.example",
              "X-Original-URL": "/v2/other/manifests/latest", "X-Rewrite-URL": "/v2/other/manifests/latest"}
    spoof.update(others)
    untrusted = Gateway(upstream)
    seen = json.loads(request(serve_wsgi(untrusted), "GET", "/v2/", headers=spoof)[1])["headers"]
    assert seen["x-forwarded-for"] == "127.0.0.1" and "x-real-ip" not in seen and "forwarded" not in seen
    assert seen["x-forwarded-proto"] == "http" and "x-forwarded-host" not in seen and "x-forwarded-port" not in seen
    assert not {name.lower() for name in others} & set(seen), seen
    app, _ = create_gateway(build({"regmw": {"trusted_proxies": ["127.0.0.0/8"]}, "gateway": {"upstream": upstream}},
                                  environ={}).config)
    seen = json.loads(request(serve_wsgi(app), "GET", "/v2/", headers=spoof)[1])["headers"]
    assert seen["x-forwarded-for"] == "6.6.6.6, 127.0.0.1"
    assert seen["x-real-ip"] == "6.6.6.6" and seen["forwarded"] == "for=6.6.6.6"
    assert seen["x-forwarded-proto"] == "https" and seen["x-forwarded-host"] == "evil.example"
    assert all(seen[name.lower()] == value for name, value in others.items()), seen
    untrusted.close()
    app.close()


def test_a_scheme_gunicorn_took_from_an_untrusted_clients_header_is_not_forwarded():
    """gunicorn believes X-Forwarded-Proto from its ``forwarded_allow_ips`` (loopback by default) and sets
    ``wsgi.url_scheme`` from it: outside ``[regmw] trusted_proxies`` the upstream gets the scheme of the socket."""
    gateway = Gateway("http://127.0.0.1:9")
    with socket.socket() as plain:
        environ = {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_FORWARDED_PROTO": "https", "wsgi.url_scheme": "https",
                   "gunicorn.socket": plain, "HTTP_HOST": "x"}
        assert dict(gateway._request_headers(environ))["X-Forwarded-Proto"] == "http"
        trusting = Gateway("http://127.0.0.1:9", trusted_proxies=[ipaddress.ip_network("127.0.0.0/8")])
        assert dict(trusting._request_headers(environ))["X-Forwarded-Proto"] == "https"  # its proxy's word
    assert dict(gateway._request_headers({"wsgi.url_scheme": "https"}))["X-Forwarded-Proto"] == "https"  # no gunicorn


def test_location_and_link_naming_upstream_are_rewritten(serve_wsgi):
    upstream = serve_wsgi(echo)
    gateway = Gateway(upstream, preserve_host=False)
    url = serve_wsgi(gateway)
    response, body = request(url, "POST", "/v2/a/blobs/uploads/")
    assert json.loads(body)["headers"]["host"] == urlsplit(upstream).netloc
    assert response.getheader("Location") == f"{url}/v2/a/blobs/uploads/1?_state=xyz%3D%3D"
    # a paging Link naming the upstream would send the client around the gateway; a relative one stays
    assert response.getheader("Link") == f'<{url}/v2/a/tags/list?n=2&last=b>; rel="next", </v2/a/tags/list?n=9>; rel="x"'
    gateway.close()


def test_large_response_streams_and_connections_are_reused(proxied):
    url, gateway, _ = proxied
    response, body = request(url, "GET", "/big/80")  # 5 MiB, chunked by the upstream
    assert response.status == 200 and len(body) == 80 * 65536
    assert body[:65536] == bytes([0]) * 65536 and body[-1:] == bytes([79 % 251])
    # werkzeug's server answers "Connection: close" every time: the gateway must not pool those
    # connections (reuse against a keep-alive upstream is checked with docker-registry in test_registry_e2e).
    for _ in range(3):
        assert request(url, "GET", "/v2/")[0].status == 202
    assert not gateway.pool._idle


def test_head_has_no_body(proxied):
    url, _, _ = proxied
    response, body = request(url, "HEAD", "/v2/a/manifests/latest")
    assert response.status == 202 and body == b""


def test_create_gateway_config(tmp_path):
    runtime = build({"gateway": {"upstream": "http://127.0.0.1:5000", "timeout": 2}}, environ={})
    app, apps = create_gateway(runtime.config)
    assert isinstance(app, Gateway) and app.pool.timeout == 2.0 and apps == {}
    with pytest.raises(ConfigError, match="gateway.upstream"):
        create_gateway(build({}, environ={}).config)
    with pytest.raises(ConfigError, match="new_upstream"):
        create_gateway(build({"gateway": {"old_upstream": "http://127.0.0.1:1"}}, environ={}).config)
    with pytest.raises(ConfigError, match="gateway.upstream"):
        build({"gateway": {"upstream": "ftp://x"}}, environ={})
    env = build({}, environ={"REGMW_GATEWAY_UPSTREAM": "http://127.0.0.1:5001"})
    assert create_gateway(env)[0].netloc == "127.0.0.1:5001"


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class RawUpstream:
    """A socket server that answers each connection once with ``reply`` (keep-alive implied) and then
    hangs up, or, with ``reply=None``, hangs up without answering; with ``stall``, it holds the
    connection open after the reply until ``release`` is set."""

    def __init__(self, reply: bytes | None = OK, stall: bool = False) -> None:
        import socket
        import threading

        self.reply, self.stall = reply, stall
        self.release = threading.Event()
        self.accepted = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                if self.reply is not None:
                    conn.sendall(self.reply)
                if self.stall:
                    self.release.wait(30)

    def close(self) -> None:
        self.release.set()
        self.listener.close()


def test_stale_pooled_connection_is_replaced(serve_wsgi):
    upstream = RawUpstream()
    gateway = Gateway(upstream.url, timeout=5)
    url = serve_wsgi(gateway)
    try:
        for _ in range(4):  # each reuse finds the pooled connection closed by the upstream
            response, body = request(url, "GET", "/v2/")
            assert (response.status, body) == (200, b"ok")
        assert upstream.accepted == 4
    finally:
        gateway.close()
        upstream.close()


def test_upstream_hanging_up_is_502(serve_wsgi):
    upstream = RawUpstream(reply=None)
    gateway = Gateway(upstream.url, timeout=5)
    try:
        response, body = request(serve_wsgi(gateway), "GET", "/v2/")
        assert response.status == 502 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    finally:
        gateway.close()
        upstream.close()


@pytest.mark.parametrize("body", [b"zz\r\nhello\r\n0\r\n\r\n", b"100\r\nhello"], ids=["bad-chunk-size", "cut-mid-chunk"])
def test_a_malformed_or_cut_chunked_request_body_is_the_clients_400_not_a_502(proxied, body):
    """The client's broken body is read by the server's chunked reader, which raises (an IOError for
    EOF): that is the client's fault, answered 400 with an OCI body, not 502 "upstream unreachable"."""
    import socket

    url, _, _ = proxied
    with socket.create_connection(("127.0.0.1", urlsplit(url).port), timeout=30) as sock:
        sock.sendall(b"PATCH /v2/group/project/blobs/uploads/abc HTTP/1.1\r\nHost: x\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + body)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert json.loads(payload)["errors"][0]["code"] == "UNKNOWN"


@pytest.mark.parametrize(("reply", "stall", "status"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", False, 502),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n", True, 504),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", False, 502),
], ids=["head-then-hang-up", "head-then-silence", "bad-first-chunk"])
def test_upstream_failing_before_the_first_body_byte_is_502_or_504(serve_wsgi, reply, stall, status):
    """The status is not out yet: the client gets the gateway's OCI answer, not the upstream's
    200 followed by nothing (or the server's own 500 for the exception)."""
    upstream = RawUpstream(reply, stall=stall)
    gateway = Gateway(upstream.url, timeout=0.5)
    try:
        response, body = request(serve_wsgi(gateway), "GET", "/v2/a/manifests/latest")
        assert response.status == status and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
    finally:
        gateway.close()
        upstream.close()


def test_chunked_body_cut_after_its_first_chunk_keeps_the_upstreams_status(serve_wsgi):
    """A chunked body the upstream cuts short after its first chunk: the client gets the upstream's
    status and the bytes that came, then a failed transfer (gunicorn breaks the connection; werkzeug,
    serving here, appends its error page), as for a Content-Length body cut short; never a 500 first."""
    import socket

    upstream = RawUpstream(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    gateway = Gateway(upstream.url, timeout=5)
    try:
        with socket.create_connection(("127.0.0.1", urlsplit(serve_wsgi(gateway)).port), timeout=30) as sock:
            sock.sendall(b"GET /v2/a/blobs/sha256:" + b"a" * 64 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and payload.startswith(b"5\r\nhello\r\n"), answer
    finally:
        gateway.close()
        upstream.close()


def test_an_upstream_under_a_path_prefix_gets_it_and_its_urls_come_back_without_it(serve_wsgi):
    """``upstream = "http://host:port/registry"``: a registry mounted under a path (behind its own proxy)."""
    seen = []

    def mounted(environ, start_response):
        seen.append(environ.get("REQUEST_URI"))
        own = f"http://{environ['SERVER_NAME']}:{environ['SERVER_PORT']}"
        start_response("202 Accepted", [
            ("Content-Length", "0"),
            ("Location", f"{own}/registry/v2/a/blobs/uploads/1?_state=x"),
            ("Link", f'<{own}/registry/v2/a/tags/list?n=2&last=b>; rel="next"')])
        return [b""]

    upstream = serve_wsgi(mounted)
    gateway = Gateway(upstream + "/registry/")
    try:
        url = serve_wsgi(gateway)
        response, _ = request(url, "POST", "/v2/a/blobs/uploads/?mount=sha256%3Aab&from=b")
        assert seen == ["/registry/v2/a/blobs/uploads/?mount=sha256%3Aab&from=b"]
        assert response.status == 202
        assert response.getheader("Location") == f"{url}/v2/a/blobs/uploads/1?_state=x"
        assert response.getheader("Link") == f'<{url}/v2/a/tags/list?n=2&last=b>; rel="next"'
    finally:
        gateway.close()


# --- a hostile or broken upstream -------------------------------------------------


def raw_exchange(url: str, target: str = "/v2/a/manifests/latest", method: str = "GET") -> tuple[bytes, bytes]:
    """One request on a fresh connection, read to EOF: the client's view, byte for byte (head, body)."""
    import socket

    with socket.create_connection(("127.0.0.1", urlsplit(url).port), timeout=30) as sock:
        sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: gw.example\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


def through(serve_wsgi, reply: bytes, target: str = "/v2/a/manifests/latest", method: str = "GET",
            timeout: float = 2, stall: bool = True) -> tuple[bytes, bytes]:
    """``reply`` from a raw upstream (which then holds the connection open, or with ``stall=False`` hangs up),
    as the gateway's client gets it (see :func:`raw_exchange`)."""
    upstream = RawUpstream(reply, stall=stall)
    gateway = Gateway(upstream.url, timeout=timeout)
    try:
        return raw_exchange(serve_wsgi(gateway), target, method)
    finally:
        gateway.close()
        upstream.close()


def test_a_link_header_of_many_unclosed_brackets_is_passed_on_in_linear_time(serve_wsgi):
    """The Link rewrite's pattern scanned such a value to its end from every ``<``: 60,000 of them held a
    core (and the worker's GIL, every other request of the worker) for about 20 s."""
    import time

    link = b"<" * 60_000
    started = time.monotonic()
    head, _ = through(serve_wsgi, b"HTTP/1.1 200 OK\r\nLink: " + link + b"\r\nContent-Length: 0\r\n\r\n")
    assert time.monotonic() - started < 3
    assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nLink: " + link + b"\r\n" in head + b"\r\n"


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nContent-Le",
    b"HTTP/1.1 200 OK\r\nX-A: 1\r\n",
    b"HTTP/1.1 200 OK\r\nX A: 1\r\nContent-Length: 2\r\n\r\nhi",
    b"HTTP/1.1 200 OK\r\nX-\x00A: 1\r\nContent-Length: 2\r\n\r\nhi",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 2\r\n\r\nhi",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 4\r\n\r\nhi..",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2, 4\r\n\r\nhi..",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nhi",
    b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nhi",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nhi",
    b"HTTP/1.1 100 Continue\r\n\r\n" * 17 + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
], ids=["cut-mid-line", "cut-before-empty-line", "space-in-name", "nul-in-name", "gzip-chunked", "gzip",
        "two-lengths", "length-list", "negative-length", "signed-length", "unasked-101", "endless-100"])
def test_a_response_head_that_cannot_be_passed_on_safely_is_502(serve_wsgi, reply):
    """http.client took each of these for a head (a 200 with an empty body, a body read to EOF past a dropped
    Content-Length, a 101 as the answer, framing gunicorn refused with the app's 500 or passed on twice);
    RFC 9112 makes them a proxy's 502."""
    head, body = through(serve_wsgi, reply, stall=False)
    assert head.startswith(b"HTTP/1.1 502 "), head + body
    assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"


def test_interim_answers_before_the_final_one_are_skipped(serve_wsgi):
    """A 103 Early Hints was passed on as the answer: the client got a 103, never the 200 behind it."""
    head, body = through(serve_wsgi, b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n"
                                     b"HTTP/1.1 102 Processing\r\n\r\n"
                                     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert head.startswith(b"HTTP/1.1 200 ") and body == b"ok"


@pytest.mark.parametrize(("reply", "length", "expected"), [
    (b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n14\r\nabcdefghijklmnopqrst\r\n0\r\n\r\n", None,
     b"abcdefghijklmnopqrst"),
    (b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello", b"5", b"hello"),
], ids=["chunked-and-length", "same-length-twice"])
def test_the_client_gets_one_content_length_and_only_the_upstreams_framing(serve_wsgi, reply, length, expected):
    """Chunked framing overrides a Content-Length beside it (RFC 9112 6.3): forwarded, that Content-Length cut
    the body short at the client (gunicorn sends no more than it) or left it waiting for more."""
    head, body = through(serve_wsgi, b"HTTP/1.1 200 OK\r\n" + reply)
    lengths = [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    assert lengths == ([length] if length else [])
    if length is None:  # the gateway's server chunks it again
        assert b"transfer-encoding: chunked" in head.lower()
        body = b"".join(body.split(b"\r\n")[1::2])
    assert body == expected


def test_control_characters_in_the_upstreams_head_become_spaces(serve_wsgi):
    """An obs-fold's CR LF, a NUL or another control character in a header value (or the reason phrase) made
    gunicorn refuse the whole answer (the app's 500), and any other server send it as it came; a bare CR split
    a header in two; a header name that is not a token is dropped. RFC 9110 5.5, 9112 2.2: replaced with
    spaces."""
    head, body = through(serve_wsgi, b"HTTP/1.1 200 Fine\x00X\r\nX-Fold: a\r\n Set-Cookie: x=1\r\n"
                                     b"X-Nul: a\x00b\x01c\x7fd\r\nX(Bad): 1\r\nX-Keep: caf\xc3\xa9\r\n"
                                     b"X-Cr: a\rX-Injected: 1\r\n"
                                     b"Content-Length: 2\r\n\r\nhi")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK" and body == b"hi"
    assert not any(char in head for char in (b"\x00", b"\x01", b"\x7f", b"\r X", b"\n "))
    assert b"X-Fold: a   Set-Cookie: x=1" in lines and b"X-Nul: a b c d" in lines
    assert b"X-Keep: caf\xc3\xa9" in lines and not any(line.startswith(b"X(Bad)") for line in lines)
    # a bare CR is no line end (email's parser took it for one: the rest was a header of its own)
    assert b"X-Cr: a X-Injected: 1" in lines and not any(line.startswith(b"X-Injected") for line in lines)


def test_the_readiness_probe_takes_the_status_and_leaves_the_body(serve_wsgi):
    """``ready()`` read the body of the upstream's ``GET /v2/`` whole: one that never ends (or stalls) held
    it in memory and failed the probe at its timeout, although the upstream had answered 200."""
    import time

    upstream = RawUpstream(b"HTTP/1.1 200 OK\r\nContent-Length: 1099511627776\r\n\r\n" + b"x" * 65536, stall=True)
    gateway = Gateway(upstream.url, timeout=10)
    try:
        started = time.monotonic()
        gateway.ready()
        assert time.monotonic() - started < 1
    finally:
        gateway.close()
        upstream.close()
