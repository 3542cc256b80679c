"""Mounted mode under a real gunicorn: PEP 3333 corner cases of the app behind ``RegistryMiddleware``.

One gunicorn (gthread) serves a plain WSGI app wrapped by the middleware; the
app's behaviour is chosen by the repository name. A plugin writes each
``regmw_finish`` (and the app each body close) to a file, so the tests see
what ran, and how often, in the server process.
"""
import http.client
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from .servers._util import free_port, stop, wait_for_port, wait_until

DIGEST = "sha256:" + "ab" * 32

#: What both test servers share: the log file, a plugin noting each ``regmw_finish`` in it, and the sendfile count.
NOTING = '''
LOG = {log!r}

def note(line):
    with open(LOG, "a") as handle:
        handle.write(line + "\\n")

class Finish:
    @hookimpl
    def regmw_finish(self, context, status):
        note(f"finish {{context.repository}} {{status}}")

def post_fork(server, worker):  # gunicorn's hook (the module is also the server's config): count sendfile calls
    sendfile = socket.socket.sendfile

    def counting(self, file, offset=0, count=None):
        sent = sendfile(self, file, offset, count)
        note(f"sendfile {{SENDFILE_LABEL}} {{sent}}")
        return sent

    socket.socket.sendfile = counting
'''

SERVER = '''
import io, os, socket, sys
from regmw import RegistryMiddleware, hookimpl

BLOB = {blob!r}
SENDFILE_LABEL = "file"
''' + NOTING + '''

class NotingFile(io.FileIO):
    def close(self):
        if not self.closed:
            note("closed file")
        super().close()

def app(environ, start_response):
    kind = environ["PATH_INFO"].split("/")[2]
    if kind == "file":  # the server's file wrapper, honouring a Range (from its offset: sendfile's start)
        handle = NotingFile(BLOB)
        size = os.fstat(handle.fileno()).st_size
        first, _, last = environ.get("HTTP_RANGE", "bytes=0-").removeprefix("bytes=").partition("-")
        first, last = int(first), int(last or size - 1)
        handle.seek(first)
        headers = [("Content-Length", str(last - first + 1)), ("Accept-Ranges", "bytes")]
        if "HTTP_RANGE" in environ:
            start_response("206 Partial Content", headers + [("Content-Range", f"bytes {{first}}-{{last}}/{{size}}")])
        else:
            start_response("200 OK", headers)
        return environ["wsgi.file_wrapper"](handle, 65536)
    if kind == "raises":
        raise RuntimeError("SECRET internal detail")
    if kind == "lazyraises":
        def body():
            try:
                raise RuntimeError("SECRET internal detail")
                yield b""
            finally:
                note("closed lazyraises")
        return body()
    if kind == "lazy":
        def body():
            start_response("200 OK", [("Content-Type", "text/plain")])
            yield b"lazy "
            yield b"body"
        return body()
    if kind == "badheader":
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-Name", "caf\\u00e9\\u2603")])
        return [b"never sent"]
    if kind == "ownheaders":
        start_response("200 OK", [("Content-Type", "text/plain"), ("x-request-id", environ["HTTP_X_REQUEST_ID"]),
                                  ("RateLimit-Remaining", "7")])
        return [b"ok"]
    if kind == "endless":
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
        def body():
            try:
                while True:
                    yield b"x" * 65536
            finally:
                note("closed endless")
        return body()
    if kind == "write":
        write = start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "11")])
        write(b"hello ")
        write(b"world")
        return []
    start_response("404 Not Found", [("Content-Length", "0")])
    return []

application = RegistryMiddleware(
    app, {{"regmw": {{"plugins": [], "entry_points": False}},
          "ratelimit": {{"rules": [{{"by": "client", "limit": "100000/minute"}}]}}}},
    plugins=[Finish()], environ={{}})
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mounted")
    log = root / "events.log"
    log.touch()
    blob = root / "blob"
    blob.write_bytes(os.urandom(1 << 20) * 4)
    (root / "mounted_server.py").write_text(textwrap.dedent(SERVER.format(log=str(log), blob=str(blob))))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--chdir", str(root), "-c", "python:mounted_server", "-k", "gthread", "--threads", "2", "-w", "1",
         "-b", f"127.0.0.1:{port}", "mounted_server:application"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        wait_for_port(port, timeout=30, proc=proc)
        yield port, log, blob
    finally:
        stop(proc)


def get(port, kind, method="GET", headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, f"/v2/{kind}/blobs/{DIGEST}", headers=headers or {})
        response = connection.getresponse()
        return response.status, response.getheaders(), response.read()
    finally:
        connection.close()


def events(log, kind, count):
    """This kind's lines of the server's log once ``count`` of them are there (finish runs after the body)."""
    def mine():
        lines = [line for line in log.read_text().splitlines() if line.split()[1] == kind]
        return lines if len(lines) >= count else None
    return wait_until(mine, timeout=10, what=f"{count} events for {kind}")


@pytest.mark.parametrize("kind", ["raises", "lazyraises"])
def test_an_app_raising_before_start_response_is_an_oci_500_finished_once(server, kind):
    """Eager or on its first iteration (a generator): an OCI body, never gunicorn's HTML page or the error's text."""
    port, log, _ = server
    status, headers, body = get(port, kind)
    assert status == 500
    assert dict(headers)["Content-Type"] == "application/json; charset=utf-8"
    assert int(dict(headers)["Content-Length"]) == len(body)
    assert json.loads(body)["errors"][0]["code"] == "UNKNOWN"
    assert b"SECRET" not in body
    expected = ["closed lazyraises", "finish lazyraises 500"] if kind == "lazyraises" else [f"finish {kind} 500"]
    assert events(log, kind, len(expected)) == expected
    status, headers, body = get(port, kind, "HEAD")
    assert status == 500 and body == b"" and int(dict(headers)["Content-Length"]) > 0


def test_a_generator_that_starts_its_response_lazily_still_streams(server):
    port, log, _ = server
    assert get(port, "lazy")[::2] == (200, b"lazy body")
    assert events(log, "lazy", 1) == ["finish lazy 200"]


def test_a_header_the_server_refuses_is_finished_as_the_500_the_client_got(server):
    port, log, _ = server
    status, _, body = get(port, "badheader")
    assert status == 500 and b"never sent" not in body
    assert events(log, "badheader", 1) == ["finish badheader 500"]


def test_the_apps_own_request_id_and_rate_limit_headers_are_not_doubled(server):
    """regmw's header replaces the app's of the same name: one value, the one regmw logs and counts by."""
    port, _, _ = server
    status, headers, _ = get(port, "ownheaders", headers={"X-Request-Id": "req-42"})
    assert status == 200
    names = [name.lower() for name, _ in headers]
    lowered = {name.lower(): value for name, value in headers}
    assert names.count("x-request-id") == 1 and lowered["x-request-id"] == "req-42"
    assert names.count("ratelimit-remaining") == 1 and int(lowered["ratelimit-remaining"]) > 7  # regmw's, not the app's
    assert lowered["ratelimit-limit"] == "100000"  # the middleware's others are added too
    assert lowered["content-type"] == "text/plain"  # the app's other headers are kept


def test_the_legacy_write_callable_works_behind_the_middleware(server):
    port, log, _ = server
    assert get(port, "write")[::2] == (200, b"hello world")
    assert events(log, "write", 1) == ["finish write 200"]


def test_a_body_the_client_abandons_is_closed_and_finished_once(server):
    port, log, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET /v2/endless/blobs/{DIGEST} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = 0
        while received < 1 << 20:
            received += len(sock.recv(65536))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    assert events(log, "endless", 2) == ["closed endless", "finish endless 200"]


def test_a_range_of_the_servers_file_wrapper_is_a_206_sent_with_sendfile_and_finished_once(server):
    """The app's Range answer keeps gunicorn's zero-copy path: one sendfile of the range, then close, then finish."""
    port, log, blob = server
    status, headers, body = get(port, "file", headers={"Range": "bytes=1000-2000999"})
    assert status == 206 and dict(headers)["Content-Range"] == f"bytes 1000-2000999/{4 << 20}"
    assert body == blob.read_bytes()[1000:2001000]
    assert events(log, "file", 3) == ["sendfile file 2000000", "closed file", "finish file 206"]


def test_a_file_the_client_abandons_mid_sendfile_is_closed_and_finished_once(server):
    port, log, _ = server
    def mine():
        return [line for line in log.read_text().splitlines() if line.split()[1] == "file"]

    before = len(mine())
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(f"GET /v2/file/blobs/{DIGEST} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        received = 0
        while received < 1 << 16:
            received += len(sock.recv(65536))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
    after = wait_until(lambda: "finish file 200" in mine()[before:] and mine()[before:], what="the finish")
    assert after[-2:] == ["closed file", "finish file 200"] and after.count("finish file 200") == 1


FLASK_SERVER = '''
import socket
from flask import Flask, send_file
from regmw import hookimpl
from regmw.flask import RegMW

