"""Run regmw as a gateway: a streaming WSGI reverse proxy to existing registries.

Why: a registry fleet that cannot host the middleware in-process (a Go
registry, a vendor appliance) still gets classification, rate limits and
read-only locks by putting ``RegistryMiddleware(Gateway(...))`` in front of it.
During a storage migration there are two upstreams, and the middleware's
``apps={"old": ..., "new": ...}`` dispatch picks one per request from
``context.migration_path``; :func:`create_gateway` builds exactly that from the
``[gateway]`` configuration section declared here.

What the proxy guarantees, because registry clients depend on it:

* bodies stream both ways, whether the client sent a Content-Length or
  ``Transfer-Encoding: chunked`` (a layer push is never held in memory):
  request bodies 1 MiB at a time (:data:`REQUEST_PIECE`), response bodies
  256 KiB at a time; a large response body is not copied at all (below);
* method, path and the raw query string pass unchanged (the ``?_state=``
  token in a PATCH Location must survive), hop-by-hop headers are dropped;
* the client's Host is forwarded, so the upstream builds Location headers that
  point back at the gateway; any Location, or Link target (paging), that still
  names the upstream is rewritten to the gateway;
* an unreachable upstream answers 502, a timeout 504, both with an OCI error
  body (code ``UNAVAILABLE``), never a traceback, and so does one that fails
  after its response head but before the first body byte (that first piece is
  read before the status goes out: :func:`_first_piece`); once the headers are out, a
  body the upstream cuts short (fewer bytes than its Content-Length) or stops
  sending for ``timeout`` seconds breaks the client's connection, so the
  client sees a failed transfer, never a short one or a hang;
* an upstream that answers before reading the whole request body (an unknown
  upload's 404, a 401) and hangs up has its answer passed on, not a 502
  (:func:`_early_response`).

Zero-copy responses (``[gateway] zero_copy``, on by default). On Linux, a
response body of a known length of at least :data:`SPLICE_MIN` (1 MiB) from a
plain-http upstream, for any method but HEAD and a status that has a body,
served by gunicorn over HTTP/1.x on its plain (not TLS) blocking socket
(``environ["gunicorn.socket"]``), is moved with ``os.splice`` from the
upstream socket through a pipe into the client's socket, inside the kernel.
What http.client had already buffered after the response head is yielded to
the server first (the server sends the headers with it); the rest never
enters Python, and iteration then ends. The connection goes back to the pool
once exactly the whole body has left the upstream socket (it is in the pipe);
a client that goes away (EPIPE, ECONNRESET) before that closes the upstream
connection. Moved bytes are counted in ``regmw_gateway_zero_copy_bytes_total``.
This writes to the client socket behind the server's back, which is right only
when the gateway's body reaches gunicorn unchanged (``RegistryMiddleware``
passes it through): ``regmw.wsgi`` under your own gunicorn, wrapped in a WSGI
middleware that rewrites bodies, needs ``zero_copy = false``; the catalog
(:mod:`regmw.catalog`), which reads pages in-process, never passes the socket
on. Measured (docs/performance.md, "Zero-copy pulls"): bodies below 1 MiB were
no faster spliced (a pipe per response and two system calls per piece), a
4 MiB one was; the pipe's size is measured at :data:`PIPE_SIZE`.

Connections come from a small keep-alive pool per upstream, on the standard
library's ``http.client``. Measured against urllib3's pool on the same
upstream (``benchmarks/gateway_bench.py``, ``transport``; docs/performance.md),
``http.client`` streamed a large blob at least as fast and answered small
requests with a lower p50 (urllib3 adds layers per request and per chunk), so
urllib3 was not adopted. The 256 KiB response piece size is measured too:
64 KiB pieces cost a third of the pull throughput in per-piece work, 1 MiB
pieces pushed the gateway's RSS past 50 MB during 32 concurrent pulls. Request
bodies are read in 1 MiB pieces instead, the most gunicorn receives at once:
smaller reads made gunicorn's body readers copy the rest of each receive again
and again, which was most of a push's CPU in the gateway. A chunked body goes
out as it came in, each piece one chunk whose size line, data and CRLF leave in
one ``sendmsg()`` (joining them copied every byte once more).

Each upstream request is timed to its response head
(``regmw_upstream_response_seconds``) and failures are counted by kind
(``regmw_upstream_errors_total``), labelled with the gateway's ``name``.
"""
from __future__ import annotations

import http.client
import ipaddress
import logging
import os
import re
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

try:
    import fcntl
except ImportError:  # not a Unix: no splice either
    fcntl = None  # type: ignore[assignment]

from . import metrics
from .catalog import MergedCatalog
from .clients import ClientResolver
from .config import Option, Section
from .errors import UPSTREAM_TIMED_OUT, ConfigError, Refusal, status_phrase, unreadable_body
from .plugins import hookimpl
from .strict_http import DIGITS, StrictResponse

log = logging.getLogger("regmw.gateway")

