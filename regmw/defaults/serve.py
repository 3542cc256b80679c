"""The ``[serve]`` section: how ``regmw serve`` runs (gunicorn) and where it answers operators.

Declared here, apart from :mod:`regmw.server`, so that reading the schema
(``regmw check-config``, ``regmw config-docs``, any in-process middleware)
never imports gunicorn. The middleware itself reads ``metrics_allow``,
``access_log`` and ``request_id_header``, so those work in-process too.
"""
from __future__ import annotations

import re

from regmw.config import Option, Section
from regmw.plugins import hookimpl


def _listen(value: str) -> str:
    """``host:port`` or ``[v6]:port``, or empty (off)."""
    if value:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:9102 or [::1]:9102 (or empty to disable)")
    return value


#: An HTTP field name (RFC 9110 token) without "_": servers drop or merge those (CGI maps "-" to "_").
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^`|~-]+")


def _header_name(value: str) -> str:
    """Sent on every API answer: a name the server refuses would turn each one into its 500."""
    if not _HEADER_NAME.fullmatch(value):
        raise ValueError("must be an HTTP header name: letters, digits and '-' (no spaces, no '_')")
    return value


SECTION = Section(
    "serve",
    "`regmw serve`: the production server (gunicorn, threaded workers), metrics, access logs.",
    {
        "workers": Option("int", 2, "Worker processes. Each runs every plugin and its own connection pools; "
                                    "about one per CPU core.", minimum=1, maximum=256),
        "threads": Option("int", 32, "Threads per worker: requests served at once by one worker (a slow "
                                     "blob transfer holds one thread).", minimum=1, maximum=4096),
        "worker_connections": Option("int", 1000, "Connections one worker holds at most (in flight plus idle "
                                                  "keep-alive); above it the worker stops accepting.", minimum=1),
        "timeout": Option("int", 30, "Seconds a worker may go without a heartbeat before the master restarts "
                                         "it (a hung worker; long transfers do not count: threads serve them).",
                          minimum=1),
        "graceful_timeout": Option("int", 120, "On SIGTERM: seconds in-flight requests get to finish (new "
                                                   "connections are refused at once); then workers are killed.",
                                   minimum=0),
        "keepalive": Option("int", 5, "Seconds an idle client keep-alive connection is kept open.", minimum=0),
        "client_timeout": Option("int", 60, "Seconds a client may stall, sending none of the request head or "
                                            "body it started or reading none of its answer, before its "
                                            "connection is closed (a stalled client must not hold a thread); "
                                            "`regmw demo` keeps it too.",
                                 minimum=1),
        "metrics_listen": Option("str", "", "Separate `HOST:PORT` answering Prometheus metrics of all workers at "
                                            "any path (e.g. `127.0.0.1:9102`); empty: none.", check=_listen),
        "metrics_allow": Option("cidrs", ["127.0.0.1/32", "::1/128"],
                                "Networks allowed to read `[regmw] metrics_path` on the API port (when that path "
                                "is set); others get 403 DENIED. The socket peer is checked, not X-Forwarded-For (an IPv4-mapped `::ffff:a.b.c.d` as `a.b.c.d`)."),
        "access_log": Option("bool", True, "One JSON line per request on the `regmw.access` logger (stderr under "
                                           "`regmw serve`)."),
        "request_id_header": Option("str", "X-Request-Id", "Request header whose value (if sane) becomes the "
                                                           "request id; it is generated otherwise, sent back in the "
                                                           "same response header (replacing one the app's answer has) "
                                                           "and forwarded upstream.", check=_header_name),
    },
)


@hookimpl
def regmw_config_sections():
    return [SECTION]
