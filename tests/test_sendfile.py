"""Mounted mode keeps the server's zero-copy path: a ``wsgi.file_wrapper`` body reaches the server as is.

gunicorn sends a body with sendfile only when it is an instance of its own
``wsgi.file_wrapper`` class; regmw must hand that object back (with
``regmw_finish`` hooked into its close) instead of wrapping it.
"""
import http.client
import io
import os
import subprocess
import sys
import textwrap
import time

from gunicorn.http.wsgi import FileWrapper

from regmw import RegistryMiddleware, hookimpl

from .servers._util import free_port, stop, wait_for_port

DIGEST = "sha256:" + "ab" * 32


class Finishes:
    def __init__(self):
        self.statuses = []

    @hookimpl
    def regmw_finish(self, context, status):
        self.statuses.append(status)


def blob_app(environ, start_response):
    handle = open(environ["blob.path"], "rb")  # noqa: SIM115 - the server closes it through the wrapper
    start_response("200 OK", [("Content-Length", str(os.fstat(handle.fileno()).st_size))])
    return environ["wsgi.file_wrapper"](handle, 65536)


def call(app, path, blob, wrapper):
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "x",
               "SERVER_PORT": "80", "wsgi.input": io.BytesIO(), "wsgi.url_scheme": "http",
               "REMOTE_ADDR": "127.0.0.1", "wsgi.file_wrapper": wrapper, "blob.path": str(blob)}
    return app(environ, lambda status, headers, exc_info=None: None)


def test_the_servers_file_wrapper_is_returned_as_is_and_finish_runs_once(tmp_path):
    blob = tmp_path / "blob"
    blob.write_bytes(b"x" * 1000)
    finishes = Finishes()
    app = RegistryMiddleware(blob_app, {}, plugins=[finishes], environ={})
    body = call(app, f"/v2/group/project/blobs/{DIGEST}", blob, FileWrapper)
    assert type(body) is FileWrapper  # the server's type: gunicorn takes its sendfile path
    assert body.filelike.name == str(blob)
    assert finishes.statuses == []
    body.close()
    body.close()
    assert finishes.statuses == [200]
    assert body.filelike.closed


def test_a_wrapper_that_refuses_a_close_attribute_is_wrapped_and_still_finished_once(tmp_path):
    class SlottedWrapper:
        __slots__ = ("filelike",)

        def __init__(self, filelike, blksize=8192):
            self.filelike = filelike

        def __iter__(self):
            return iter([self.filelike.read()])

        def close(self):
            self.filelike.close()

    blob = tmp_path / "blob"
    blob.write_bytes(b"y" * 10)
    finishes = Finishes()
    app = RegistryMiddleware(blob_app, {}, plugins=[finishes], environ={})
    body = call(app, f"/v2/group/project/blobs/{DIGEST}", blob, SlottedWrapper)
    assert not isinstance(body, SlottedWrapper)
    assert b"".join(body) == b"y" * 10
    body.close()
    body.close()
    assert finishes.statuses == [200]


SERVER = '''
import os, socket
from regmw import RegistryMiddleware, hookimpl

LOG = {log!r}

def note(line):
    with open(LOG, "a") as handle:
        handle.write(line + "\\n")

class Finish:
    @hookimpl
    def regmw_finish(self, context, status):
        note(f"finish {{status}}")

def blob_app(environ, start_response):
    handle = open({blob!r}, "rb")
    start_response("200 OK", [("Content-Length", str(os.fstat(handle.fileno()).st_size))])
    return environ["wsgi.file_wrapper"](handle, 65536)

application = RegistryMiddleware(blob_app, {{"regmw": {{"plugins": [], "entry_points": False}}}},
                                 plugins=[Finish()], environ={{}})

def post_fork(server, worker):
    sendfile = socket.socket.sendfile

    def counting(self, file, offset=0, count=None):
        sent = sendfile(self, file, offset, count)
        note(f"sendfile {{sent}}")
        return sent

    socket.socket.sendfile = counting
'''


def test_gunicorn_sends_a_blob_through_regmw_with_sendfile(tmp_path):
    size = 4 * 1024 * 1024 + 123
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(1024) * (size // 1024) + b"z" * (size % 1024))
    log = tmp_path / "events.log"
    (tmp_path / "sendfile_server.py").write_text(textwrap.dedent(SERVER.format(log=str(log), blob=str(blob))))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--chdir", str(tmp_path), "-c", "python:sendfile_server",
         "-k", "gthread", "--threads", "2", "-w", "1", "-b", f"127.0.0.1:{port}", "sendfile_server:application"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    try:
        wait_for_port(port, timeout=30, proc=proc)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", f"/v2/group/project/blobs/{DIGEST}")
        response = connection.getresponse()
        assert response.status == 200 and response.read() == blob.read_bytes()
        connection.close()
        deadline = time.monotonic() + 10
        while "finish" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.02)  # finish runs after the body is sent: poll for it with a deadline
        lines = log.read_text().split()
    finally:
        stop(proc)
    events = [(lines[i], lines[i + 1]) for i in range(0, len(lines), 2)]
    assert events == [("sendfile", str(size)), ("finish", "200")]


def test_a_refused_request_never_reaches_the_wrapper_path(tmp_path):
    """A refusal is an OCI error body, not the app's wrapper; finish still runs once."""
    finishes = Finishes()
    config = {"ratelimit": {"rules": [{"by": "client", "limit": "1/minute"}]}}
    app = RegistryMiddleware(blob_app, config, plugins=[finishes], environ={})
    blob = tmp_path / "blob"
    blob.write_bytes(b"z")
    first = call(app, f"/v2/group/project/blobs/{DIGEST}", blob, FileWrapper)
    first.close()
    second = call(app, f"/v2/group/project/blobs/{DIGEST}", blob, FileWrapper)
    assert not isinstance(second, FileWrapper) and b"TOOMANYREQUESTS" in b"".join(second)
    assert finishes.statuses == [200, 429]