CHUNK = 256 * 1024
#: Pieces a request body is read in. gunicorn's readers receive up to 1 MiB per ``recv()`` and hand
#: back exactly what was asked, re-buffering the surplus (copied again) for the next read: 256 KiB
#: reads of a 1 MiB chunk re-copied 768, 512 and 256 KiB of it: a chunked push cost the gateway 3.5x the CPU
#: it costs with 1 MiB reads (docs/performance.md, "Pushes").
REQUEST_PIECE = 1024 * 1024

#: ``ready()`` waits at most this long for the upstream (a probe must answer quickly).
READY_TIMEOUT = 3.0

#: After an early answer, at most this much of the client's unread body is read and dropped, for at most
#: this long, before the answer goes out (see :meth:`_RequestBody.linger`).
LINGER_BYTES = 256 * 1024 * 1024
LINGER_SECONDS = 5.0
#: Bodies at least this long (Content-Length) are spliced when they may be (see :func:`_splice_target`):
#: below it the pipe and the extra system calls cost more than the copy they save.
SPLICE_MIN = 1024 * 1024
#: Pipe capacity asked for the splice (the kernel's default is 64 KiB; at most fs.pipe-max-size, 1 MiB by
#: default): 1 MiB pulled a 1 GiB blob at 0.80-1.03x direct in five runs, 256 KiB at 0.74-0.78x in two
#: (docs/performance.md, "Zero-copy pulls"). Kernel memory, one pipe per pull in progress.
PIPE_SIZE = 1024 * 1024
_CAN_SPLICE = all(hasattr(module, name) for module, name in (
    (os, "splice"), (os, "pipe2"), (fcntl, "F_SETPIPE_SZ")))

_upstream_seconds = metrics.Children(metrics.upstream_duration)
_upstream_errors = metrics.Children(metrics.upstream_errors)
_zero_copy_bytes = metrics.Children(metrics.gateway_zero_copy_bytes)

#: Headers that describe one connection, not the message (RFC 9110 7.6.1), and
#: ``Expect`` (http.client cannot do 100-continue; the WSGI server already did).
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade", "expect",
})
#: Set by the WSGI server that answers the client; forwarding them would duplicate them.
_SERVER_SET = frozenset({"date", "server"})