SENDFILE_LABEL = "flask"
''' + NOTING + '''

app = Flask(__name__)

@app.route("/v2/<name>/blobs/<digest>", methods=["GET", "HEAD"])
def blob(name, digest):
    return send_file({blob!r}, mimetype="application/octet-stream", conditional=True, etag=digest, max_age=0)

RegMW(app, config={{"regmw": {{"plugins": [], "entry_points": False}}}}, plugins=[Finish()])
'''


def test_flask_send_file_behind_regmw_keeps_sendfile_and_finishes_once(tmp_path):
    """Flask hands the server's file wrapper back through RegMW: gunicorn sends it with sendfile; HEAD sends nothing."""
    log, blob = tmp_path / "events.log", tmp_path / "blob"
    log.touch()
    blob.write_bytes(os.urandom(1 << 20) * 3)
    (tmp_path / "flask_server.py").write_text(textwrap.dedent(FLASK_SERVER.format(log=str(log), blob=str(blob))))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--chdir", str(tmp_path), "-c", "python:flask_server", "-k", "gthread",
         "--threads", "2", "-w", "1", "-b", f"127.0.0.1:{port}", "flask_server:app"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    try:
        wait_for_port(port, timeout=30, proc=proc)
        status, _, body = get(port, "flask")
        assert status == 200 and body == blob.read_bytes()
        assert events(log, "flask", 2) == [f"sendfile flask {3 << 20}", "finish flask 200"]
        status, headers, body = get(port, "flask", "HEAD")
        assert status == 200 and body == b"" and dict(headers)["Content-Length"] == str(3 << 20)
        assert events(log, "flask", 3)[2:] == ["finish flask 200"]
    finally:
        stop(proc)