class UpstreamError(Exception):
    """The upstream could not be reached or did not answer in time."""

    def __init__(self, message: str, timed_out: bool) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class ConnectionPool:
    """Idle keep-alive connections to one upstream, shared by all threads.

    At most ``size`` idle connections are kept; a request that finds none opens
    a new one. A connection is returned only once its response was read to the
    end (before the last bytes are sent on to the client) and the upstream did
    not ask to close it.
    """

    def __init__(self, scheme: str, host: str, port: int, timeout: float, size: int = 16,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.scheme, self.host, self.port = scheme, host, port
        self.timeout = timeout
        self.size = size
        self.ssl_context = ssl_context
        self._idle: deque[http.client.HTTPConnection] = deque()
        self._lock = threading.Lock()

    def get(self) -> tuple[http.client.HTTPConnection, bool]:
        """A connection and whether it was reused (a reused one may have been closed upstream)."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._new(), False
            if _alive(conn):
                return conn, True
            conn.close()

    def put(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self.size:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = list(self._idle), deque()
        for conn in idle:
            conn.close()

    def _new(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self.scheme == "https":
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout, context=self.ssl_context)
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        conn.response_class = StrictResponse
        return conn


def _alive(conn: http.client.HTTPConnection) -> bool:
    """An idle connection is dead if its socket is readable (EOF or stray bytes)."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


#: What a proxy in front says about the client, how it was reached and which path it asked for: passed on
#: only from a trusted proxy (as ``title()`` spells them). distribution reads the first seven; the others are
#: what other registries and their frameworks read the same way: the scheme (``X-Forwarded-Scheme``,
#: ``-Ssl``, ``-Protocol``, ``Front-End-Https``), the client (``X-Client-Ip``, ``True-Client-Ip``,
#: ``X-Cluster-Client-Ip``), the host (``X-Forwarded-Server``) and the path itself (``X-Original-Url``,
#: ``X-Rewrite-Url``: an upstream honouring them would act on another path than the one regmw checked).
_FORWARDING_HEADERS = frozenset({"X-Forwarded-For", "X-Real-Ip", "Forwarded", "X-Forwarded-Proto",
                                 "X-Forwarded-Host", "X-Forwarded-Port", "X-Forwarded-Prefix",
                                 "X-Forwarded-Scheme", "X-Forwarded-Ssl", "X-Forwarded-Protocol", "Front-End-Https",
                                 "X-Client-Ip", "True-Client-Ip", "X-Cluster-Client-Ip", "X-Forwarded-Server",
                                 "X-Original-Url", "X-Rewrite-Url"})


class Gateway:
    """A WSGI app that forwards every request to ``upstream`` (``http(s)://host:port[/prefix]``)."""

    #: The upstream is the registry: a manifest read whose reference breaks the tag/digest
    #: grammar is forwarded for it to answer (see :class:`regmw.routes.UnknownReference`).
    forwards_unknown_references = True

    def __init__(self, upstream: str, *, timeout: float = 60.0, pool_size: int = 16,
                 preserve_host: bool = True, verify_tls: bool = True, name: str = "upstream",
                 zero_copy: bool = True, trusted_proxies: Iterable[Any] = ()) -> None:
        parts = urlsplit(upstream)
        # Whose X-Forwarded-For (X-Real-Ip, Forwarded) is passed on: ``[regmw] trusted_proxies``'s.
        self.clients = ClientResolver(tuple(trusted_proxies))
        self.name = name  # the ``upstream`` label of the gateway metrics
        # splice() moves socket bytes in the kernel; it cannot see through TLS on either side
        self.zero_copy = zero_copy and _CAN_SPLICE and parts.scheme == "http"
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"gateway upstream must be an http(s) URL with a host, not {upstream!r}")
        self.upstream = upstream
        self.netloc = parts.netloc
        self.prefix = parts.path.rstrip("/")
        self.preserve_host = preserve_host
        context = None
        if parts.scheme == "https":
            context = ssl.create_default_context()
            if not verify_tls:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        port = parts.port or (443 if parts.scheme == "https" else 80)
        self.pool = ConnectionPool(parts.scheme, parts.hostname, port, timeout, pool_size, context)

    def __repr__(self) -> str:
        return f"<Gateway {self.upstream}>"

    def close(self) -> None:
        self.pool.close()

    def ready(self) -> None:
        """For ``/-/regmw/ready``: ``GET /v2/`` on a fresh connection answers below 500 (401 counts: it answered)."""
        pool = self.pool
        if pool.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                pool.host, pool.port, timeout=min(pool.timeout, READY_TIMEOUT), context=pool.ssl_context)
        else:
            conn = http.client.HTTPConnection(pool.host, pool.port, timeout=min(pool.timeout, READY_TIMEOUT))
        try:
            conn.request("GET", self.prefix + "/v2/", headers={"Host": self.netloc})
            # Only the status matters; the body is left unread (the connection is closed): read, an endless
            # one was held in memory and a stalled one timed the probe out.
            response = conn.getresponse()
        finally:
            conn.close()
        if response.status >= 500:
            raise UpstreamError(f"{self.netloc} answered {response.status}", timed_out=False)

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET").upper()
        codings = _transfer_codings(environ)
        refusal = _unforwardable(environ, method, codings)
        if refusal is not None:
            return refusal(environ, start_response)
        target = self._target(environ)
        headers = self._request_headers(environ)
        body = _RequestBody(environ, method, chunked=codings == ["chunked"])
        start = time.perf_counter()
        try:
            conn, response = self._exchange(method, target, headers, body, environ)
            splice_to = _splice_target(environ, method, response) if self.zero_copy else None
            first = _first_piece(conn, response, spliced=splice_to is not None)
        except UpstreamError as exc:
            _upstream_errors[(self.name, "timeout" if exc.timed_out else "connect")].inc()
            log.warning("gateway %s %s -> %s: %s", method, target, self.netloc, exc)
            if exc.timed_out:
                refusal = UPSTREAM_TIMED_OUT
            else:
                refusal = Refusal(502, "UNAVAILABLE", "upstream registry is unreachable")
            return refusal(environ, start_response)
        except _ClientGone as gone:
            return Refusal(400, "UNKNOWN", str(gone))(environ, start_response)
        _upstream_seconds[(self.name, f"{response.status // 100}xx")].observe(time.perf_counter() - start)
        reason = response.reason
        status = f"{response.status} {reason if reason and not _UNSAFE_VALUE.search(reason) else status_phrase(response.status)}"
        start_response(status, self._response_headers(environ, response))
        return _ResponseBody(self.pool, conn, response, self.name, splice_to, first)

    # --- request ------------------------------------------------------------

    def _target(self, environ: dict) -> str:
        # PATH_INFO is decoded (latin-1 code points for bytes); quote it back the way a client sends it.
        # An absolute-form target with no path (``GET http://host?x``) has an empty one: its origin-form is
        # ``/`` (RFC 9112 3.2.1), not a bare ``?x`` that the upstream refuses as a request line.
        raw = (environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")).encode("latin-1") or b"/"
        target = self.prefix + quote(raw, safe="/:@!$&'()*+,;=~")
        query = environ.get("QUERY_STRING")
        return f"{target}?{query}" if query else target  # the raw query, untouched

    def _request_headers(self, environ: dict) -> list[tuple[str, str]]:
        named_hops = {item.strip().lower() for item in environ.get("HTTP_CONNECTION", "").split(",")}
        headers: list[tuple[str, str]] = []
        for key, value in environ.items():
            if key.startswith("HTTP_"):
                name = key[5:].replace("_", "-").title()
            elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                name = key.replace("_", "-").title()
            else:
                continue
            lower = name.lower()
            if lower in HOP_BY_HOP or lower in named_hops or lower in ("host", "content-length") or not value:
                continue
            headers.append((name, value))
        headers.append(("Host", environ.get("HTTP_HOST") if self.preserve_host and environ.get("HTTP_HOST") else self.netloc))
        peer = environ.get("REMOTE_ADDR")
        trusted = self.clients.is_trusted_peer(peer)
        if not trusted:
            # A client's own X-Forwarded-For would reach the upstream as the first hop, which is the
            # one distribution logs and puts in its events as the client's address (RemoteAddr); its
            # X-Forwarded-Proto/-Host would shape the Location and Link URLs the upstream builds.
            headers = [(n, v) for n, v in headers if n not in _FORWARDING_HEADERS]
        if peer:
            forwarded = environ.get("HTTP_X_FORWARDED_FOR") if trusted else None
            headers = [(n, v) for n, v in headers if n != "X-Forwarded-For"]
            headers.append(("X-Forwarded-For", f"{forwarded}, {peer}" if forwarded else peer))
        if not (trusted and "HTTP_X_FORWARDED_PROTO" in environ):
            headers.append(("X-Forwarded-Proto", environ.get("wsgi.url_scheme", "http") if trusted
                            else _reached_by(environ)))
        return headers

    def _exchange(self, method: str, target: str, headers: list[tuple[str, str]], body: _RequestBody, environ: dict):
        """Send the request and read the response head; retry once on a stale pooled connection."""
        for attempt in (1, 2):
            conn, reused = self.pool.get()
            try:
                conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
                for name, value in headers:
                    conn.putheader(name, value)
                try:
                    body.send(conn)
                except OSError:
                    # An upstream may answer before it has read the body (an unknown upload's 404, a 401,
                    # a 413) and hang up: that answer is the client's, not a 502 (or 504). Not on a pooled
                    # connection with nothing of the body sent: that is retried (what it holds may be a
                    # stale connection's last words).
                    early = _early_response(conn) if body.consumed or not reused else None
                    if early is None:
                        raise
                    body.linger(environ.get("gunicorn.socket"))
                    return conn, early
                return conn, conn.getresponse()
            except _ClientGone:
                conn.close()
                raise
            except TimeoutError as exc:
                conn.close()
                raise UpstreamError(f"timed out: {exc}", timed_out=True) from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                # A keep-alive connection the upstream closed meanwhile: replay if nothing was consumed.
                if attempt == 1 and reused and not body.consumed:
                    continue
                raise UpstreamError(f"{type(exc).__name__}: {exc}", timed_out=False) from None
        raise AssertionError("unreachable")  # pragma: no cover

    # --- response -----------------------------------------------------------

    def _response_headers(self, environ: dict, response: http.client.HTTPResponse) -> list[tuple[str, str]]:
        named_hops = {item.strip().lower() for item in (response.getheader("Connection") or "").split(",")}
        headers = []
        for name, value in response.getheaders():
            lower = name.lower()
            if lower in HOP_BY_HOP or lower in named_hops or lower in _SERVER_SET or lower == "content-length":
                continue
            if not _TOKEN.fullmatch(name):
                continue
            if _UNSAFE_VALUE.search(value):
                value = _UNSAFE_VALUE.sub(" ", value)
            if lower == "location":
                value = self._rewrite_location(environ, value)
            elif lower == "link":  # paging (tags/list, _catalog, referrers): <URL>; rel="next"
                value = _LINK_TARGET.sub(lambda m: f"<{self._rewrite_location(environ, m[1])}>", value)
            headers.append((name, value))
        if getattr(response, "declared_length", None) is not None:  # checked: one number, no chunked framing
            headers.append(("Content-Length", str(response.declared_length)))
        return headers

    def _rewrite_location(self, environ: dict, location: str) -> str:
        """Point a Location that names the upstream back at the gateway (query kept as is)."""
        parts = urlsplit(location)
        if not parts.netloc or parts.netloc != self.netloc:
            return location
        path = parts.path
        if self.prefix and path.startswith(self.prefix + "/"):
            path = path[len(self.prefix):]
        host = environ.get("HTTP_HOST") or f"{environ.get('SERVER_NAME')}:{environ.get('SERVER_PORT')}"
        scheme = environ.get("wsgi.url_scheme", "http")
        return f"{scheme}://{host}{path}" + (f"?{parts.query}" if parts.query else "")


#: The largest Content-Length the gateway forwards: Go's (distribution's) int64.
MAX_LENGTH = 2**63 - 1
#: A Host header as RFC 9110 7.2 allows it: an RFC 3986 authority without userinfo, i.e. an IP literal or a
#: reg-name (unreserved, pct-encoded, sub-delims), then an optional port; empty is allowed too.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]*)?")


def _transfer_codings(environ: dict) -> list[str]:
    """The request's transfer codings, lower case, in order (``[]`` without ``Transfer-Encoding``)."""
    value = environ.get("HTTP_TRANSFER_ENCODING")
    return [coding.strip(" \t").lower() for coding in value.split(",")] if value else []


def _unforwardable(environ: dict, method: str, codings: list[str]) -> Refusal | None:
    """The refusal for a request the gateway cannot pass on as the client meant it, else None.

    ``codings``: the request's transfer codings (:func:`_transfer_codings`), read once per request.

    The WSGI server let these through, and forwarding them would have the
    upstream act on another request than the one regmw checked:

    * ``CONNECT`` asks for a tunnel, which a registry never offers; its
      authority-form target (``evil:443``) was forwarded as a path (``443``),
      and an upstream that is (or sits behind) a proxy could open the tunnel
      past every hook: 405 ``UNSUPPORTED`` (the OCI code for an operation the
      registry does not offer);
    * a transfer coding other than ``chunked`` alone (``gzip, chunked``, which
      gunicorn accepts and only de-chunks) would reach the upstream as plain
      ``chunked``: the coding silently dropped, the coded bytes taken as the
      blob. 501, as RFC 9112 6.1 asks of a server that does not know a coding
      (and as distribution's Go server answers);
    * a ``Host`` that is not an authority (``evil.example/x?``, ``a b``) is
      forwarded as the client's Host (``preserve_host``) and put into the
      Location headers the upstream and the gateway build: distribution
      answers it with a plain-text 400, another upstream might build a URL
      from it. 400, with an OCI body; so is an HTTP/1.1 request with no
      ``Host`` at all (RFC 9112 3.2: a server MUST answer it 400, as
      distribution does), which would have gone upstream with the upstream's;
    * a ``Content-Length`` past 2^63 - 1 (gunicorn takes any number of
      digits) is one no upstream reads as sent: distribution answers a
      plain-text 400 once the gateway is streaming, and a parser that wraps
      it (2^64 + 3 read as 3) would take the rest of the body as a request of
      its own, none of whose checks regmw made. 400, as distribution answers.
    """
    if method == "CONNECT":
        return Refusal(405, "UNSUPPORTED", "CONNECT is not supported")
    if codings and codings != ["chunked"]:
        return Refusal(501, "UNSUPPORTED", "unsupported transfer encoding",
                       detail={"transfer-encoding": environ["HTTP_TRANSFER_ENCODING"][:128]})
    if not _HOST.fullmatch(environ.get("HTTP_HOST", "")):
        return Refusal(400, "UNKNOWN", "malformed Host header")
    if "HTTP_HOST" not in environ and environ.get("SERVER_PROTOCOL") == "HTTP/1.1":
        return Refusal(400, "UNKNOWN", "missing Host header")
    length = environ.get("CONTENT_LENGTH") or "0"
    if not codings and (not DIGITS.fullmatch(length) or len(length) > 19 or int(length) > MAX_LENGTH):
        return Refusal(400, "UNKNOWN", "bad Content-Length", detail={"content-length": length[:32]})
    return None


def _reached_by(environ: dict) -> str:
    """The scheme the client reached this server by, whatever it claims.

    gunicorn sets ``wsgi.url_scheme`` from a client's ``X-Forwarded-Proto``
    (``-Ssl``, ``-Protocol``) when the peer is in its ``forwarded_allow_ips``,
    loopback by default: that is not ``[regmw] trusted_proxies``, and a client
    on loopback (or behind an untrusted proxy there that passes the header on)
    had the upstream build its URLs with the scheme it chose. gunicorn's
    socket says it plainly; another server's ``wsgi.url_scheme`` is kept.
    """
    client = environ.get("gunicorn.socket")
    if client is None:
        return environ.get("wsgi.url_scheme", "http")
    return "https" if isinstance(client, ssl.SSLSocket) else "http"


#: What a header value or reason phrase may hold (RFC 9110 5.5: SP, HTAB, VCHAR, obs-text; what gunicorn checks
#: before it sends one): an upstream's CR or LF (an obs-fold), NUL or other control character becomes a space,
#: as RFC 9110 asks of a recipient that forwards it (gunicorn refused the whole answer: the app's 500).
_UNSAFE_VALUE = re.compile(r"[^\t\x20-\x7e\x80-\xff]")
#: A header name (RFC 9110 5.6.2, a token); http.client also parses names holding ``"``, ``(`` or ``@``, which
#: gunicorn refuses to send: such a header is dropped.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: The target of each link in a ``Link`` header (RFC 8288): ``<URI>``. ``[^<>]``, not ``[^>]``: a URI holds
#: no ``<``, and with ``[^>]*`` a value of many ``<`` and no ``>`` (an upstream's, up to 64 KiB) was scanned
#: to its end from every ``<``: quadratic, 15 s of one core (and the worker's GIL) for 50,000 of them.
_LINK_TARGET = re.compile(r"<([^<>]*)>")


def _early_response(conn: http.client.HTTPConnection) -> http.client.HTTPResponse | None:
    """The response an upstream sent while the request body was still going out, or None if it sent none.

    Only when its socket is readable already (a response, or the hang-up after
    one): a send that failed without either is the upstream's failure. The
    connection is never pooled after it: the body went out incomplete.
    """
    sock = conn.sock
    if sock is None:
        return None
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return None
        response = conn.getresponse()
    except (OSError, ValueError, http.client.HTTPException):
        return None
    response.will_close = True
    return response


def _first_piece(conn: http.client.HTTPConnection, response: http.client.HTTPResponse, spliced: bool) -> bytes:
    """The body's first bytes, read before the status goes out (b"" for a response without a body).

    An upstream that answers a head and then hangs up, stalls or breaks its
    framing before any body byte is answered 502/504 like one that never
    answered, instead of the client getting the upstream's 200 and then a
    broken body (or the server's own 500). ``read1``: what one receive brings
    (a chunked body: the first chunk), never a wait for a whole piece. For a
    spliced body only what http.client holds already, so no more is copied.
    """
    if response.length == 0:  # HEAD, 204, 304, Content-Length: 0
        return b""
    try:
        if spliced:
            piece = response.read(min(len(response.fp.peek()), response.length))
        else:
            piece = response.read1(CHUNK)
        if not piece and response.length:
            raise http.client.IncompleteRead(b"", response.length)
    except TimeoutError as exc:
        conn.close()
        raise UpstreamError(f"timed out before the body: {exc}", timed_out=True) from None
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise UpstreamError(f"failed before the body: {type(exc).__name__}: {exc}", timed_out=False) from None
    return piece


class _ClientGone(Exception):
    """The client's request body ended early or is malformed: nothing useful can be forwarded.

    Raised from reading the client's body, never from the upstream socket, so a
    client that cuts a chunked body short or sends a bad chunk size gets a 400,
    not a 502 blaming the upstream.
    """


class _RequestBody:
    """The client's body, forwarded as it arrives: fixed length, chunked, or none."""

    def __init__(self, environ: dict, method: str, chunked: bool) -> None:
        self.stream = environ.get("wsgi.input")
        self.consumed = False
        # Checked by _unforwardable: no transfer coding but chunked, and without one a Content-Length of 1*DIGIT.
        self.chunked = chunked
        self.length: int | None = None if self.chunked else int(environ.get("CONTENT_LENGTH") or 0)
        self.announce = self.chunked or self.length or method in ("POST", "PUT", "PATCH")

    def send(self, conn: http.client.HTTPConnection) -> None:
        if self.chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        elif self.announce:
            conn.putheader("Content-Length", str(self.length))
        conn.endheaders()
        if self.chunked:
            plain = type(conn.sock) is socket.socket  # TLS sockets have no sendmsg()
            for chunk in self._chunks():
                if plain:
                    _sendmsg_all(conn.sock, [b"%x\r\n" % len(chunk), chunk, b"\r\n"])
                else:
                    conn.send(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            conn.send(b"0\r\n\r\n")
        elif self.length:
            for chunk in self._chunks():
                conn.send(chunk)

    def linger(self, client: socket.socket | None) -> None:
        """Read and drop the rest of the body the upstream did not wait for, within bounds, before answering.

        The upstream answered early (a 404 for an unknown upload, a 401) and
        the server will close the connection: closed with the client's bytes
        still unread, the kernel sends a reset, which can destroy the answer
        in the client's buffers before the client reads it (a client that
        sends its whole body before it reads never sees it at all). As
        nginx's lingering close: at most :data:`LINGER_BYTES` or
        :data:`LINGER_SECONDS` (gunicorn's socket gets that timeout
        meanwhile), then the answer goes out whatever is left.
        """
        if self.stream is None:
            return
        deadline, left = time.monotonic() + LINGER_SECONDS, LINGER_BYTES
        blocking = client.gettimeout() if client is not None else None
        try:
            while left > 0:
                wait = deadline - time.monotonic()
                if wait <= 0:
                    return
                if client is not None:
                    client.settimeout(wait)
                try:
                    chunk = self.stream.read(min(REQUEST_PIECE, left))
                except Exception:  # noqa: BLE001 - a timeout, a reset, a malformed body: stop draining
                    return
                if not chunk:
                    return
                left -= len(chunk)
        finally:
            if client is not None:
                client.settimeout(blocking)

    def _chunks(self) -> Iterator[bytes]:
        remaining = self.length
        while remaining is None or remaining > 0:
            try:
                chunk = self.stream.read(REQUEST_PIECE if remaining is None else min(REQUEST_PIECE, remaining))
            except Exception as exc:  # the server's body reader: a bad chunk size, EOF mid-chunk (an IOError)
                raise _ClientGone(unreadable_body(exc)) from None
            if not chunk:
                if remaining:
                    raise _ClientGone("request body ended before its Content-Length")
                return
            self.consumed = True
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk


def _sendmsg_all(sock: socket.socket, parts: list[bytes]) -> None:
    """Send ``parts`` back to back with ``sendmsg()``: a chunk's framing without joining it to the data (a copy)."""
    views = [memoryview(part) for part in parts]
    while views:
        sent = sock.sendmsg(views)
        while sent:  # drop what went out; a partial send leaves the rest of one part first
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0] = views[0][sent:]
                sent = 0


class _ResponseBody:
    """The upstream's body as a WSGI iterable; gives the connection back to the pool once the body is read.

    The connection goes back the moment http.client has the body's last byte,
    before that byte is sent on: a client that opens its next request as soon
    as it has the body then finds the connection idle instead of making the
    gateway open another one. A body not read to its end (client gone,
    upstream broken) closes the connection instead.

    With ``splice_to`` (the client's socket, see :func:`_splice_target`) the
    body does not pass through Python: what http.client has buffered already
    is yielded (so the server sends the headers, then those bytes), and the
    rest is spliced from the upstream socket into the client socket by
    :func:`_splice`, after which iteration ends with nothing more to yield.
    """

    def __init__(self, pool: ConnectionPool, conn: http.client.HTTPConnection, response: http.client.HTTPResponse,
                 name: str = "upstream", splice_to: socket.socket | None = None, first: bytes = b""):
        self.pool, self.conn, self.response = pool, conn, response
        self.name = name
        self.splice_to = splice_to
        self.first = first  # read by :func:`_first_piece` before the status went out
        self.released = False

    def __iter__(self) -> Iterator[bytes]:
        if self.splice_to is not None:
            yield from self._spliced(self.splice_to)
            return
        chunk = self.first
        while True:
            # isclosed() after a read that raised nothing: http.client saw the last byte
            # (Content-Length reached, the last chunk, or the close that ends the body).
            if self.response.isclosed():
                self._release(reusable=True)
            if chunk:
                yield chunk
            if self.released:
                return
            try:
                chunk = self.response.read(CHUNK)
                if not chunk and self.response.length:
                    # http.client ends a Content-Length body the upstream cut short with b"", silently;
                    # ending the iteration here would leave the client waiting for the rest.
                    raise http.client.IncompleteRead(b"", self.response.length)
            except (OSError, http.client.HTTPException):
                # Headers are out: the only honest signal left is a broken body.
                self._broken()
                raise

    def _spliced(self, client: socket.socket) -> Iterator[bytes]:
        # _first_piece took what http.client held after the head (peek(): one raw read only when it held
        # none); read() of no more than that kept response.length right for the splice.
        yield self.first  # the server sends the headers, then these bytes
        moved = 0
        try:
            for count in _splice(self.conn.sock, client, self.response.length,
                                 drained=lambda: self._release(reusable=True)):
                moved += count
        except _UpstreamFailed as failed:
            self._broken()
            raise failed.__cause__ from None
        finally:
            if moved:
                _zero_copy_bytes[(self.name,)].inc(moved)
        self._release(reusable=True)  # a body wholly in ``first`` left nothing to splice

    def _broken(self) -> None:
        _upstream_errors[(self.name, "body")].inc()
        log.warning("gateway: upstream body failed mid-stream", exc_info=True)

    def _release(self, reusable: bool) -> None:
        """Once: back to the pool when the body was read to its end and the upstream keeps it open, else closed."""
        if self.released:
            return
        self.released = True
        if reusable and not self.response.will_close:
            self.response.close()  # as http.client closes it at the end of a body; the socket stays open
            self.pool.put(self.conn)
        else:
            self.conn.close()

    def close(self) -> None:
        self._release(reusable=False)  # a no-op after a body read to its end


class _UpstreamFailed(Exception):
    """The upstream side of a splice failed (``__cause__``); the client side raises its OSError as is."""


def _splice_target(environ: dict, method: str, response: http.client.HTTPResponse) -> socket.socket | None:
    """The client socket to splice this response's body into, or None to copy it through Python.

    Only where the body goes straight from the upstream socket to the client
    socket byte for byte: gunicorn's plain (not TLS) socket for an HTTP/1.x
    request (HTTP/2 frames its data; a blocking socket, as the gthread worker
    hands it over, so a splice into it answers EAGAIN only when ``regmw serve``'s
    send timeout, ``[serve] client_timeout``, expired: a client gone), a body of a known
    length of at least :data:`SPLICE_MIN` (no chunked framing to translate),
    a response that has a body at all, and a connection the upstream keeps
    open (after ``Connection: close``, nginx's on the last of its
    ``keepalive_requests``, the body is read through the response only).
    """
    client = environ.get("gunicorn.socket")
    # a subclass too (regmw serve's accepted connections are one, for their sendfile), but never TLS
    if (not isinstance(client, socket.socket) or isinstance(client, ssl.SSLSocket) or client.gettimeout() is not None
            or environ.get("SERVER_PROTOCOL") not in ("HTTP/1.1", "HTTP/1.0")):
        return None
    if method == "HEAD" or response.status < 200 or response.status in (204, 304):
        return None
    if response.chunked or response.length is None or response.length < SPLICE_MIN:
        return None
    if response.will_close:  # http.client let go of the socket (``conn.sock`` is None): the body is the response's
        return None
    return client


def _splice(upstream: socket.socket, client: socket.socket, length: int,
            drained: Callable[[], None] = lambda: None) -> Iterator[int]:
    """Move ``length`` bytes upstream socket -> pipe -> client socket in the kernel; yield each count moved.

    ``drained`` is called once the last byte has left the upstream socket (it
    is in the pipe), before it is spliced on: the upstream socket is not
    touched after that, so its connection may serve another request already.

    The upstream socket has a timeout, so Python made it non-blocking: a splice
    out of it answers EAGAIN when nothing has arrived, and the wait for more is
    a poll bounded by that timeout (then TimeoutError, as a read would raise).
    Upstream failures (EOF before ``length``: IncompleteRead) come wrapped in
    :class:`_UpstreamFailed`; the client's (EPIPE, ECONNRESET) are raised as
    they are, and the server treats them as a client gone.
    """
    timeout = upstream.gettimeout()
    wait_ms = None if timeout is None else max(1, int(timeout * 1000))
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        try:
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # the default 64 KiB pipe still works, with more splices per byte
        poller = select.poll()
        poller.register(upstream, select.POLLIN)
        source, target = upstream.fileno(), client.fileno()
        remaining = length
        while remaining:
            try:
                count = _fill(source, write_end, min(remaining, PIPE_SIZE), poller, wait_ms, remaining)
            except (OSError, http.client.HTTPException) as exc:
                raise _UpstreamFailed() from exc
            remaining -= count
            if not remaining:
                drained()
            left = count
            while left:
                left -= os.splice(read_end, target, left,
                                  flags=os.SPLICE_F_MOVE | (os.SPLICE_F_MORE if remaining else 0))
            yield count
    finally:
        os.close(read_end)
        os.close(write_end)


def _fill(source: int, pipe: int, count: int, poller: select.poll, wait_ms: int | None, remaining: int) -> int:
    """Splice up to ``count`` bytes from the upstream socket into the (empty) pipe; wait for them if need be."""
    while True:
        try:
            moved = os.splice(source, pipe, count, flags=os.SPLICE_F_MOVE)
        except BlockingIOError:
            if not poller.poll(wait_ms):
                raise TimeoutError("timed out waiting for the upstream body") from None
            continue
        if not moved:
            raise http.client.IncompleteRead(b"", remaining)
        return moved


# --- configuration ---------------------------------------------------------

_URL = ("http", "https")


def paired_upstreams(section: Mapping[str, Any], config: Any = None) -> str | None:
    """`old_upstream` and `new_upstream` are set together or not at all."""
    old, new = section.get("old_upstream"), section.get("new_upstream")
    if bool(old) != bool(new):
        missing = "gateway.new_upstream" if old else "gateway.old_upstream"
        return f"{missing} is required when the other of old_upstream/new_upstream is set"
    return None


SECTION = Section(
    "gateway",
    "Gateway mode (`regmw serve` in front of existing registries): where requests are proxied.",
    {
        "upstream": Option("url", None, "The registry every request goes to (and, during a migration, requests "
                                        "that are not about one repository, such as `/v2/`).", schemes=_URL),
        "old_upstream": Option("url", None, "During a migration: the registry serving repositories classified `old`.",
                               schemes=_URL),
        "new_upstream": Option("url", None, "During a migration: the registry serving repositories classified `new`.",
                               schemes=_URL),
        "timeout": Option("float", 60.0, "Seconds to wait for the upstream to connect or to send the next bytes; "
                                         "then 504.", minimum=0.01),
        "pool_size": Option("int", 16, "Idle keep-alive connections kept per upstream.", minimum=0),
        "preserve_host": Option("bool", True, "Forward the client's Host header, so the upstream's Location headers "
                                              "name the gateway."),
        "verify_tls": Option("bool", True, "Verify https upstreams' certificates."),
        "zero_copy": Option("bool", True, "On Linux, move large response bodies (Content-Length of 1 MiB or more) "
                                          "from a plain-http upstream to the client with `splice`, in the kernel, "
                                          "instead of copying them through Python; off: always copy."),
    },
    checks=(paired_upstreams,),
)


@hookimpl
def regmw_config_sections():
    return [SECTION]


def _networks(values: Iterable[Any]) -> tuple[Any, ...]:
    """``trusted_proxies`` as networks (a validated config holds them so; a plain mapping may hold text)."""
    return tuple(value if hasattr(value, "network_address") else ipaddress.ip_network(value) for value in values)


def create_gateway(config: Any) -> tuple[Gateway | MergedCatalog, dict[str, Gateway]]:
    """Build ``(app, apps)`` for ``RegistryMiddleware(app, runtime, apps=apps)`` from ``[gateway]``.

    ``config`` is a validated :class:`~regmw.config.Config` (or a Runtime, or a
    mapping with a ``gateway`` table). With only ``upstream``, ``apps`` is
    empty. With ``old_upstream`` and ``new_upstream``, ``apps`` maps ``old`` and
    ``new`` to them and ``app`` (for unclassified requests) is ``upstream``, or
    the old one when no ``upstream`` is given, wrapped in a
    :class:`~regmw.catalog.MergedCatalog` that answers ``/v2/_catalog`` from both.
    """
    config = getattr(config, "config", config)
    section: Mapping[str, Any] = config["gateway"]
    options = {key: section.get(key, SECTION.options[key].default)
               for key in ("timeout", "pool_size", "preserve_host", "verify_tls", "zero_copy")}
    options["trusted_proxies"] = _networks((config.get("regmw") or {}).get("trusted_proxies") or ())
    old, new, upstream = section.get("old_upstream"), section.get("new_upstream"), section.get("upstream")
    problem = paired_upstreams(section)  # a validated config has passed it already; a plain mapping has not
    if problem:
        raise ConfigError(problem)
    if not (upstream or old):
        raise ConfigError("gateway.upstream (or gateway.old_upstream and gateway.new_upstream) is required to run a gateway")
    apps: dict[str, Gateway] = {}
    if old:
        apps = {"old": Gateway(old, name="old", **options), "new": Gateway(new, name="new", **options)}
    app = Gateway(upstream, **options) if upstream else apps["old"]
    if apps:  # a repository lives in one of the two: the catalog is both, merged (regmw.catalog)
        app = MergedCatalog(app, [apps["old"], apps["new"]])
    return app, apps
